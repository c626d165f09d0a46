"""Interactions as parallel numpy arrays, the shape every training and evaluation step shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
TimeArray = npt.NDArray[np.int64]

# A visit: one user's events at most VISIT_GAP_S apart, cut after VISIT_EVENTS of them (a long
# sitting, such as a MovieLens user rating a hundred films, is several visits).
VISIT_GAP_S = 1800
VISIT_EVENTS = 20


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
        return _binary_matrix(self.user, self.item, (self.n_users, self.n_items))

    def visit_matrix(self) -> sp.csr_matrix:
        """Binary visits x items matrix: one row per visit (VISIT_GAP_S, VISIT_EVENTS), the items
        met in it. Items of one visit are related as items of one history are, and more closely."""
        order = self.chronological_order()
        user, ts = self.user[order], self.ts[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > VISIT_GAP_S)
        first = np.flatnonzero(starts)
        position = np.arange(len(order)) - first[np.cumsum(starts) - 1]  # within the unbroken run
        row = np.cumsum(position % VISIT_EVENTS == 0) - 1
        return _binary_matrix(row, self.item[order], (int(row[-1]) + 1 if len(row) else 0, self.n_items))


def _binary_matrix(
    rows: npt.NDArray[np.integer], columns: npt.NDArray[np.integer], shape: tuple[int, int]
) -> sp.csr_matrix:
    """1 where a (row, column) pair occurs, however often."""
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=shape)
    matrix.data[:] = 1.0
    return matrix


def history_positions(data: Interactions) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Chronological order, and for each row in that order its position in the user's history
    and how many of the user's events come after it."""
    order = data.chronological_order()
    users = data.user[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, counts)
    events_after = np.repeat(counts, counts) - 1 - position
    return order, position.astype(np.int64), events_after.astype(np.int64)


def temporal_split(data: Interactions, test_fraction: float = 0.2) -> tuple[Interactions, Interactions]:
    """Each user's last `test_fraction` of interactions by time form the test set.

    Users with fewer than two interactions stay entirely in training: one event cannot be split.
    """
    order, position, events_after = history_positions(data)
    counts = position + events_after + 1
    n_test = np.floor(counts * test_fraction).astype(np.int64)
    n_test[(n_test == 0) & (counts >= 2)] = 1
    is_test = np.zeros(len(data), dtype=bool)
    is_test[order] = events_after < n_test
    return data.take(~is_test), data.take(is_test)


def random_split(data: Interactions, test_fraction: float = 0.2, seed: int = 0) -> tuple[Interactions, Interactions]:
    """A seeded random `test_fraction` of each user's interactions form the test set, whenever they
    happened: the hold-out of benchmarks that ignore time. The same rounding as `temporal_split`."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(data)), data.user))
    users = data.user[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, counts)
    per_row = np.repeat(counts, counts)
    n_test = np.floor(per_row * test_fraction).astype(np.int64)
    n_test[(n_test == 0) & (per_row >= 2)] = 1
    is_test = np.zeros(len(data), dtype=bool)
    is_test[order] = position < n_test
    return data.take(~is_test), data.take(is_test)


def user_sample(data: Interactions, max_interactions: int, seed: int = 0) -> Interactions:
    """The whole histories of a seeded random subset of users, about `max_interactions` in all, with
    users and items renumbered to those present (all of `data` when it is that small already).

    Tuning compares settings with each other, so a sample of users ranks them as the full data
    would at a fraction of the cost; histories stay whole, so each sampled user's split is the one
    the full data gives them. `sampled_items` gives the sample's items' rows in `data`.
    """
    if len(data) <= max_interactions:
        return data
    kept = data.take(_sampled_users(data, max_interactions, seed)[data.user])
    users, user = np.unique(kept.user, return_inverse=True)
    items, item = np.unique(kept.item, return_inverse=True)
    return Interactions(user.astype(np.int32), item.astype(np.int32), kept.weight, kept.ts, len(users), len(items))


def sampled_items(data: Interactions, max_interactions: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """The rows in `data` of `user_sample`'s items, in the sample's order."""
    if len(data) <= max_interactions:
        return np.arange(data.n_items, dtype=np.int64)
    chosen = _sampled_users(data, max_interactions, seed)
    return np.unique(data.item[chosen[data.user]]).astype(np.int64)


def _sampled_users(data: Interactions, max_interactions: int, seed: int) -> npt.NDArray[np.bool_]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(data.n_users)
    per_user = np.bincount(data.user, minlength=data.n_users)
    cumulative = np.cumsum(per_user[order])
    chosen = np.zeros(data.n_users, dtype=bool)
    chosen[order[: int(np.searchsorted(cumulative, max_interactions)) + 1]] = True
    return chosen
