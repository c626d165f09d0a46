"""Cleaning: every record validated, every rejection reported with its line, duplicates removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from index_builder import clean
from index_builder.clean import assemble, clean_interactions, clean_items
from index_builder.readers import InputError, interaction_rows, item_rows
from index_builder.schema import DEFAULT_EVENT_WEIGHTS


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_csv_rows_are_kept_with_utc_timestamps(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.csv",
        "user_id,item_id,event,timestamp\n"
        "u1,i1,view,2026-01-01T10:00:00+02:00\n"
        "u1,i2,purchase,1767261600\n"
        "u2,i1,click,2026-01-01T08:00:00\n",
    )
    kept, report = clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS)
    assert report.accepted == 3 and report.rejected == 0
    assert [r.timestamp.isoformat() for r in kept] == [
        "2026-01-01T08:00:00+00:00",
        "2026-01-01T10:00:00+00:00",
        "2026-01-01T08:00:00+00:00",
    ]


def test_bad_rows_are_rejected_with_line_and_reason(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.csv",
        "user_id,item_id,event,timestamp\n"
        "u1,i1,view,2026-01-01T00:00:00Z\n"
        "u1,i1,teleport,2026-01-01T00:00:00Z\n"
        "u1,i1,view\n"
        "u1,i1,view,yesterday\n"
        ",i1,view,2026-01-01T00:00:00Z\n"
        "u1,,click,2026-01-01T00:00:00Z\n",
    )
    kept, report = clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS)
    assert len(kept) == 1
    assert report.rejected == 5
    reasons = {r.line: r.reason for r in report.examples}
    assert reasons[3] == "unknown event type 'teleport'"
    assert reasons[4] == "malformed CSV: expected 4 fields, got 3"
    assert "timestamp" in reasons[5]
    assert "user_id" in reasons[6]
    assert reasons[7] == "event 'click' needs an item_id"
    assert all(r.file == "e.csv" for r in report.examples)


def test_malformed_jsonl_line_is_rejected_and_the_rest_kept(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.jsonl",
        '{"user_id": "u1", "item_id": 7, "event": "view", "timestamp": 1767225600}\n'
        "{not json\n"
        '["a", "list"]\n'
        '{"user_id": "u2", "item_id": "7", "event": "click", "timestamp": "2026-01-01T00:00:00Z"}\n',
    )
    kept, report = clean_interactions(interaction_rows(events), "e.jsonl", DEFAULT_EVENT_WEIGHTS)
    assert [r.item_id for r in kept] == ["7", "7"]
    assert {r.line for r in report.examples} == {2, 3}
    assert report.examples[0].reason.startswith("malformed JSON")


def test_duplicates_are_removed_by_event_id_or_by_content(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.csv",
        "event_id,user_id,item_id,event,timestamp\n"
        "a,u1,i1,view,2026-01-01T00:00:00Z\n"
        "a,u1,i1,view,2026-01-01T00:00:05Z\n"
        ",u1,i2,view,2026-01-01T00:00:00Z\n"
        ",u1,i2,view,2026-01-01T00:00:00Z\n"
        ",u1,i2,view,2026-01-01T00:01:00Z\n",
    )
    kept, report = clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS)
    assert len(kept) == 3
    assert report.duplicates == 2


def test_search_events_without_item_are_counted_not_trained_on(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.csv",
        "user_id,item_id,event,timestamp,query\nu1,,search,2026-01-01T00:00:00Z,red shoes\n",
    )
    kept, report = clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS)
    assert kept == [] and report.without_item == 1 and report.rejected == 0


def test_custom_event_type_is_accepted_when_given_a_weight(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user_id,item_id,event,timestamp\nu1,i1,wishlist,2026-01-01T00:00:00Z\n")
    kept, _ = clean_interactions(interaction_rows(events), "e.csv", {**DEFAULT_EVENT_WEIGHTS, "wishlist": 3.0})
    assert [r.event for r in kept] == ["wishlist"]


def test_items_keep_extra_columns_as_attributes_and_split_lists(tmp_path: Path) -> None:
    items = write(
        tmp_path / "items.csv",
        "item_id,title,categories,tags,price,brand\ni1,Shoe,shoes|shoes/running,red|sale,59.90,Acme\ni1,Dup,,,1,\n"
        "i2,Bad,shoes,,-3,\n",
    )
    kept, report = clean_items(item_rows(items), "items.csv")
    assert len(kept) == 1
    assert kept[0].categories == ["shoes", "shoes/running"] and kept[0].tags == ["red", "sale"]
    assert kept[0].attributes == {"brand": "Acme"}
    assert report.duplicates == 1 and report.rejected == 1
    assert "price" in report.examples[0].reason and report.examples[0].line == 4


def test_missing_file_is_an_input_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: no such file"):
        interaction_rows(tmp_path / "nope.csv")


def test_assemble_indexes_densely_and_adds_unknown_items_to_the_catalog(tmp_path: Path) -> None:
    events = write(
        tmp_path / "e.csv",
        "user_id,item_id,event,timestamp\nu1,i1,view,1\nu2,i9,purchase,2\nu1,i1,remove_from_cart,3\n",
    )
    items = write(tmp_path / "items.csv", "item_id,title\ni1,One\ni2,Two\n")
    kept, _ = clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS)
    catalog_items, _ = clean_items(item_rows(items), "items.csv")
    data, catalog, missing = assemble(kept, catalog_items, DEFAULT_EVENT_WEIGHTS)
    assert [i.item_id for i in catalog.items] == ["i1", "i2", "i9"]
    assert catalog.user_ids == ["u1", "u2"]
    assert missing == 1
    # remove_from_cart weighs nothing, so it stays out of training
    assert data.weight.tolist() == [1.0, 8.0]
    assert data.item.tolist() == [0, 2]


def test_repeated_users_items_event_types_categories_and_tags_share_one_string(tmp_path: Path) -> None:
    # Millions of rows name a few thousand users and items: one object per distinct value, not per row.
    events = write(
        tmp_path / "e.csv",
        "user_id,item_id,event,timestamp\nu1,i1,view,1767261600\nu1,i2,view,1767261601\nu2,i1,view,1767261602\n",
    )
    kept, _ = clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS)
    assert kept[0].user_id is kept[1].user_id and kept[0].item_id is kept[2].item_id
    assert kept[0].event is kept[1].event is kept[2].event
    items = write(tmp_path / "items.csv", "item_id,categories,tags\ni1,shoes|shoes/running,red\ni2,shoes,red|sale\n")
    catalog, _ = clean_items(item_rows(items), "items.csv")
    assert catalog[0].categories[0] is catalog[1].categories[0] and catalog[0].tags[0] is catalog[1].tags[0]


@pytest.mark.parametrize(("every_s", "lines"), [(0.0, 5), (3600.0, 0)])
def test_reading_progress_is_paced_by_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_s: float, lines: int
) -> None:
    monkeypatch.setattr(clean, "PROGRESS_EVERY", 2)
    monkeypatch.setattr(clean, "PROGRESS_EVERY_S", every_s)
    rows = "".join(f"u{n},i{n},view,2026-01-01T00:00:{n:02d}Z\n" for n in range(10))
    events = write(tmp_path / "e.csv", "user_id,item_id,event,timestamp\n" + rows)
    said: list[str] = []
    clean_interactions(interaction_rows(events), "e.csv", DEFAULT_EVENT_WEIGHTS, said.append)
    assert len(said) == lines
    assert said[-1:] == ([] if lines == 0 else ["e.csv: read 10 rows, rejected 0"])
