"""A published snapshot loaded for serving, and the holder that swaps it atomically.

Vectors, the seen-items matrix and the nearest-neighbour graph are memory-mapped, so `--workers N` processes
share one copy in the page cache. Loading runs in a worker thread (it reads and checksums files);
the swap itself is one attribute assignment on the event loop, so a request that already holds the
old snapshot finishes on it and the next one sees the new one.
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from index_builder import snapshot as published
from index_builder.ann import SIMILAR_NAME, ItemIndex, unit_rows
from index_builder.content import TOKENS_FILE, WEIGHTS_FILE, ContentModel
from index_builder.model import ModelParams, regularized_gram
from index_builder.schema import Attribute, Item
from index_builder.segments import SegmentModel

log = logging.getLogger("tailor.snapshot")

Rows = npt.NDArray[np.intp]
Vectors = npt.NDArray[np.float32]


class SnapshotRefusedError(Exception):
    """A snapshot that is missing, fails verification or cannot be read; `problems` says why."""

    def __init__(self, version: str | None, problems: list[str]) -> None:
        super().__init__(f"snapshot {version or '?'} refused: " + "; ".join(problems))
        self.version = version
        self.problems = problems


@dataclass(eq=False)
class Snapshot:
    version: str
    directory: Path
    created: float  # Unix seconds
    item_ids: list[str]
    titles: list[str]
    categories: list[list[str]]
    row_of: dict[str, int]
    # Each row's categories and their parents, for filtering candidates.
    category_sets: list[frozenset[str]]
    category_rows: dict[str, Rows]
    item_vectors: Vectors
    unit_vectors: Vectors  # row-normalised, for item-to-item cosine similarity
    user_row: dict[str, int]
    user_vectors: Vectors
    seen_indptr: npt.NDArray[np.int64]
    seen_indices: npt.NDArray[np.int32]
    popular: dict[str, Rows]
    popularity: npt.NDArray[np.float32]
    params: ModelParams
    event_weights: dict[str, float]
    gram: npt.NDArray[np.float64]
    gram_inverse: npt.NDArray[np.floating[Any]]  # for the fold-in (gateway.recommend.kernels.fold_in)
    index: ItemIndex  # nearest items by inner product (the manifest's choice), items added since included
    # Precomputed best unseen items of the most active known users (absent in older snapshots).
    pool_users: npt.NDArray[np.int32] | None = None
    pool_rows: npt.NDArray[np.int32] | None = None
    pool_scores: npt.NDArray[np.float32] | None = None
    # Each item's most similar items by cosine, best first (absent for huge catalogs).
    neighbour_rows: npt.NDArray[np.int32] | None = None
    neighbour_scores: npt.NDArray[np.float32] | None = None
    # Where the catalog is too large for those lists: nearest items by cosine, a graph over the unit
    # vectors (the manifest's `similar_index`); None means an exact scan.
    similar_index: ItemIndex | None = None
    pool_of_user: list[int] = field(default_factory=list)  # user row -> row in pool_rows, or -1
    # The build's behavioural clusters, to put visitors into `model:<k>` segments (absent in older
    # snapshots and in builds with --segments 0).
    segment_model: SegmentModel | None = None
    # Item attributes by row, for rules and filters: tags, price (nan: unknown), stock (-1: unknown).
    item_tags: list[frozenset[str]] = field(default_factory=list)
    tag_rows: dict[str, Rows] = field(default_factory=dict)  # tag -> the rows that carry it
    # Each row's other attributes (one shared empty dict where it has none), and the rows that carry
    # each attribute value, by attribute_key(name, value): what rules' attribute matches select.
    item_attributes: list[Mapping[str, Attribute]] = field(default_factory=list)
    attribute_rows: dict[str, Rows] = field(default_factory=dict)
    prices: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    stock: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # The build's categories/tags -> vector regression (absent in older snapshots): items created
    # after the build get their vectors from it (gateway.catalog.view).
    content: ContentModel | None = None
    # The live catalog over the build's (gateway.catalog.view): rows never served (unavailable or
    # out of stock), rows not available (the build's catalog says `available: false`, or a live
    # record retired them or says so), how many rows the build itself had (rows past it were added
    # live, and the build's neighbour lists and Annoy index do not know them), and the number up to
    # which every live change is applied.
    withheld: frozenset[int] = frozenset()
    unavailable: frozenset[int] = frozenset()
    built_rows: int = -1  # -1: every row (set in __post_init__)
    live_seq: int = 0
    # Filled by the HTTP layer as rows are served (gateway.api.encoding.encode_recommendations): a row's
    # encoded id, title and categories (by row: a list index is a third of a dict lookup's cache
    # misses on a 100k-item catalog), and each reason list, encoded once per snapshot.
    encoded_items: list[bytes | None] = field(default_factory=list)
    encoded_reasons: dict[str | tuple[str, ...], bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.built_rows < 0:
            self.built_rows = len(self.item_ids)
        if len(self.encoded_items) != len(self.item_ids):
            self.encoded_items = [None] * len(self.item_ids)
        if self.pool_users is not None and not self.pool_of_user:
            index = np.full(len(self.user_row), -1, dtype=np.int64)
            index[self.pool_users] = np.arange(len(self.pool_users))
            self.pool_of_user = index.tolist()

    def precomputed(self, user_row: int, size: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]] | None:
        """The build's `size` best unseen items for this user, best first, or None if it did not
        compute (as many for) them."""
        if self.pool_users is None or self.pool_rows is None or self.pool_scores is None:
            return None
        if self.pool_rows.shape[1] < min(size, len(self.item_ids)):
            return None
        at = self.pool_of_user[user_row]
        if at < 0:
            return None
        rows, scores = self.pool_rows[at, :size], self.pool_scores[at, :size]
        if len(scores) and not math.isfinite(scores[-1]):  # a user who has seen nearly everything: -inf fillers
            keep = np.isfinite(scores)
            return rows[keep], scores[keep]
        return rows, scores

    @property
    def method(self) -> str:
        return self.index.method

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created

    def seen(self, user_row: int) -> npt.NDArray[np.int32]:
        return self.seen_indices[self.seen_indptr[user_row] : self.seen_indptr[user_row + 1]]


def categories_with_parents(categories: list[str]) -> frozenset[str]:
    found = set(categories)
    for category in categories:
        parts = category.split("/")
        found.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    return frozenset(found)


NO_ATTRIBUTES: Mapping[str, Attribute] = {}


def attribute_key(name: str, value: Attribute) -> str:
    """How an attribute's value is indexed: `name=<JSON value>`, a whole number the same whether
    it was written 2 or 2.0."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{name}={msgspec.json.encode(value).decode()}"


