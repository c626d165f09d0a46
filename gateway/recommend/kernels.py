"""Compiled kernels (numba) for the steps of a request that numpy can only do as dozens of small
calls: a new visitor's candidate pool (`fold_in`, `live_pool`).

In numpy a new visitor's pool is about 45 calls: fold the visitor in, gather the candidate rows,
sort and deduplicate them, score, sort the scores, cut. Each costs a microsecond or more of call
overhead, several once the interpreter's own work has pushed the arrays out of the CPU caches, for
little arithmetic; here it is two compiled calls around one numpy sort.

The numpy versions stay the definition: `index_builder.model.fold_in_low_rank` and the pipeline
tests/test_kernels.py spells out; the tests compare the kernels with them.
Kernels compile on first use and are cached on disk (numba's `cache=True`: a second process loads
them in well under a second); `warm_up` compiles them in the thread that loads a snapshot, so no
request pays for it, and says so while it does. `tailor warm` (which `make serve` runs) compiles them
before the gateway starts; the cache sits in `__pycache__` beside this file, or NUMBA_CACHE_DIR.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import numba
import numpy as np
import numpy.typing as npt

log = logging.getLogger("tailor.kernels")

# Said only when a warm-up outlasts this: loading every kernel from numba's cache takes well under it.
SLOW_WARM_UP_S = 1.0
PROGRESS_EVERY_S = 10.0  # while compiling, a line this often: a long wait is never a silent one
COMPILING = "compiling kernels (first start only, up to a minute here; later starts load them from numba's cache)…"


def _fold_in(
    item_vectors: Any, gram_inverse: Any, items: Any, confidence: Any
) -> Any:  # pragma: no cover - compiled below; the interpreted body is what numba compiles
    """fold_in_low_rank (index_builder.model), the same Woodbury update, in one call."""
    m = len(items)
    k = item_vectors.shape[1]
    y = np.empty((m, k), dtype=np.float64)
    for a in range(m):
        for j in range(k):
            y[a, j] = item_vectors[items[a], j]
    p = gram_inverse @ np.ascontiguousarray(y.T)  # k x m
    x0 = p @ confidence
    d = confidence - 1.0
    r = d * (y @ x0)
    s = y @ p
    for a in range(m):
        for b in range(m):
            s[a, b] *= d[a]
        s[a, a] += 1.0
    correction = r / s[0, 0] if m == 1 else np.linalg.solve(s, r)
    x = x0 - p @ correction
    return x.astype(np.float32)


def _live_keys(  # noqa: PLR0917 - numba's dispatcher takes arguments by position
    item_vectors: Any,
    gram_inverse: Any,
    items: Any,
    confidence: Any,
    neighbour_rows: Any,
    neighbours: int,
    base: Any,
    marks: Any,
) -> Any:  # pragma: no cover - compiled below
    """The candidates of a folded-in visitor, each as a sort key (the score's `_ordered` bits over
    the row: ascending keys are best first, ties by row): the first
    `neighbours` neighbours of each of `items` and the rows of `base` (popular rows), distinct,
    without `items`. `marks` (one byte per catalog row, all 0) is used as scratch and left all 0."""
    x = _fold_in_compiled(item_vectors, gram_inverse, items, confidence)
    m = len(items)
    width = min(neighbours, neighbour_rows.shape[1])
    for a in range(m):
        marks[items[a]] = 1
    rows = np.empty(m * width + len(base), dtype=np.int64)
    count = 0
    for a in range(m):
        for j in range(width):
            row = neighbour_rows[items[a], j]
            if not marks[row]:
                marks[row] = 1
                rows[count] = row
                count += 1
    for j in range(len(base)):
        row = base[j]
        if not marks[row]:
            marks[row] = 1
            rows[count] = row
            count += 1
    for a in range(m):
        marks[items[a]] = 0
    negated = np.empty(count, dtype=np.float32)
    for j in range(count):
        marks[rows[j]] = 0
        value = -_dot_compiled(item_vectors[rows[j]], x)
        negated[j] = value if value != 0.0 else np.float32(0.0)  # -0.0 ties with 0.0
    bits = negated.view(np.uint32)
    keys = np.empty(count, dtype=np.uint64)
    for j in range(count):
        keys[j] = (np.uint64(_ordered_compiled(bits[j])) << np.uint64(32)) | np.uint64(rows[j])
    return keys


def _ordered(bits: Any) -> Any:  # pragma: no cover - compiled below
    """A float32's bits as an unsigned number that sorts as the float does."""
    return ~bits if bits & np.uint32(0x80000000) else bits | np.uint32(0x80000000)


