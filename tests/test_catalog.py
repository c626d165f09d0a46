"""The live catalog API in process (memory store): items created, changed and retired through
/v1/items are served (or withheld) by every route at once, kept across restarts and swaps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.snapshot import Snapshot, load
from tailor.catalog_import import import_file
from tailor.cli import main
from tests.gateways import ids, post_events, settings
from tests.snapshots import current_dir, republish
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    return load(current_dir(small_snapshots))


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(root))) as test_client:
        yield test_client


def served_row(client: TestClient, item: str) -> int | None:
    snap = client.app.state.gateway.recommender.snap  # type: ignore[attr-defined]
    row: int | None = snap.row_of.get(item)
    return None if row is None or row in snap.withheld else row


def everywhere(client: TestClient, item: str, *, similar_of: str, visitor: str = "v") -> dict[str, list[str]]:
    """The ids each recommending route answers (the long lists, so anything served would show)."""
    return {
        "popular": ids(client.get("/v1/popular", params={"n": 100}).json()),
        "similar": ids(client.get(f"/v1/items/{similar_of}/similar", params={"n": 100}).json()),
        "recommend": ids(client.get("/v1/recommend", params={"visitor": visitor, "n": 100}).json()),
    }


def closest_built_item(snap: Snapshot, vector: np.ndarray[Any, Any]) -> int:
    """A built row whose similar items (its precomputed list) the item of `vector` would enter at
    rank 3 or better."""
    assert snap.neighbour_scores is not None
    unit = vector / np.linalg.norm(vector)
    cosine = snap.unit_vectors @ unit
    beats = cosine > snap.neighbour_scores[:, 2] + 1e-3
    assert beats.any()
    return int(np.flatnonzero(beats)[np.argmax(cosine[beats])])


# -- creating ----------------------------------------------------------------------------------


def test_a_new_item_gets_a_content_vector_and_is_among_the_similar_items_of_a_related_one(
    client: TestClient, snap: Snapshot
) -> None:
    template = snap.item_ids[11]
    categories, tags = snap.categories[11], sorted(snap.item_tags[11])
    assert snap.content is not None
    vector = snap.content.vectors([(categories, tags)])[0]
    related = snap.item_ids[closest_built_item(snap, vector)]
    body = {"title": "Brand new", "categories": categories, "tags": tags, "price": 12.5, "stock": 3}
    stored = client.put("/v1/items/new-1", json=body)
    assert stored.status_code == 200, stored.text
    assert stored.json()["item"]["source"] == "live"
    wait_until(lambda: "new-1" in ids(client.get(f"/v1/items/{related}/similar", params={"n": 5}).json()))
    item = client.get("/v1/items/new-1").json()
    assert item["served"] is True and item["title"] == "Brand new" and item["price"] == 12.5
    assert template != "new-1"
    # The new item's own similar items are its nearest by the content vector.
    own = ids(client.get("/v1/items/new-1/similar", params={"n": 3}).json())
    cosine = snap.unit_vectors @ (vector / np.linalg.norm(vector))
    cosine[snap.stock == 0] = -np.inf
    assert own == [snap.item_ids[row] for row in np.argsort(-cosine, kind="stable")[:3]]


def test_a_new_item_is_in_the_popular_list_of_its_category_and_events_on_it_are_accepted(
    client: TestClient, snap: Snapshot
) -> None:
    category = snap.categories[0][0]
    client.put("/v1/items/new-2", json={"title": "Cold", "categories": [category], "stock": 1})
    wait_until(lambda: served_row(client, "new-2") is not None)
    listed = ids(client.get("/v1/popular", params={"n": 100, "category": category}).json())
    assert "new-2" in listed
    post_events(client, "shopper", [("new-2", "view")])  # a known item now: not "unknown-item"
    assert client.get("/v1/recommend", params={"visitor": "shopper", "n": 5}).json()["profile"] == "live"


def test_a_new_category_is_known_at_once(client: TestClient) -> None:
    client.put("/v1/items/new-3", json={"title": "Odd", "categories": ["brand-new-category"], "stock": 1})
    wait_until(lambda: served_row(client, "new-3") is not None)
    body = client.get("/v1/popular", params={"category": "brand-new-category"}).json()
    assert ids(body) == ["new-3"]


# -- withheld ----------------------------------------------------------------------------------


def test_an_item_out_of_stock_is_served_by_no_route(client: TestClient, snap: Snapshot) -> None:
    first = everywhere(client, "", similar_of=snap.item_ids[1])
    popular = first["popular"][0]
    similar = first["similar"][0]
    for item in (popular, similar):
        assert client.patch(f"/v1/items/{item}", json={"stock": 0}).status_code == 200
    wait_until(lambda: served_row(client, popular) is None and served_row(client, similar) is None)
    after = everywhere(client, "", similar_of=snap.item_ids[1])
    for route, listed in after.items():
        assert popular not in listed and similar not in listed, route
    assert client.get(f"/v1/items/{popular}").json()["served"] is False


def test_serve_out_of_stock_serves_stock_zero_but_never_unavailable_items(root: Path, snap: Snapshot) -> None:
    with TestClient(create_app(settings(root, serve_out_of_stock=True))) as client:
        top = ids(client.get("/v1/popular", params={"n": 2}).json())
        client.patch(f"/v1/items/{top[0]}", json={"stock": 0})
        client.patch(f"/v1/items/{top[1]}", json={"available": False})
        wait_until(lambda: served_row(client, top[1]) is None)
        listed = ids(client.get("/v1/popular", params={"n": 100}).json())
        assert top[0] in listed and top[1] not in listed


def test_answers_cached_before_a_retirement_are_not_served_after_it(client: TestClient, snap: Snapshot) -> None:
    similar_of = snap.item_ids[4]
    before = ids(client.get(f"/v1/items/{similar_of}/similar", params={"n": 5}).json())
    assert client.delete(f"/v1/items/{before[0]}").status_code == 200
    wait_until(lambda: served_row(client, before[0]) is None)
    after = ids(client.get(f"/v1/items/{similar_of}/similar", params={"n": 5}).json())
    assert before[0] not in after and after[:4] == before[1:]
    item = client.get(f"/v1/items/{before[0]}").json()
    assert item["retired"] is True and item["served"] is False
    assert client.patch(f"/v1/items/{before[0]}", json={"stock": 1}).status_code == 404


def test_rules_see_the_live_stock_and_may_pin_a_new_item(client: TestClient, snap: Snapshot) -> None:
    client.put("/v1/items/pinned", json={"title": "Pin me", "categories": snap.categories[0], "stock": 5})
    wait_until(lambda: served_row(client, "pinned") is not None)
    rules = {
        "rules": [
            {"id": "pin", "actions": [{"type": "pin", "item": "pinned", "position": 1}]},
            {"id": "cheap", "actions": [{"type": "filter", "items": {"price_at_least": 1000}}]},
        ]
    }
    assert client.put("/admin/rules", params={"activate": "true"}, json=rules).status_code == 201
    wait_until(lambda: ids(client.get("/v1/popular", params={"n": 3}).json())[:1] == ["pinned"])
    dear = ids(client.get("/v1/popular", params={"n": 3}).json())[1]
    client.patch(f"/v1/items/{dear}", json={"price": 5000})
    wait_until(lambda: dear not in ids(client.get("/v1/popular", params={"n": 10}).json()))
    client.patch("/v1/items/pinned", json={"stock": 0})  # a pin never shows what is not served
    wait_until(lambda: "pinned" not in ids(client.get("/v1/popular", params={"n": 10}).json()))


def test_rules_match_the_live_attributes_and_a_patch_keeps_the_others(client: TestClient) -> None:
    rules = {
        "rules": [{"id": "no-acme", "actions": [{"type": "filter", "items": {"attributes": {"brand": ["acme"]}}}]}]
    }
    assert client.put("/admin/rules", params={"activate": "true"}, json=rules).status_code == 201
    first = ids(client.get("/v1/popular", params={"n": 3}).json())[0]
    assert client.patch(f"/v1/items/{first}", json={"brand": "acme", "colour": "red"}).status_code == 200
    wait_until(lambda: first not in ids(client.get("/v1/popular", params={"n": 10}).json()))
    assert client.get(f"/v1/items/{first}").json()["attributes"] == {"brand": "acme", "colour": "red"}
    client.patch(f"/v1/items/{first}", json={"brand": "zeta"})  # the other attribute stays
    wait_until(lambda: first in ids(client.get("/v1/popular", params={"n": 10}).json()))
    assert client.get(f"/v1/items/{first}").json()["attributes"] == {"brand": "zeta", "colour": "red"}


def test_a_node_knows_its_own_change_before_it_serves_it(client: TestClient) -> None:
    for n in range(20):  # no wait between: each call must find what the one before stored
        assert client.put(f"/v1/items/quick-{n}", json={"title": "Quick", "stock": 1}).status_code == 200
        assert client.patch(f"/v1/items/quick-{n}", json={"price": n}).status_code == 200
        assert client.delete(f"/v1/items/quick-{n}").status_code == 200
        assert client.get(f"/v1/items/quick-{n}").json()["retired"] is True


# -- input -------------------------------------------------------------------------------------


def test_unknown_fields_are_kept_as_attributes_and_wrong_types_name_the_field(client: TestClient) -> None:
    stored = client.put("/v1/items/attr", json={"title": "A", "colour": "red", "size": 42, "stock": 2})
    assert stored.status_code == 200
    assert stored.json()["item"]["attributes"] == {"colour": "red", "size": 42}
    patched = client.patch("/v1/items/attr", json={"colour": "blue", "price": 3})
    assert patched.json()["item"]["attributes"] == {"colour": "blue", "size": 42}
    assert patched.json()["item"]["price"] == 3 and patched.json()["item"]["stock"] == 2
    for body, field in (
        ({"price": "cheap"}, "price"),
        ({"stock": -1}, "stock"),
        ({"categories": "shoes"}, "categories"),
        ({"available": "yes"}, "available"),
        ({"nested": {"a": 1}}, "nested"),
        ({"item_id": "other"}, "item_id"),
    ):
        refused = client.put("/v1/items/attr", json=body)
        assert refused.status_code == 422, body
        assert refused.json()["error"]["field"] == field, body
    assert client.get("/v1/items/attr").json()["attributes"] == {"colour": "blue", "size": 42}  # unchanged


def test_an_id_over_the_limit_is_a_400_and_unknown_items_are_404(client: TestClient) -> None:
    long = "x" * 257
    assert client.put(f"/v1/items/{long}", json={"title": "t"}).status_code == 400
    assert client.get(f"/v1/items/{long}").json()["error"]["field"] == "item_id"
    assert client.get("/v1/items/nobody").status_code == 404
    assert client.patch("/v1/items/nobody", json={"stock": 1}).status_code == 404
    assert client.delete("/v1/items/nobody").status_code == 404
    assert client.put("/v1/items/x", content=b"[1]").status_code == 400


def test_a_bulk_call_stores_the_good_rows_and_names_the_bad_ones(client: TestClient) -> None:
    rows = [
        {"item_id": "bulk-1", "title": "One", "stock": 1},
        {"item_id": "bulk-2", "price": "free"},
        {"title": "no id"},
        {"item_id": "bulk-3", "title": "Three", "stock": 1, "colour": "green"},
    ]
    answer = client.post("/v1/items", json=rows)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["stored"] == 2
    assert [(r["index"], r.get("field")) for r in body["rejected"]] == [(1, "price"), (2, "item_id")]
    assert client.get("/v1/items/bulk-3").json()["attributes"] == {"colour": "green"}
    assert client.get("/v1/items/bulk-2").status_code == 404
    lines = b'{"item_id": "bulk-4", "stock": 2}\nnot json\n{"item_id": "bulk-5"}\n'
    answer = client.post("/v1/items", content=lines, headers={"content-type": "application/x-ndjson"})
    assert answer.json()["stored"] == 2 and answer.json()["rejected"][0]["index"] == 1
    refused = client.post("/v1/items", json=[{"price": 1}])
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid-items"


def test_a_bulk_call_over_the_limit_is_refused_whole(root: Path) -> None:
    with TestClient(create_app(settings(root, max_items_per_call=2))) as client:
        rows = [{"item_id": f"b{n}"} for n in range(3)]
        assert client.post("/v1/items", json=rows).status_code == 413
        assert client.get("/v1/items/b0").status_code == 404


# -- durability --------------------------------------------------------------------------------


def test_changes_survive_a_restart_in_the_file_beside_the_rules(root: Path, tmp_path: Path, snap: Snapshot) -> None:
    kept = settings(root, catalog_file=str(tmp_path / "catalog.jsonl"))
    gone = snap.item_ids[2]
    with TestClient(create_app(kept)) as client:
        client.put("/v1/items/durable", json={"title": "Kept", "stock": 1})
        client.delete(f"/v1/items/{gone}")
    with TestClient(create_app(kept)) as client:
        assert client.get("/v1/items/durable").json()["title"] == "Kept"
        assert served_row(client, "durable") is not None
        assert served_row(client, gone) is None


def test_a_snapshot_swap_keeps_the_changes_newer_than_the_snapshot(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        client.put("/v1/items/swapped", json={"title": "Live", "stock": 1})
        wait_until(lambda: served_row(client, "swapped") is not None)
        republish(root, age=timedelta(hours=1))  # built before the change
        assert client.post("/admin/reload").json()["changed"] is True
        assert served_row(client, "swapped") is not None
        republish(root)  # built after it: it has the catalog the change made (`tailor build` reads it)
        assert client.post("/admin/reload").json()["changed"] is True
        assert served_row(client, "swapped") is None


# -- import and the next build -------------------------------------------------------------------


def test_a_catalog_file_is_imported_in_batches_and_its_bad_rows_named(client: TestClient, tmp_path: Path) -> None:
    catalog = tmp_path / "items.csv"
    rows = ["item_id,title,categories,price,stock,colour"]
    rows += [f"imported-{n},Item {n},shoes,{n}.5,{n % 3},red" for n in range(7)]
    rows.append("imported-bad,Bad,shoes,-3,1,red")  # a negative price: the file reader refuses it
    catalog.write_text("\n".join(rows) + "\n")
    lines: list[str] = []

    def send(url: str, key: str | None, body: bytes) -> dict[str, object]:
        answer: dict[str, object] = client.post("/v1/items", content=body).json()
        return answer

    report = import_file(catalog, "http://gateway", None, batch=3, say=lines.append, send=send)
    assert (report.read, report.stored, report.unreadable, report.rejected) == (8, 7, 1, 0)
    assert lines[-1].startswith("7/7 items sent")
    item = client.get("/v1/items/imported-4").json()
    assert (item["price"], item["stock"], item["attributes"]) == (4.5, 1, {"colour": "red"})
    wait_until(lambda: served_row(client, "imported-4") is not None)
    assert served_row(client, "imported-3") is None  # stock 0


def test_the_next_build_takes_the_live_catalog_retired_items_left_out(
    root: Path, tmp_path: Path, small_shop: Path, snap: Snapshot
) -> None:
    kept = settings(root, catalog_file=str(tmp_path / "catalog.jsonl"))
    retired = snap.item_ids[3]
    with TestClient(create_app(kept)) as client:
        client.put("/v1/items/built-new", json={"title": "Next build", "categories": snap.categories[0], "stock": 2})
        client.delete(f"/v1/items/{retired}")
        client.patch(f"/v1/items/{snap.item_ids[5]}", json={"available": False, "title": "Renamed"})
    out = tmp_path / "rebuilt"
    build = ["build", "--events", str(small_shop / "events.csv"), "--items", str(small_shop / "items.jsonl")]
    catalog = ["--catalog", str(tmp_path / "catalog.jsonl"), "--out", str(out), "--quiet", "--max-trials", "1"]
    assert main([*build, *catalog, "--force"]) == 0
    rebuilt = load(current_dir(out))
    assert "built-new" in rebuilt.row_of and retired not in rebuilt.row_of
    renamed = rebuilt.row_of[snap.item_ids[5]]
    assert rebuilt.titles[renamed] == "Renamed" and renamed in rebuilt.unavailable
    with TestClient(create_app(settings(out))) as client:
        assert served_row(client, snap.item_ids[5]) is None  # unavailable in the build's catalog
        assert served_row(client, "built-new") is not None
