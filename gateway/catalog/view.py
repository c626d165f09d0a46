"""The catalog a node serves: its snapshot with the live records newer than it applied (`derive`).

The view is a new `Snapshot` object sharing everything the records do not touch with the one it is
made from (vectors stay memory-mapped until an item is added); it is served through the same swap
as a new snapshot (gateway.runtime), so a request sees one catalog from start to end, the rules are
compiled against the current prices, stock, categories and tags, and every cached answer goes with
the old view. Made in a worker thread: at 100k items a few tens of milliseconds, more while items
are being added (their rows copy the vectors).

- A changed item keeps its row; its title, categories, tags, price and stock are the record's.
- A created item gets the next row and its vector from the snapshot's content model (the build's
  categories/tags regression; zeros with an older snapshot, which has none): it is among the
  similar items of related items, the popular lists of its categories (last: it has no
  popularity yet) and new visitors' candidates, and rules may pin or inject it.
- Rows no route may serve (`Snapshot.withheld`): retired and unavailable items, and items with stock
  0 unless `serve_out_of_stock` (the snapshot's own stock counts too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.snapshot import Rows, Snapshot, categories_with_parents
from index_builder.schema import LiveItem


def derive(base: Snapshot, records: Iterable[tuple[int, LiveItem]], *, serve_out_of_stock: bool) -> Snapshot:
    """`base` (a snapshot as loaded) with `records` ((seq, item), oldest change first) applied: only
    those changed after the snapshot was made (it may already hold the older ones)."""
    fresh = [(seq, item) for seq, item in records if item.changed > base.created]
    item_ids, titles = list(base.item_ids), list(base.titles)
    categories, category_sets, item_tags = list(base.categories), list(base.category_sets), list(base.item_tags)
    encoded = list(base.encoded_items)
    row_of = base.row_of
    prices, stock = base.prices.copy(), base.stock.copy()
    off = set(base.unavailable)
    added: list[LiveItem] = []
    moved: dict[tuple[str, str], tuple[list[int], list[int]]] = {}  # (index, name) -> rows out, rows in
    grown_prices: list[float] = []
    grown_stock: list[int] = []
    for _, item in fresh:
        row = row_of.get(item.item_id)
        if row is None:
            if item.retired:
                continue  # never served, not even known
            if row_of is base.row_of:
                row_of = dict(base.row_of)
            row = row_of[item.item_id] = len(item_ids)
            item_ids.append(item.item_id)
            titles.append(item.title)
            categories.append(item.categories)
            category_sets.append(frozenset())
            item_tags.append(frozenset())
            encoded.append(None)
            added.append(item)
            grown_prices.append(np.nan)
            grown_stock.append(-1)
        new_sets = categories_with_parents(item.categories)
        new_tags = frozenset(item.tags)
        for index, old, new in (("category", category_sets[row], new_sets), ("tag", item_tags[row], new_tags)):
            for name in old - new:
                moved.setdefault((index, name), ([], []))[0].append(row)
            for name in new - old:
                moved.setdefault((index, name), ([], []))[1].append(row)
        titles[row], categories[row], category_sets[row], item_tags[row] = (
            item.title,
            item.categories,
            new_sets,
            new_tags,
        )
        encoded[row] = None  # encoded again as served (gateway.api.wire)
        price = np.nan if item.price is None else item.price
        count = -1 if item.stock is None else item.stock
        if row < len(prices):
            prices[row], stock[row] = price, count
        else:
            grown_prices[row - len(prices)], grown_stock[row - len(stock)] = price, count
        if item.retired or not item.available:
            off.add(row)
        else:
            off.discard(row)
    if grown_prices:
        prices = np.concatenate([prices, np.array(grown_prices, dtype=np.float64)])
        stock = np.concatenate([stock, np.array(grown_stock, dtype=np.int64)])

    category_rows = _moved(base.category_rows, moved, "category")
    tag_rows = _moved(base.tag_rows, moved, "tag")
    if not serve_out_of_stock:
        off.update(np.flatnonzero(stock == 0).tolist())
    withheld = frozenset(off)

    changes: dict[str, Any] = {}
    if added:
        changes = _grown(base, added, len(item_ids))
    popular = _popular(base, moved, range(len(base.item_ids), len(item_ids)), withheld)
    return dataclasses.replace(
        base,
        item_ids=item_ids,
        titles=titles,
        categories=categories,
        row_of=row_of,
        category_sets=category_sets,
        category_rows=category_rows,
        item_tags=item_tags,
        tag_rows=tag_rows,
        prices=prices,
        stock=stock,
        popular=popular,
        encoded_items=encoded,
        withheld=withheld,
        built_rows=base.built_rows,
        live_seq=max((seq for seq, _ in fresh), default=0),
        **changes,
    )


def _moved(
    index: dict[str, Rows], moved: dict[tuple[str, str], tuple[list[int], list[int]]], kind: str
) -> dict[str, Rows]:
    """`index` (name -> ascending rows) with rows taken out of and put into the names they left or joined."""
    names = [(name, out, into) for (which, name), (out, into) in moved.items() if which == kind]
    if not names:
        return index
    changed = dict(index)
    for name, out, into in names:
        rows = index.get(name, np.empty(0, dtype=np.intp))
        if out:
            rows = rows[~np.isin(rows, out)]
        if into:
            rows = np.union1d(rows, np.asarray(into, dtype=np.intp)).astype(np.intp)
        if len(rows):
            changed[name] = rows
        else:
            changed.pop(name, None)
    return changed


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # Read-only like the memory-mapped arrays they replace: the compiled kernels were made for
    # read-only arrays, and a writable one would make them compile again on the event loop.
    array.setflags(write=False)
    return array


def _grown(base: Snapshot, added: list[LiveItem], rows: int) -> dict[str, Any]:
    """The arrays with a row per catalog row, grown by the added items."""
    content = base.content
    if content is not None and content.factors == base.item_vectors.shape[1]:
        vectors = content.vectors([(item.categories, item.tags) for item in added])
    else:
        vectors = np.zeros((len(added), base.item_vectors.shape[1]), dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    units = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    grown: dict[str, Any] = {
        "item_vectors": _frozen(np.concatenate([base.item_vectors, vectors])),
        "unit_vectors": np.concatenate([base.unit_vectors, units]),
        "popularity": _frozen(np.concatenate([base.popularity, np.zeros(len(added), dtype=base.popularity.dtype)])),
    }
    if base.neighbour_rows is not None and base.neighbour_scores is not None:
        # An added row's own list names only itself (a fold-in never gathers a visitor's own items):
        # its neighbours are found by Candidates.with_added, not from the build's lists.
        width = base.neighbour_rows.shape[1]
        own = np.repeat(np.arange(len(base.item_ids), rows, dtype=np.int32)[:, None], width, axis=1)
        grown["neighbour_rows"] = _frozen(np.concatenate([base.neighbour_rows, own]))
        grown["neighbour_scores"] = _frozen(
            np.concatenate([base.neighbour_scores, np.full(own.shape, -np.inf, dtype=np.float32)])
        )
    return grown


def _popular(
    base: Snapshot,
    moved: dict[tuple[str, str], tuple[list[int], list[int]]],
    added: range,
    withheld: frozenset[int],
) -> dict[str, Rows]:
    """The popular lists without withheld rows and without items in the categories they left; items
    joining a category go last in its list (ranked by popularity when served: gateway.recommend.popular),
    added items last in the list of all items too (they have no popularity yet)."""
    left = {name: out for (kind, name), (out, _) in moved.items() if kind == "category" and out}
    joined = {name: into for (kind, name), (_, into) in moved.items() if kind == "category" and into}
    if len(added):
        joined[""] = list(added)
    served = np.ones(added.stop, dtype=bool)  # by row: one mask, not a set operation per list
    served[list(withheld)] = False
    popular: dict[str, Rows] = {}
    for name in base.popular.keys() | joined.keys():
        rows = base.popular.get(name, np.empty(0, dtype=np.intp))
        if withheld:
            rows = rows[served[rows]]
        if name in left:
            rows = rows[~np.isin(rows, left[name])]
        more = [row for row in joined.get(name, ()) if row not in withheld]
        popular[name] = np.concatenate([rows, np.asarray(more, dtype=np.intp)]) if more else rows
    return popular