def _unkey(keys: Any, size: int) -> Any:  # pragma: no cover - compiled below
    """The rows and scores of the first `size` of sorted `_live_keys`."""
    size = min(size, len(keys))
    rows = np.empty(size, dtype=np.int32)
    bits = np.empty(size, dtype=np.uint32)
    for j in range(size):
        key = keys[j]
        rows[j] = np.int32(key & np.uint64(0xFFFFFFFF))
        high = np.uint32(key >> np.uint64(32))
        bits[j] = high & np.uint32(0x7FFFFFFF) if high & np.uint32(0x80000000) else ~high
    return rows, -bits.view(np.float32)


def _dot(a: Any, b: Any) -> Any:  # pragma: no cover - compiled below
    """a · b in float32, summed in any order (so the compiler may use vector registers)."""
    total = np.float32(0.0)
    for i in range(len(a)):
        total += a[i] * b[i]
    return total


_dot_compiled = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})(_dot)
_fold_in_compiled = numba.njit(cache=True, nogil=True)(_fold_in)
_ordered_compiled = numba.njit(cache=True, nogil=True)(_ordered)
_live_keys_compiled = numba.njit(cache=True, nogil=True)(_live_keys)
_unkey_compiled = numba.njit(cache=True, nogil=True)(_unkey)


def fold_in(
    item_vectors: npt.NDArray[np.float32],
    gram_inverse: npt.NDArray[np.floating[Any]],
    items: npt.NDArray[np.int64],
    confidence: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """A visitor's taste vector from their items (ascending, distinct, at least one) and the
    confidence of each: index_builder.model.fold_in_low_rank, compiled."""
    return cast("npt.NDArray[np.float32]", _fold_in_compiled(item_vectors, gram_inverse, items, confidence))


def live_pool(
    item_vectors: npt.NDArray[np.float32],
    gram_inverse: npt.NDArray[np.floating[Any]],
    items: npt.NDArray[np.int64],
    confidence: npt.NDArray[np.float64],
    *,
    neighbour_rows: npt.NDArray[np.int32],
    neighbours: int,
    base: npt.NDArray[np.int64],
    size: int,
    marks: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """A new visitor's candidate pool: the `size` best of the candidates `_live_keys` gathers and
    scores, best first, ties by row. The keys are sorted by numpy (its vectorised sort takes a
    microsecond or two where numba's takes several)."""
    keys = _live_keys_compiled(item_vectors, gram_inverse, items, confidence, neighbour_rows, neighbours, base, marks)
    keys.sort()
    rows, scores = _unkey_compiled(keys, size)
    return rows, scores


def compiled() -> int:
    """How many kernel signatures this process has compiled rather than loaded from numba's cache."""
    dispatchers = [value for value in globals().values() if isinstance(value, numba.core.dispatcher.Dispatcher)]
    return sum(sum(dispatcher.stats.cache_misses.values()) for dispatcher in dispatchers)


def warm_up(
    item_vectors: npt.NDArray[np.float32],
    gram_inverse: npt.NDArray[np.floating[Any]],
    neighbour_rows: Any,
    *,
    say: Callable[[str], None] = log.info,
) -> int:
    """Compile (or load from numba's cache) the kernels for these arrays' types, off the event loop;
    how many had to be compiled. A first start compiles for about a minute: `say` tells so when it
    takes more than SLOW_WARM_UP_S, how far it got every PROGRESS_EVERY_S, and when it is done, so
    nobody waits on a silent process."""
    before = compiled()
    started = time.monotonic()
    done = threading.Event()

    def progress() -> None:
        if done.wait(SLOW_WARM_UP_S):
            return
        say(COMPILING)
        while not done.wait(PROGRESS_EVERY_S):
            say(f"still compiling kernels: {compiled() - before} so far, {time.monotonic() - started:.0f} s")

    reporter = threading.Thread(target=progress, name="kernel-warm-up-progress", daemon=True)
    reporter.start()
    try:
        _warm_up(item_vectors, gram_inverse, neighbour_rows)
    finally:
        done.set()
        reporter.join()
    fresh = compiled() - before
    if fresh:
        say(f"compiled {fresh} kernels in {time.monotonic() - started:.0f} s; cached for later starts")
    return fresh


def _warm_up(
    item_vectors: npt.NDArray[np.float32], gram_inverse: npt.NDArray[np.floating[Any]], neighbour_rows: Any
) -> None:
    items = np.zeros(1, dtype=np.int64)
    confidence = np.ones(1, dtype=np.float64)
    fold_in(item_vectors, gram_inverse, items, confidence)
    if neighbour_rows is not None:
        marks = np.zeros(len(item_vectors), dtype=np.uint8)
        live_pool(
            item_vectors,
            gram_inverse,
            items,
            confidence,
            neighbour_rows=neighbour_rows,
            neighbours=1,
            base=items,
            size=1,
            marks=marks,
        )
