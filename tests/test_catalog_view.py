"""The served catalog (gateway.catalog.view.derive): made from the view before it with the changes
since, it must be the catalog one view of every change makes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from gateway.catalog.view import derive
from gateway.snapshot import Snapshot, load
from index_builder.schema import LiveItem
from tests.snapshots import current_dir


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    return load(current_dir(small_snapshots))


def changes(snap: Snapshot, count: int, seed: int) -> list[tuple[int, LiveItem]]:
    """Creations, edits of built and created items (prices, stock, categories, tags), retirements."""
    rng = random.Random(seed)
    names = sorted(snap.category_rows)
    created = snap.created + 1
    found: list[LiveItem] = []
    for n in range(count):
        kind = rng.random()
        if kind < 0.4 or not found:
            item_id = f"live-{rng.randrange(count // 3 + 1)}"
        else:
            item_id = snap.item_ids[rng.randrange(len(snap.item_ids))] if kind < 0.8 else rng.choice(found).item_id
        found.append(
            LiveItem(
                item_id,
                created + n,
                title=f"t{n}",
                categories=[rng.choice(names)],
                tags=rng.sample(["a", "b", "c"], rng.randrange(3)),
                price=rng.choice([None, 5.0, 50.0]),
                stock=rng.choice([None, 0, 3]),
                available=rng.random() > 0.1,
                retired=rng.random() < 0.1,
            )
        )
    latest = {item.item_id: (seq, item) for seq, item in enumerate(found, 1)}
    return sorted(latest.values(), key=lambda pair: pair[0])


def catalog(view: Snapshot) -> dict[str, object]:
    """What a view serves, by item id (rows of added items may differ between derivations)."""
    rows = range(len(view.item_ids))
    return {
        "items": {
            view.item_ids[r]: (
                view.titles[r],
                tuple(view.categories[r]),
                view.category_sets[r],
                view.item_tags[r],
                float(view.prices[r]) if view.prices[r] == view.prices[r] else None,
                int(view.stock[r]),
                r in view.withheld,
                tuple(np.round(view.item_vectors[r], 5)),
            )
            for r in rows
        },
        "categories": {name: {view.item_ids[r] for r in found} for name, found in view.category_rows.items()},
        "tags": {name: {view.item_ids[r] for r in found} for name, found in view.tag_rows.items()},
        "popular": {name: {view.item_ids[r] for r in found} for name, found in view.popular.items()},
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_views_made_one_after_another_serve_what_one_view_of_every_change_serves(snap: Snapshot, seed: int) -> None:
    records = changes(snap, 300, seed)
    whole = derive(snap, records, read_upto=records[-1][0], serve_out_of_stock=False)
    view = snap
    size = len(records)
    for cut in (size // 5, size // 2, size // 2 + 1, size - 10, size):
        upto = records[cut - 1][0]
        view = derive(view, [r for r in records if r[0] <= upto], read_upto=upto, serve_out_of_stock=False)
    assert catalog(view) == catalog(whole)
    assert view.live_seq == whole.live_seq == records[-1][0]


def test_a_change_applied_twice_changes_nothing(snap: Snapshot) -> None:
    records = changes(snap, 100, 4)
    once = derive(snap, records, read_upto=0, serve_out_of_stock=False)  # read_upto 0: the next view sees them again
    twice = derive(once, records, read_upto=records[-1][0], serve_out_of_stock=False)
    assert catalog(twice) == catalog(once)
    assert len(twice.item_ids) == len(once.item_ids)


def test_changes_older_than_the_snapshot_are_not_applied(snap: Snapshot) -> None:
    old = LiveItem(snap.item_ids[0], snap.created - 10, title="stale", stock=0)
    view = derive(snap, [(1, old)], read_upto=1, serve_out_of_stock=False)
    assert view.titles[0] == snap.titles[0]
    assert view.live_seq == 1


def test_out_of_stock_rows_are_withheld_unless_served_on_purpose(snap: Snapshot) -> None:
    zero = set(np.flatnonzero(snap.stock == 0).tolist())
    assert zero
    assert derive(snap, [], read_upto=0, serve_out_of_stock=False).withheld == zero
    assert derive(snap, [], read_upto=0, serve_out_of_stock=True).withheld == frozenset()
