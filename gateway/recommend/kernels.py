"""Compiled kernels (numba) for the steps of a request that numpy can only do as dozens of small
calls: a new visitor's candidate pool (`fold_in`, `live_pool`) and a rule plan's selection over the
candidates (`select`, see gateway.rules.decision).

A new visitor's pool took about 45 numpy calls: fold the visitor in, gather the candidate rows,
sort and deduplicate them, score, sort the scores, cut. Each costs a microsecond or more of call
overhead, several once the interpreter's own work has pushed the arrays out of the CPU caches, so
the pool took 80-100 µs inside a request for about 15 µs of arithmetic. Here it is two compiled
calls around one numpy sort: about 10 µs alone, 30 µs inside a request (measured on the benchmark
shop; see the README's "Serving performance").

The numpy versions stay the definition: `index_builder.model.fold_in_low_rank`, the pipeline
tests/test_kernels.py spells out and `Ruling.in_numpy`; the tests compare the kernels with them.
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

from gateway.rules import placing

log = logging.getLogger("tailor.kernels")

# Said only when a warm-up outlasts this: loading every kernel from numba's cache takes well under it.
SLOW_WARM_UP_S = 1.0
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
    dispatchers = [
        value
        for module in (globals(), vars(placing))
        for value in module.values()
        if isinstance(value, numba.core.dispatcher.Dispatcher)
    ]
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
    takes more than SLOW_WARM_UP_S, and again when done, so nobody waits on a silent process."""
    before = compiled()
    started = time.monotonic()
    notice = threading.Timer(SLOW_WARM_UP_S, say, (COMPILING,))
    notice.daemon = True
    notice.start()
    try:
        _warm_up(item_vectors, gram_inverse, neighbour_rows)
    finally:
        notice.cancel()
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
    select(np.zeros(1, dtype=np.int64), 1, drop=NO_DROP, weight=NO_WEIGHT, keys=NO_KEYS, limit=1, distinct=1)
    placing.warm_up()
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


def _select(  # noqa: PLR0917 - numba's dispatcher takes arguments by position
    rows: Any, n: int, drop: Any, weight: Any, keys: Any, limit: int, distinct: int, codes: Any
) -> Any:  # pragma: no cover - compiled by `select`
    """gateway.rules.decision.Ruling.select over one plan's arrays (an empty array: the plan has none)."""
    size = len(rows)
    kept = np.empty(size, dtype=np.int64)
    count = 0
    filtering = len(drop) > 0
    for i in range(size):
        if filtering and drop[rows[i]]:
            continue
        kept[count] = i
        count += 1
    # The rows a filter dropped ahead of the n-th kept one: those filters changed the answer.
    dropped = np.empty(size - count, dtype=np.int64)
    found = 0
    bits = np.int64(0)
    coded = len(codes) > 0
    if count < size:
        last = kept[n - 1] if count >= n else size
        for i in range(last):
            if drop[rows[i]]:
                dropped[found] = rows[i]
                found += 1
                if coded:
                    bits |= codes[rows[i]]
    kept = kept[:count]
    reordered = False
    if len(weight) > 0 and count > 0:
        # Rank-based standing (1 for the first, falling evenly towards 0) times the boosts.
        values = np.empty(count, dtype=np.float64)
        for j in range(count):
            factor = weight[rows[kept[j]]]
            if factor != 1.0:
                reordered = True
            values[j] = -((1.0 - j / count) * np.float64(factor))
        if reordered:
            kept = kept[np.argsort(values, kind="mergesort")]  # stable: equal standings keep their order
    capped = False
    if len(keys) > 0:
        counts = np.zeros(distinct, dtype=np.int64)
        chosen = np.empty(min(n, count), dtype=np.int64)
        taken = 0
        for j in range(count):
            if taken >= n:
                break
            code = keys[rows[kept[j]]]
            if counts[code] >= limit:
                capped = True
                continue
            counts[code] += 1
            chosen[taken] = kept[j]
            taken += 1
        kept = chosen[:taken]
    else:
        kept = kept[:n]
    return kept, dropped[:found], bits, reordered, capped


NO_DROP: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
NO_WEIGHT: npt.NDArray[np.float32] = np.zeros(0, dtype=np.float32)
NO_KEYS: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
NO_CODES: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)

_select_compiled: Any = None


def select(
    rows: npt.NDArray[np.int64],
    n: int,
    *,
    drop: npt.NDArray[np.bool_],
    weight: npt.NDArray[np.float32],
    keys: npt.NDArray[np.int32],
    limit: int,
    distinct: int,
    codes: npt.NDArray[np.int64] = NO_CODES,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int, bool, bool]:
    """One request's candidates (`rows`, best first) through a plan: the positions of the at most
    n kept (without what `drop` marks, re-ranked by `weight`, at most `limit` per `keys` code), the
    dropped rows ahead of the n-th kept and their `codes` ORed (which filters dropped them, see
    Plan.drop_codes; 0 without codes), whether a boost held, whether the cap skipped one. An
    empty `drop`, `weight`, `keys` or `codes`: the plan has no filter, boost or cap, or no codes."""
    global _select_compiled  # noqa: PLW0603 - compiled on first use, once per process
    if _select_compiled is None:
        # One signature for every plan: masks are read-only arrays, combined ones writable, and
        # numba would compile each mix of the two separately (seconds each).
        types: Any = numba.types

        def ro(dtype: Any) -> Any:
            return types.Array(dtype, 1, "C", readonly=True)

        result = types.Tuple((types.int64[::1], types.int64[::1], types.int64, types.boolean, types.boolean))
        count = types.int64
        signature = result(
            ro(count), count, ro(types.boolean), ro(types.float32), ro(types.int32), count, count, ro(count)
        )
        _select_compiled = numba.njit(signature, cache=True, nogil=True)(_select)
    kept, dropped, bits, reordered, capped = _select_compiled(rows, n, drop, weight, keys, limit, distinct, codes)
    return kept, dropped, int(bits), bool(reordered), bool(capped)
