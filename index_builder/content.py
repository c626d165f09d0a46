"""The content model: a ridge regression from an item's categories and tags to the collaborative
(ALS) vector space, learnt on the items that have interactions.

The builder uses it to give cold items a vector; the snapshot stores it (`content_tokens.json`,
`content_weights.npy`), so the gateway gives an item created after the build a vector the same way
(gateway.catalog.view), and such an item takes part in similar items and new visitors' candidates
at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

Vectors = npt.NDArray[np.float32]
TOKENS_FILE = "content_tokens.json"
WEIGHTS_FILE = "content_weights.npy"


def category_rows(categories: Sequence[Sequence[str]]) -> sp.csr_matrix:
    """Categories x items, for ALS's input (`train.fit_item_vectors` with a content weight): each
    category (top-level parents included, as in `tokens`) a row over its items, each entry
    1/sqrt(the category's item count), so a large category adds no more to an item than a niche one
    does. Tags are left out: they are free text, and MovieLens's are user-applied (interactions
    with times, which a hold-out would leak through)."""
    names: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for item, found in enumerate(categories):
        for token in sorted(token for token in tokens(found, ()) if token.startswith("c:")):
            rows.append(names.setdefault(token, len(names)))
            cols.append(item)
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(names), len(categories)))
    sizes = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    scaled: sp.csr_matrix = sp.diags((1.0 / np.sqrt(np.maximum(sizes, 1.0))).astype(np.float32)) @ matrix
    return scaled.tocsr()


def with_category_rows(matrix: sp.spmatrix, content: sp.csr_matrix | None, weight: float) -> sp.csr_matrix:
    """`matrix` (users x items) with `content`'s rows (categories x the same items, `category_rows`)
    times `weight` below it, in `matrix`'s dtype: the input of ALS or EASE with category rows."""
    if content is None or content.shape[1] != matrix.shape[1]:
        raise ValueError("a content weight needs the category rows of the same items")
    stacked: sp.csr_matrix = sp.vstack([matrix, weight * content], format="csr", dtype=matrix.dtype)
    return stacked


def tokens(categories: Sequence[str], tags: Sequence[str]) -> set[str]:
    """What the regression reads of one item: its categories, their top-level parents, its tags."""
    found = {f"c:{c}" for c in categories} | {f"t:{t}" for t in tags}
    # A sub-category also says something about its parent ("electronics/phones" -> "electronics").
    found |= {f"c:{c.split('/')[0]}" for c in categories}
    return found


class ContentModel:
    """Token -> column of `weights` (tokens x factors): an item's vector is the sum of its tokens' rows."""

    def __init__(self, vocabulary: list[str], weights: Vectors) -> None:
        if len(vocabulary) != weights.shape[0]:
            raise ValueError("content model: vocabulary and weights do not match")
        self.vocabulary = vocabulary
        self.column = {token: column for column, token in enumerate(vocabulary)}
        self.weights = weights

    @property
    def factors(self) -> int:
        return int(self.weights.shape[1])

    def features(self, items: Sequence[tuple[Sequence[str], Sequence[str]]]) -> sp.csr_matrix:
        """Items ((categories, tags) each) x vocabulary, 1 where the item has the token; tokens the
        model never saw are left out."""
        rows: list[int] = []
        cols: list[int] = []
        for row, (categories, tags) in enumerate(items):
            for token in tokens(categories, tags):
                column = self.column.get(token)
                if column is not None:
                    rows.append(row)
                    cols.append(column)
        values = np.ones(len(rows), dtype=np.float32)
        return sp.csr_matrix((values, (rows, cols)), shape=(len(items), max(len(self.vocabulary), 1)))

    def vectors(self, items: Sequence[tuple[Sequence[str], Sequence[str]]]) -> Vectors:
        """The mapped vector of each item's content (zeros for an item with no known token)."""
        if not self.vocabulary:
            return np.zeros((len(items), self.factors), dtype=np.float32)
        return np.asarray(self.features(items) @ self.weights, dtype=np.float32)

    @classmethod
    def fit(
        cls,
        items: Sequence[tuple[Sequence[str], Sequence[str]]],
        item_vectors: Vectors,
        warm: npt.NDArray[np.bool_],
        ridge: float = 1.0,
    ) -> ContentModel:
        vocabulary: dict[str, int] = {}
        for categories, tags in items:
            for token in sorted(tokens(categories, tags)):
                vocabulary.setdefault(token, len(vocabulary))
        model = cls(list(vocabulary), np.zeros((len(vocabulary), item_vectors.shape[1]), dtype=np.float32))
        features = model.features(items)
        x = features[warm]
        y = item_vectors[warm].astype(np.float64)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += ridge
        weights = np.linalg.solve(gram, np.asarray(x.T @ y))
        if vocabulary:
            model.weights = weights.astype(np.float32)
        return model

    def save(self, directory: Path) -> None:
        (directory / TOKENS_FILE).write_bytes(msgspec.json.encode(self.vocabulary))
        np.save(directory / WEIGHTS_FILE, self.weights)

    @classmethod
    def load(cls, directory: Path) -> ContentModel:
        vocabulary = msgspec.json.decode((directory / TOKENS_FILE).read_bytes(), type=list[str])
        return cls(vocabulary, np.load(directory / WEIGHTS_FILE).astype(np.float32))


def content_vectors(
    items: Sequence[tuple[Sequence[str], Sequence[str]]],
    item_vectors: Vectors,
    warm: npt.NDArray[np.bool_],
    ridge: float = 1.0,
) -> tuple[Vectors, ContentModel]:
    """Vectors for cold items from their categories and tags, and the model that made them: the
    warm items keep their collaborative vectors, the cold ones get the mapped vector of their content."""
    model = ContentModel.fit(items, item_vectors, warm, ridge)
    mapped = model.vectors(items)
    return np.where(warm[:, None], item_vectors, mapped).astype(np.float32), model
