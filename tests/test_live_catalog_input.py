"""`tailor build --catalog`: the gateway's live records laid over the items file (index_builder.live_catalog)."""

from __future__ import annotations

from index_builder.live_catalog import overlay
from index_builder.schema import Item, LiveItem


def test_the_next_build_merges_a_records_attributes_into_the_files() -> None:
    items = [Item("a", title="A", attributes={"colour": "red", "size": 2}), Item("b"), Item("gone")]
    live = [
        LiveItem("a", 1.0, title="A2", stock=0, attributes={"size": 3}),
        LiveItem("new", 2.0, title="N", categories=["c"]),
        LiveItem("gone", 3.0, retired=True),
    ]
    catalog, retired = overlay(items, live)
    by_id = {item.item_id: item for item in catalog}
    assert sorted(by_id) == ["a", "b", "new"] and retired == {"gone"}
    assert (by_id["a"].title, by_id["a"].stock, by_id["a"].attributes) == ("A2", 0, {"colour": "red", "size": 3})
    assert by_id["new"].categories == ["c"]
