"""The catalog a node serves: its snapshot with the live records newer than it applied (`derive`).

A view is a new `Snapshot` object sharing everything the records do not touch with the one it is
made from (vectors stay memory-mapped until an item is added), and is made from the view before it
with only the records that came since (or from a newly loaded snapshot with all of them), so its
cost grows with the catalog's size (list and array copies, in C) and the changes since, not with
every change ever made. It is served through the same swap as a new snapshot (gateway.runtime), so
a request sees one catalog from start to end, the rules are compiled against the current prices,
stock, categories and tags, and every cached answer goes with the old view. Made in a worker
thread: 15 ms at 20,000 items.

- A changed item keeps its row; its title, categories, tags, price, stock and other attributes
  are the record's.
- A created item gets the next row and its vector from the snapshot's content model (the build's
  categories/tags regression; zeros with an older snapshot, which has none): it is among the
  similar items of related items, the popular lists of its categories (last: it has no
  popularity yet) and new visitors' candidates, and rules may pin or inject it.
- Rows no route may serve (`Snapshot.withheld`): retired and unavailable items (`Snapshot.unavailable`
  of the view), and items with stock 0 unless `serve_out_of_stock` (the snapshot's own stock counts
  too). The recommender leaves them out of every list (gateway.recommend.pipeline, popular).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.snapshot import NO_ATTRIBUTES, Rows, Snapshot, attribute_keys, categories_with_parents
from index_builder.ann import unit_rows
from index_builder.schema import LiveItem


def derive(
    prev: Snapshot, records: Iterable[tuple[int, LiveItem]], *, read_upto: int, serve_out_of_stock: bool
) -> Snapshot:
    """`prev` (a snapshot as loaded, or a view of one) with `records` ((seq, item), oldest change
    first) applied: those numbered after `prev.live_seq` and changed after the snapshot was made (it
    may already hold the older ones). Every change up to `read_upto` must be among `records` or
    applied to `prev`: the next view starts after it. Applying a record twice changes nothing."""
    fresh = [item for seq, item in records if seq > prev.live_seq and item.changed > prev.created]
    item_ids, titles = list(prev.item_ids), list(prev.titles)
    categories, category_sets, item_tags = list(prev.categories), list(prev.category_sets), list(prev.item_tags)
    attributes = list(prev.item_attributes)
    encoded = list(prev.encoded_items)
    row_of = prev.row_of
    prices, stock = prev.prices.copy(), prev.stock.copy()
    off = set(prev.unavailable)
    added: list[LiveItem] = []
    recontent: dict[int, LiveItem] = {}  # rows added before whose categories or tags changed
    moved: dict[tuple[str, str], tuple[list[int], list[int]]] = {}  # (index, name) -> rows out, rows in
    grown_prices: list[float] = []
    grown_stock: list[int] = []
    first_added = len(prev.item_ids)
    for item in fresh:
        row = row_of.get(item.item_id)
        if row is None:
            if item.retired:
                continue  # never served, not even known
            if row_of is prev.row_of:
                row_of = dict(prev.row_of)
            row = row_of[item.item_id] = len(item_ids)
            item_ids.append(item.item_id)
            titles.append(item.title)
            categories.append(item.categories)
            category_sets.append(frozenset())
            item_tags.append(frozenset())
            attributes.append(NO_ATTRIBUTES)
            encoded.append(None)
            added.append(item)
            grown_prices.append(np.nan)
            grown_stock.append(-1)
        new_sets = categories_with_parents(item.categories)
        new_tags = frozenset(item.tags)
        old_sets, old_tags = category_sets[row], item_tags[row]
        if new_sets != old_sets or new_tags != old_tags:
            for index, old, new in (("category", old_sets, new_sets), ("tag", old_tags, new_tags)):
                for name in old - new:
                    moved.setdefault((index, name), ([], []))[0].append(row)
                for name in new - old:
                    moved.setdefault((index, name), ([], []))[1].append(row)
            if prev.built_rows <= row < first_added:
                recontent[row] = item
        new_attributes = item.attributes or NO_ATTRIBUTES
        if new_attributes != attributes[row]:
            old_keys, new_keys = attribute_keys(attributes[row]), attribute_keys(new_attributes)
            for name in old_keys - new_keys:
                moved.setdefault(("attribute", name), ([], []))[0].append(row)
            for name in new_keys - old_keys:
                moved.setdefault(("attribute", name), ([], []))[1].append(row)
            attributes[row] = new_attributes
        if titles[row] != item.title or categories[row] != item.categories:
            encoded[row] = None  # encoded again as served (gateway.api.wire)
        titles[row], categories[row], category_sets[row], item_tags[row] = (
            item.title,
            item.categories,
            new_sets,
            new_tags,
        )
        price = np.nan if item.price is None else item.price
        count = -1 if item.stock is None else item.stock
        if row < first_added:
            prices[row], stock[row] = price, count
        else:
            grown_prices[row - first_added], grown_stock[row - first_added] = price, count
        if item.retired or not item.available:
            off.add(row)
        else:
            off.discard(row)
    if grown_prices:
        prices = np.concatenate([prices, np.array(grown_prices, dtype=np.float64)])
        stock = np.concatenate([stock, np.array(grown_stock, dtype=np.int64)])
    withheld = set(off)
    if not serve_out_of_stock:
        withheld.update(np.flatnonzero(stock == 0).tolist())

    changes: dict[str, Any] = {}
    if added or recontent:
        changes = _vectors(prev, added, recontent)
    return dataclasses.replace(
        prev,
        item_ids=item_ids,
        titles=titles,
        categories=categories,
        row_of=row_of,
        category_sets=category_sets,
        category_rows=_moved(prev.category_rows, moved, "category"),
        item_tags=item_tags,
        tag_rows=_moved(prev.tag_rows, moved, "tag"),
        item_attributes=attributes,
        attribute_rows=_moved(prev.attribute_rows, moved, "attribute"),
        prices=prices,
        stock=stock,
        popular=_popular(prev, moved, range(first_added, len(item_ids))),
        encoded_items=encoded,
        withheld=frozenset(withheld),
        unavailable=frozenset(off),
        live_seq=max(prev.live_seq, read_upto),
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


def _content_vectors(prev: Snapshot, items: list[LiveItem]) -> npt.NDArray[np.float32]:
    content, width = prev.content, prev.item_vectors.shape[1]
    if content is not None and content.factors == width and items:
        return content.vectors([(item.categories, item.tags) for item in items])
    return np.zeros((len(items), width), dtype=np.float32)


def _vectors(prev: Snapshot, added: list[LiveItem], recontent: dict[int, LiveItem]) -> dict[str, Any]:
    """The arrays with a row per catalog row, grown by the added items, and the vectors of the
    items added before whose content changed made again."""
    vectors = _content_vectors(prev, added)
    units = unit_rows(vectors)
    item_vectors = np.concatenate([prev.item_vectors, vectors])
    unit_vectors = np.concatenate([prev.unit_vectors, units])
    if recontent:
        rows = np.fromiter(recontent, dtype=np.intp, count=len(recontent))
        again = _content_vectors(prev, list(recontent.values()))
        item_vectors[rows] = again
        unit_vectors[rows] = unit_rows(again)
    grown: dict[str, Any] = {"item_vectors": _frozen(item_vectors), "unit_vectors": unit_vectors}
    if not added:
        return grown
    grown["popularity"] = _frozen(np.concatenate([prev.popularity, np.zeros(len(added), dtype=prev.popularity.dtype)]))
    if prev.neighbour_rows is not None and prev.neighbour_scores is not None:
        # An added row's own list names only itself (a fold-in never gathers a visitor's own items):
        # its neighbours are found by Candidates.with_added, not from the build's lists.
        width = prev.neighbour_rows.shape[1]
        first = len(prev.item_ids)
        own = np.repeat(np.arange(first, first + len(added), dtype=np.int32)[:, None], width, axis=1)
        grown["neighbour_rows"] = _frozen(np.concatenate([prev.neighbour_rows, own]))
        grown["neighbour_scores"] = _frozen(
            np.concatenate([prev.neighbour_scores, np.full(own.shape, -np.inf, dtype=np.float32)])
        )
    return grown


def _popular(
    prev: Snapshot, moved: dict[tuple[str, str], tuple[list[int], list[int]]], added: range
) -> dict[str, Rows]:
    """The popular lists without items in the categories they left; items joining a category go
    last in its list (ranked by popularity when served: gateway.recommend.popular), added items last
    in the list of all items too (they have no popularity yet). Withheld rows stay in: the
    recommender leaves them out (they may be served again)."""
    left = {name: out for (kind, name), (out, _) in moved.items() if kind == "category" and out}
    joined = {name: into for (kind, name), (_, into) in moved.items() if kind == "category" and into}
    if len(added):
        joined[""] = list(added)
    if not left and not joined:
        return prev.popular
    popular = dict(prev.popular)
    for name in left.keys() | joined.keys():
        rows = popular.get(name, np.empty(0, dtype=np.intp))
        if name in left:
            rows = rows[~np.isin(rows, left[name])]
        more = joined.get(name)
        popular[name] = np.concatenate([rows, np.asarray(more, dtype=np.intp)]) if more else rows
    return popular