def attribute_keys(attributes: Mapping[str, Attribute]) -> frozenset[str]:
    """The index keys of an item's attributes (a null value is no value)."""
    return frozenset(attribute_key(name, value) for name, value in attributes.items() if value is not None)


def rows_by_name(names_by_row: list[frozenset[str]]) -> dict[str, Rows]:
    """name -> the ascending rows whose set holds it."""
    found: dict[str, list[int]] = {}
    for row, names in enumerate(names_by_row):
        for name in names:
            found.setdefault(name, []).append(row)
    return {name: np.asarray(rows, dtype=np.intp) for name, rows in found.items()}


def load(directory: Path, *, verify: bool = True) -> Snapshot:
    """Read one snapshot directory; raise SnapshotRefusedError with every problem found."""
    version = directory.name
    if verify:
        problems = published.verify(directory)
        if problems:
            raise SnapshotRefusedError(version, problems)
    try:
        return _read(directory)
    except (OSError, ValueError, KeyError, IndexError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotRefusedError(version, [f"{directory}: unreadable: {exc}"]) from exc
    except published.SnapshotError as exc:
        raise SnapshotRefusedError(version, [str(exc)]) from exc


PAGE = mmap.PAGESIZE


def _mapped(path: Path) -> npt.NDArray[Any]:
    """A read-only memory map of a .npy file, as a plain ndarray: indexing a np.memmap goes through
    a Python-level __getitem__ on every call, which the hot path cannot afford.

    Every page is read once here, in the loading thread: a mapped page is otherwise faulted in on
    its first use, a microsecond each, and a new visitor's candidates touch a few hundred pages
    spread over the file, so early requests after a swap would pay for hundreds of faults each."""
    mapped: npt.NDArray[Any] = np.load(path, mmap_mode="r").view(np.ndarray)
    if mapped.size:
        flat = mapped.reshape(-1).view(np.uint8)
        int(flat[::PAGE].sum())  # one byte per page; the pages stay shared with other workers
    return mapped


def _read(directory: Path) -> Snapshot:
    manifest = published.load_manifest(directory)
    items = msgspec.json.decode((directory / "items.json").read_bytes(), type=list[Item])
    user_ids = msgspec.json.decode((directory / "users.json").read_bytes(), type=list[str])
    item_vectors: Vectors = _mapped(directory / "item_vectors.npy")
    user_vectors: Vectors = _mapped(directory / "user_vectors.npy")
    if item_vectors.shape != (len(items), item_vectors.shape[1]) or user_vectors.shape[0] != len(user_ids):
        raise ValueError("vector rows do not match the item or user table")
    seen_indptr = _mapped(directory / "seen_indptr.npy")
    seen_indices = _mapped(directory / "seen_indices.npy")
    if len(seen_indptr) != len(user_ids) + 1:
        raise ValueError("seen matrix does not match the user table")
    popularity = _mapped(directory / "popularity.npy")
    popular_lists = msgspec.json.decode((directory / "popular.json").read_bytes(), type=dict[str, list[int]])
    params = msgspec.convert(manifest.parameters["model"], ModelParams)
    weights = msgspec.convert(manifest.parameters["event_weights"], dict[str, float])

    category_sets = [categories_with_parents(item.categories) for item in items]
    members: dict[str, list[int]] = {}
    for row, found in enumerate(category_sets):
        for category in found:
            members.setdefault(category, []).append(row)
    unit_vectors = unit_rows(item_vectors)

    pools: dict[str, npt.NDArray[Any]] = {}
    if {"pool_users.npy", "pool_rows.npy", "pool_scores.npy"} <= manifest.files.keys():
        pools = {name: _mapped(directory / f"{name}.npy") for name in ("pool_users", "pool_rows", "pool_scores")}
        if not len(pools["pool_users"]) == len(pools["pool_rows"]) == len(pools["pool_scores"]):
            raise ValueError("precomputed pools do not match their user list")

    if {"neighbour_rows.npy", "neighbour_scores.npy"} <= manifest.files.keys():
        pools["neighbour_rows"] = _mapped(directory / "neighbour_rows.npy")
        pools["neighbour_scores"] = _mapped(directory / "neighbour_scores.npy")
        if pools["neighbour_rows"].shape[0] != len(items):
            raise ValueError("precomputed neighbours do not match the item table")

    segment_model = None
    if "segments.json" in manifest.files:
        segment_model = msgspec.json.decode((directory / "segments.json").read_bytes(), type=SegmentModel)

    content = None
    if {TOKENS_FILE, WEIGHTS_FILE} <= manifest.files.keys():
        content = ContentModel.load(directory)

    gram = regularized_gram(np.asarray(item_vectors), params.regularization)
    index = ItemIndex.load(directory, manifest.index, item_vectors)
    similar_index = None
    if manifest.similar_index.get("method") == "hnsw":
        similar_index = ItemIndex.load(directory, manifest.similar_index, unit_vectors, SIMILAR_NAME)
    tags = [frozenset(item.tags) for item in items]
    attributes = [item.attributes or NO_ATTRIBUTES for item in items]
    return Snapshot(
        version=manifest.version,
        directory=directory,
        created=manifest.created.timestamp(),
        item_ids=[item.item_id for item in items],
        titles=[item.title for item in items],
        categories=[item.categories for item in items],
        row_of={item.item_id: row for row, item in enumerate(items)},
        category_sets=category_sets,
        category_rows={name: np.asarray(rows, dtype=np.intp) for name, rows in members.items()},
        item_vectors=item_vectors,
        unit_vectors=unit_vectors,
        user_row={user: row for row, user in enumerate(user_ids)},
        user_vectors=user_vectors,
        seen_indptr=seen_indptr,
        seen_indices=seen_indices,
        popular={name: np.asarray(rows, dtype=np.intp) for name, rows in popular_lists.items()},
        popularity=popularity,
        params=params,
        event_weights=weights,
        gram=gram,
        gram_inverse=np.linalg.inv(gram),
        index=index,
        pool_users=pools.get("pool_users"),
        pool_rows=pools.get("pool_rows"),
        pool_scores=pools.get("pool_scores"),
        neighbour_rows=pools.get("neighbour_rows"),
        neighbour_scores=pools.get("neighbour_scores"),
        similar_index=similar_index,
        segment_model=segment_model,
        item_tags=tags,
        tag_rows=rows_by_name(tags),
        item_attributes=attributes,
        attribute_rows=rows_by_name([attribute_keys(a) for a in attributes]),
        prices=np.array([math.nan if item.price is None else item.price for item in items], dtype=np.float64),
        stock=np.array([-1 if item.stock is None else item.stock for item in items], dtype=np.int64),
        content=content,
        unavailable=frozenset(row for row, item in enumerate(items) if not item.available),
    )


def current_version(root: Path) -> str | None:
    """The version CURRENT names (None without the pointer); SnapshotRefusedError when it points
    outside the root."""
    try:
        return published.current_version(root)
    except published.SnapshotError as exc:
        raise SnapshotRefusedError(None, [str(exc)]) from None


def load_current(root: Path, *, verify: bool = True) -> tuple[Snapshot, list[SnapshotRefusedError]]:
    """The snapshot CURRENT names; if it is refused, the newest older one that loads, so a bad
    publish never keeps a restarted gateway down. Also returns what was refused on the way."""
    version = current_version(root)  # a pointer out of the root is refused like a missing one
    if version is None:
        raise SnapshotRefusedError(None, [f"no {published.POINTER} pointer under {root}; run `tailor build` first"])
    try:
        return load(root / version, verify=verify), []
    except SnapshotRefusedError as refused:
        log.error("%s", refused)
        refusals = [refused]
        for directory in reversed(published.list_versions(root)):
            if directory.name >= version:
                continue
            try:
                snap = load(directory, verify=verify)
            except SnapshotRefusedError as older:
                log.error("%s", older)
                refusals.append(older)
                continue
            log.warning("serving older snapshot %s because %s was refused", directory.name, version)
            return snap, refusals
        raise
