"""The hand-assembled answer encoding must be byte for byte what msgspec makes of the declared types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import pytest

from gateway.api import encoding, wire
from gateway.recommend.pipeline import Fallback
from gateway.rules.picks import Pick
from gateway.snapshot import Snapshot, load
from tests.snapshots import current_dir


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded = load(current_dir(small_snapshots))
    titles, categories = list(loaded.titles), list(loaded.categories)
    # Everything JSON must escape, and a title that looks like the field the encoder splits at.
    titles[0] = 'Quote " backslash \\ tab \t newline \n "score": 1'
    titles[1] = "Ünïcödé 雨傘 🌂 \u2028"
    titles[2] = ""
    categories[1] = []
    categories[2] = ["a/b", 'c"d', "\x00"]
    return dataclasses.replace(loaded, titles=titles, categories=categories, encoded_items=[], encoded_reasons={})


def expected(snap: Snapshot, rid: str, picks: list[tuple[int, float, str]], fallback: Fallback | None) -> bytes:
    items = [
        wire.ScoredItem(
            id=snap.item_ids[row],
            title=snap.titles[row],
            categories=snap.categories[row],
            score=score,
            reasons=[reason],
        )
        for row, score, reason in picks
    ]
    return msgspec.json.encode(wire.Recommendations(rid, snap.version, items, fallback, "live"))


@pytest.mark.parametrize(
    "picks",
    [
        [],
        [(0, 0.5, "user-vector")],
        [(0, 0.123456, "user-vector"), (1, -3.0, "popular"), (2, 1e-07, 'similar-to:"x"'), (3, 12345678.9, "popular")],
        [(5, 0.25, "user-vector"), (5, 0.25, "user-vector")],  # the same row twice: cached fragment reused
    ],
)
def test_encoded_answer_equals_the_declared_types_encoding(snap: Snapshot, picks: list[tuple[int, float, str]]) -> None:
    fallbacks: list[Fallback | None] = [None, "cold-start"]
    for fallback in fallbacks:
        got = encoding.encode_recommendations(snap, "rid-1", [Pick(*pick) for pick in picks], fallback, "live")
        assert got == expected(snap, "rid-1", picks, fallback)
        # and again from the per-snapshot caches it filled
        assert encoding.encode_recommendations(snap, "rid-1", [Pick(*pick) for pick in picks], fallback, "live") == got
    decoded = msgspec.json.decode(got, type=wire.Recommendations)
    assert [item.id for item in decoded.items] == [snap.item_ids[row] for row, _, _ in picks]


def test_a_prepared_snapshot_encodes_the_same(snap: Snapshot) -> None:
    prepared = encoding.prepare(dataclasses.replace(snap, encoded_items=[], encoded_reasons={}))
    assert len(prepared.encoded_items) == len(snap.item_ids)
    assert None not in prepared.encoded_items  # every item encoded, before any answer
    picks = [(0, 0.5, "user-vector"), (1, 0.25, "popular"), (len(snap.item_ids) - 1, 1e-3, "popular")]
    answer = encoding.encode_recommendations(prepared, "r", [Pick(*pick) for pick in picks], None, "live")
    assert answer == expected(snap, "r", picks, None)
