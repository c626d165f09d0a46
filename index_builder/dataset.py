"""Interactions as parallel numpy arrays, the shape every training and evaluation step shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
TimeArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Interactions:
    """One row per cleaned event: who, what, how much it counts, and when (epoch seconds, UTC)."""

    user: IntArray
    item: IntArray
    weight: FloatArray
    ts: TimeArray
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, mask: npt.NDArray[np.bool_]) -> Interactions:
        return Interactions(
            self.user[mask], self.item[mask], self.weight[mask], self.ts[mask], self.n_users, self.n_items
        )

    def chronological_order(self) -> npt.NDArray[np.intp]:
        """Indices sorting the rows by user, then time (stable, so ties keep input order)."""
        return np.lexsort((self.ts, self.user))

    def seen_matrix(self) -> sp.csr_matrix:
        """Binary users x items matrix of what each user interacted with."""
        ones = np.ones(len(self), dtype=np.float32)
        matrix = sp.csr_matrix((ones, (self.user, self.item)), shape=(self.n_users, self.n_items))
        matrix.data[:] = 1.0
        return matrix


def temporal_split(data: Interactions, test_fraction: float = 0.2) -> tuple[Interactions, Interactions]:
    """Each user's last `test_fraction` of interactions by time form the test set.

    Users with fewer than two interactions stay entirely in training: one event cannot be split.
    """
    order = data.chronological_order()
    users = data.user[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    n_test = np.floor(counts * test_fraction).astype(np.int64)
    n_test[(n_test == 0) & (counts >= 2)] = 1
    position = np.arange(len(users)) - np.repeat(starts, counts)
    is_test_sorted = position >= np.repeat(counts - n_test, counts)
    is_test = np.zeros(len(users), dtype=bool)
    is_test[order] = is_test_sorted
    return data.take(~is_test), data.take(is_test)
