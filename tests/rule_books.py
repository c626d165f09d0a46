"""Rule books for the rules tests: a book from a rule-set dict, the facts of a request, a stand-in
for the model's list, and a book applied to it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from gateway.rules import conditions
from gateway.rules.book import Book
from gateway.rules.conditions import Compiler
from gateway.rules.document import parse
from gateway.rules.picks import Pick
from gateway.snapshot import Snapshot
from gateway.store import window_label
from gateway.store.base import DEFAULT_WINDOWS

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC).timestamp()  # a Friday, 15:30 UTC


def book(snap: Snapshot, doc: dict[str, Any], version: int = 1, **options: Any) -> Book:
    return Book(parse(msgspec.json.encode(doc)), version, snap, Compiler(DEFAULT_WINDOWS, window_label), **options)


def facts(**given: Any) -> conditions.Facts:
    return conditions.facts(given.pop("now", NOW), **given)


def model_list(snap: Snapshot, size: int = 60) -> list[Pick]:
    """A stand-in for the model's answer: the first `size` rows, falling scores."""
    return [Pick(row, round(1.0 - row / 1000, 6), "user-vector") for row in range(size)]


def run(b: Book, snap: Snapshot, f: conditions.Facts | None = None, *, n: int = 10, size: int = 60) -> Any:
    f = f or facts()
    ruling = b.decide(f, "recommend", personal=True)
    popular = [Pick(int(row), 0.5, "popular") for row in snap.popular[""]]
    return ruling.apply(model_list(snap, size), n=n, reserve=lambda: popular, allowed=lambda row: True)


def category_of(snap: Snapshot, row: int) -> str:
    return snap.categories[row][0].split("/")[0]


def rule(rule_id: str, *actions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "actions": list(actions), **fields}
