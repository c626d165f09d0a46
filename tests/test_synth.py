"""The synthetic shop: reproducible, exactly sized, schema-valid, and shaped like real shop behaviour."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import msgspec
import pytest

from index_builder import synth
from index_builder.schema import Interaction, Item
from index_builder.synth import EVENT_NAMES, SynthSummary, generate

USERS, ITEMS, EVENTS, DAYS = 200, 500, 5000, 90
START = datetime(2026, 1, 1, tzinfo=UTC)
HEADER = ["event_id", "user_id", "item_id", "event", "timestamp", "value", "query"]


def _generate(out: Path, seed: int = 0, events: int = EVENTS) -> SynthSummary:
    return generate(out, users=USERS, items=ITEMS, events=events, seed=seed, days=DAYS, start=START)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "events.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER
        return list(reader)


def _interactions(out: Path) -> list[Interaction]:
    """Rows as the index builder reads them: empty fields dropped, then converted to the schema."""
    return [msgspec.convert({k: v for k, v in row.items() if v != ""}, Interaction, strict=False) for row in _rows(out)]


def _items(out: Path) -> list[Item]:
    lines = (out / "items.jsonl").read_bytes().splitlines()
    return [msgspec.json.decode(line, type=Item) for line in lines]


def _top_category(out: Path) -> dict[str, str]:
    return {item.item_id: item.categories[0].split("/")[0] for item in _items(out)}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _generate(tmp_path / name, seed=seed)
    for file in ("items.jsonl", "events.csv", "users.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "events.csv").read_bytes() != (tmp_path / "c" / "events.csv").read_bytes()
    assert (tmp_path / "a" / "items.jsonl").read_bytes() != (tmp_path / "c" / "items.jsonl").read_bytes()


@pytest.mark.parametrize("events", [0, 1, 4999, EVENTS])
def test_files_have_exactly_the_requested_number_of_rows(tmp_path: Path, events: int) -> None:
    summary = _generate(tmp_path, events=events)
    assert len(_rows(tmp_path)) == events
    assert len(_items(tmp_path)) == ITEMS
    users = (tmp_path / "users.csv").read_text(encoding="utf-8").splitlines()
    assert users[0] == "user_id,favourite_category" and len(users) == USERS + 1
    assert (summary.events, summary.items, summary.users) == (events, ITEMS, USERS)
    assert sum(summary.event_counts.values()) == events
    assert set(summary.event_counts) == set(EVENT_NAMES)


def test_every_event_row_validates_against_the_interaction_schema(tmp_path: Path) -> None:
    _generate(tmp_path)
    item_ids = {item.item_id for item in _items(tmp_path)}
    records = _interactions(tmp_path)
    assert len({r.event_id for r in records}) == EVENTS
    for record in records:
        assert record.event in EVENT_NAMES
        assert record.timestamp.tzinfo is not None
        if record.event == "search":
            assert record.item_id is None and record.query
        else:
            assert record.item_id in item_ids and record.query is None
        has_value = record.event in {"add_to_cart", "purchase"}
        assert (record.value is not None and record.value > 0) == has_value
    assert {r.event for r in records} == set(EVENT_NAMES)


def test_every_item_line_validates_against_the_item_schema(tmp_path: Path) -> None:
    _generate(tmp_path)
    items = _items(tmp_path)
    assert [item.item_id for item in items] == [f"i{i:05d}" for i in range(ITEMS)]
    for item in items:
        assert item.title and 1 <= len(item.categories) <= 2 and item.tags
        assert all("/" in category for category in item.categories)
        assert item.price is not None and item.price > 0
        assert item.stock is not None and item.stock >= 0
    assert any(item.stock == 0 for item in items)
    assert 20 <= len({item.categories[0].split("/")[0] for item in items}) <= 40


def test_item_popularity_is_long_tailed(tmp_path: Path) -> None:
    _generate(tmp_path)
    counts = Counter(row["item_id"] for row in _rows(tmp_path) if row["item_id"])
    ranked = sorted(counts.values(), reverse=True)
    assert sum(ranked[: ITEMS // 10]) > 0.4 * sum(ranked)
    assert len(counts) < ITEMS  # some items are never touched


def test_some_carts_are_abandoned_and_some_end_in_a_purchase(tmp_path: Path) -> None:
    summary = _generate(tmp_path)
    purchases: defaultdict[tuple[str | None, str | None], list[datetime]] = defaultdict(list)
    records = _interactions(tmp_path)
    for r in records:
        if r.event == "purchase":
            purchases[r.user_id, r.item_id].append(r.timestamp)
    outcomes = Counter(
        any(bought >= r.timestamp for bought in purchases[r.user_id, r.item_id])
        for r in records
        if r.event == "add_to_cart"
    )
    assert outcomes[True] > 0 and outcomes[False] > 0
    assert summary.abandoned_carts > 0


def test_timestamps_lie_in_the_span_and_never_go_back_within_a_user(tmp_path: Path) -> None:
    _generate(tmp_path)
    last: dict[str, datetime] = {}
    for row in _rows(tmp_path):
        assert row["timestamp"].endswith("Z") and len(row["timestamp"]) == len("2026-01-01T00:00:00Z")
        moment = datetime.fromisoformat(row["timestamp"])
        assert START <= moment <= START + timedelta(days=DAYS)
        assert moment >= last.get(row["user_id"], START)
        last[row["user_id"]] = moment


def test_consecutive_items_of_a_user_share_a_category_more_often_than_random_pairs(tmp_path: Path) -> None:
    _generate(tmp_path)
    category = _top_category(tmp_path)
    sequences: defaultdict[str, list[str]] = defaultdict(list)
    for row in _rows(tmp_path):
        if row["event"] == "view":
            sequences[row["user_id"]].append(category[row["item_id"]])
    pairs = [(a, b) for seq in sequences.values() for a, b in pairwise(seq)]
    consecutive = sum(a == b for a, b in pairs) / len(pairs)
    # Two views drawn independently from all views share a category with probability sum(p^2).
    marginal = Counter(c for seq in sequences.values() for c in seq)
    total = sum(marginal.values())
    random_pairs = sum((n / total) ** 2 for n in marginal.values())
    assert consecutive > 3 * random_pairs


def test_progress_names_each_phase(tmp_path: Path) -> None:
    messages: list[str] = []
    generate(tmp_path, users=USERS, items=ITEMS, events=EVENTS, progress=messages.append)
    for phase in ("catalog", "users", "timestamps", "events.csv"):
        assert any(message.startswith(phase) for message in messages)


def test_writing_progress_stays_short_for_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "PROGRESS_EVERY", 100)  # 5,000 rows: 50 chunks
    messages: list[str] = []
    generate(tmp_path, users=USERS, items=ITEMS, events=EVENTS, progress=messages.append)
    written = [message for message in messages if message.startswith("events.csv")]
    assert 5 <= len(written) <= 11
    assert written[-1] == f"events.csv: {EVENTS:,}/{EVENTS:,} rows written"


def test_the_purchases_shape_is_an_order_export_with_one_time_buyers_repeats_and_seasons(tmp_path: Path) -> None:
    summary = generate(tmp_path, users=3000, items=800, events=12_000, seed=2, days=365, start=START, shape="purchases")
    rows = _rows(tmp_path)
    assert summary.events == len(rows) == 12_000
    assert {row["event"] for row in rows} == {"purchase"}
    assert all(row["value"] for row in rows)
    orders: defaultdict[str, set[str]] = defaultdict(set)
    bought: Counter[tuple[str, str]] = Counter()
    for row in rows:
        orders[row["user_id"]].add(row["timestamp"])
        bought[row["user_id"], row["item_id"]] += 1
    one_order = sum(1 for times in orders.values() if len(times) == 1) / len(orders)
    assert one_order > 0.5  # most customers order once
    assert max(len(times) for times in orders.values()) >= 10  # and a few are regulars
    assert sum(count - 1 for count in bought.values()) / len(rows) > 0.05  # re-bought items
    per_item = sorted(Counter(row["item_id"] for row in rows).values(), reverse=True)
    assert sum(per_item[: len(per_item) // 10]) > 0.4 * len(rows)  # a long tail
    top = _top_category(tmp_path)
    quarter_sales: defaultdict[str, Counter[int]] = defaultdict(Counter)
    for row in rows:
        month = int(row["timestamp"][5:7])
        quarter_sales[top[row["item_id"]]][(month - 1) // 3] += 1
    swings = [max(q.values()) / max(min(q.values()), 1) for q in quarter_sales.values() if sum(q.values()) > 300]
    assert max(swings) > 2.0  # some category sells far better in its season


def test_an_unknown_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        generate(tmp_path, users=2, items=2, events=2, shape="clicks")  # type: ignore[arg-type]
