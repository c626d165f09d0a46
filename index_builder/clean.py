"""Validation, de-duplication and UTC normalisation of raw rows, with a report of every rejection."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from index_builder.dataset import Interactions
from index_builder.readers import ParseError, Row
from index_builder.schema import ITEMLESS_EVENTS, Interaction, Item

MAX_EXAMPLES = 20
PROGRESS_EVERY = 200_000  # rows between looks at the clock
PROGRESS_EVERY_S = 5.0  # a line at most this often: 20M rows read in a few minutes, not 100 lines


class Rejection(msgspec.Struct, frozen=True):
    file: str
    line: int
    reason: str


class CleanReport(msgspec.Struct):
    file: str
    read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    without_item: int = 0
    reasons: dict[str, int] = {}
    examples: list[Rejection] = []

    def reject(self, line: int, reason: str) -> None:
        self.rejected += 1
        # Group by the reason's stable part so the summary stays short on large files.
        key = reason.split(": ", maxsplit=1)[0] if reason.startswith("malformed") else reason
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(Rejection(self.file, line, reason))


_ID_FIELDS = ("user_id", "item_id", "event_id")


def _ids_as_text(row: Row) -> Row:
    """JSON producers often write numeric ids; an id is a name, so 7 and "7" are the same item."""
    for key in _ID_FIELDS:
        value = row.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            row[key] = str(value)
    return row


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def clean_interactions(
    rows: Iterable[tuple[int, Row | ParseError]],
    file: str,
    weights: Mapping[str, float],
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Interaction], CleanReport]:
    """Valid, de-duplicated interactions with UTC timestamps, and the report of what was not kept.

    Duplicates are rows with the same event_id or, without one, the same user, item, event,
    timestamp and value: a retried upload or a log replayed twice must not count twice.
    """
    report = CleanReport(file=file)
    kept: list[Interaction] = []
    seen: set[tuple[Any, ...]] = set()
    # Users, items and event types repeat across millions of rows: one string object each instead
    # of one per row saves about 160 bytes an event (docs/performance.md, "Building").
    shared: dict[str, str] = {}
    said = time.monotonic()
    for line, row in rows:
        report.read += 1
        if progress is not None and report.read % PROGRESS_EVERY == 0 and time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            progress(f"{file}: read {report.read:,} rows, rejected {report.rejected:,}")
        if isinstance(row, ParseError):
            report.reject(line, row.reason)
            continue
        try:
            record = msgspec.convert(_ids_as_text(row), Interaction, strict=False)
        except msgspec.ValidationError as exc:
            report.reject(line, f"invalid record: {exc}")
            continue
        if record.event not in weights:
            report.reject(line, f"unknown event type {record.event!r}")
            continue
        if record.item_id is None and record.event not in ITEMLESS_EVENTS:
            report.reject(line, f"event {record.event!r} needs an item_id")
            continue
        record.timestamp = _utc(record.timestamp)
        key: tuple[Any, ...] = (
            ("id", record.event_id)
            if record.event_id is not None
            else (record.user_id, record.item_id, record.event, record.timestamp, record.value)
        )
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        if record.item_id is None:
            report.without_item += 1
            continue
        record.user_id = shared.setdefault(record.user_id, record.user_id)
        record.item_id = shared.setdefault(record.item_id, record.item_id)
        record.event = shared.setdefault(record.event, record.event)
        kept.append(record)
    report.accepted = len(kept)
    return kept, report


_ITEM_FIELDS = frozenset(Item.__struct_fields__)


def clean_items(rows: Iterable[tuple[int, Row | ParseError]], file: str) -> tuple[list[Item], CleanReport]:
    """Valid catalog entries, first occurrence of each item_id wins; unknown columns become attributes."""
    report = CleanReport(file=file)
    items: list[Item] = []
    seen: set[str] = set()
    shared: dict[str, str] = {}  # categories and tags repeat across the catalog: one string each
    for line, row in rows:
        report.read += 1
        if isinstance(row, ParseError):
            report.reject(line, row.reason)
            continue
        fields = _ids_as_text(row)
        extra = {key: value for key, value in fields.items() if key not in _ITEM_FIELDS}
        declared = {key: value for key, value in fields.items() if key in _ITEM_FIELDS}
        if extra:
            declared["attributes"] = {**declared.get("attributes", {}), **extra}
        try:
            item = msgspec.convert(declared, Item, strict=False)
        except msgspec.ValidationError as exc:
            report.reject(line, f"invalid record: {exc}")
            continue
        if item.item_id in seen:
            report.duplicates += 1
            continue
        seen.add(item.item_id)
        item.categories = [shared.setdefault(category, category) for category in item.categories]
        item.tags = [shared.setdefault(tag, tag) for tag in item.tags]
        items.append(item)
    report.accepted = len(items)
    return items, report


class Catalog(msgspec.Struct):
    """The item table in vector-row order and the known users, as the snapshot stores them."""

    items: list[Item]
    user_ids: list[str]


def assemble(
    events: list[Interaction], items: list[Item], weights: Mapping[str, float]
) -> tuple[Interactions, Catalog, int]:
    """Index users and items densely; items that only appear in events join the catalog bare.

    Returns the interactions, the catalog, and how many event items were missing from the catalog.
    Events whose type weighs nothing stay out of training.
    """
    item_index = {item.item_id: row for row, item in enumerate(items)}
    catalog_items = list(items)
    missing: Counter[str] = Counter()
    user_index: dict[str, int] = {}
    n = len(events)
    user = np.empty(n, dtype=np.int32)
    item = np.empty(n, dtype=np.int32)
    weight = np.empty(n, dtype=np.float32)
    ts = np.empty(n, dtype=np.int64)
    kept = 0
    for record in events:
        w = weights[record.event]
        if w <= 0:
            continue
        assert record.item_id is not None  # itemless events never reach assembly
        row = item_index.get(record.item_id)
        if row is None:
            row = item_index[record.item_id] = len(catalog_items)
            catalog_items.append(Item(item_id=record.item_id))
            missing[record.item_id] += 1
        user[kept] = user_index.setdefault(record.user_id, len(user_index))
        item[kept] = row
        weight[kept] = w
        ts[kept] = int(record.timestamp.timestamp())
        kept += 1
    data = Interactions(
        user[:kept], item[:kept], weight[:kept], ts[:kept], n_users=len(user_index), n_items=len(catalog_items)
    )
    return data, Catalog(items=catalog_items, user_ids=list(user_index)), len(missing)
