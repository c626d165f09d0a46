"""A rule plan's whole answer in one compiled call (`place`): what Recommender._select and
Book.apply do step by step in Python (select the candidates through the plan's filters, boosts and
cap, top up from the popular list, name the boosts, inject, pin), over rows and bits.

It reads a book's per-row codes (`Codes`, built with the book): for each catalog row, which of the
book's filter actions drop it and which of its boost actions hold, a bit each (63 of each at most;
a larger book takes the step-by-step path). A plan is then a few masks over those bits (`View`):
one array read per candidate tells everything the rules need to know of it, where the
step-by-step path asks each group of the plan, and no plan needs a catalog-sized array of its own.
The step-by-step path stays the definition: a property test compares the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numba
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from gateway.rules.plans import CompiledRule, Group, Plan

Reason = str | tuple[str, ...]  # a pick's reasons (gateway.rules.plans.Pick.reason)
# (reason, boost bits) pairs whose reasons a book's codes remember (Codes.tagged): a few hundred
# bytes each; "similar-to:<item>" reasons make as many as the catalog has items, times the boosts.
TAGS_KEPT = 50_000
NOTHING = -(2**62)  # `base` of a pinned item that was not in the list before (see `place`)
NO_ROWS: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
NO_ROWS.setflags(write=False)


def _or_bits(code: Any, mask: Any, bit: int) -> None:  # pragma: no cover - compiled below
    value = np.int64(1) << np.int64(bit)
    for row in range(len(mask)):
        if mask[row]:
            code[row] |= value


# One signature (a rule's masks are read-only, a combined one is not): compiled by `warm_up`, not
# by the first rule book, whose compiling would hold the GIL for a second.
_or_bits_compiled = numba.njit(
    "void(int64[::1], Array(boolean, 1, 'C', readonly=True), int64)", cache=True, nogil=True
)(_or_bits)


def code_plan(size: int, masks: list[npt.NDArray[np.bool_]]) -> npt.NDArray[np.int64]:
    """Per row, bit i set where masks[i] holds (at most 63 masks); compiled, without the GIL."""
    code = np.zeros(size, dtype=np.int64)
    for bit, mask in enumerate(masks):
        _or_bits_compiled(code, np.ascontiguousarray(mask, dtype=np.bool_), bit)
    code.setflags(write=False)
    return code


def _among(values: Any, count: int, value: int) -> bool:  # pragma: no cover - compiled below
    for i in range(count):  # noqa: SIM110 - numba compiles a loop, not a generator
        if values[i] == value:
            return True
    return False


_among_compiled = numba.njit(cache=True, nogil=True)(_among)


def _admits(counts: Any, keys: Any, row: int, limit: int) -> bool:  # pragma: no cover - compiled below
    """Whether the cap admits `row` (fewer than `limit` of its key so far); counted if so."""
    if counts[keys[row]] >= limit:
        return False
    counts[keys[row]] += 1
    return True


_admits_compiled = numba.njit(cache=True, nogil=True)(_admits)


INSERTION_MAX = 128  # longer lists are sorted by merging (see _stable_order)


def _stable_order(kept: Any, values: Any) -> Any:  # pragma: no cover - compiled below
    """`kept` ordered by `values` (one per entry), ties in their order: np.argsort(kind="mergesort")
    for the long lists, an insertion sort for the usual few dozen, which are nearly in order already
    (only boosted and buried rows move) and take far less machine code, fetched on every cold call."""
    total = len(kept)
    if total > INSERTION_MAX:
        ordered: Any = kept[np.argsort(values, kind="mergesort")]
        return ordered
    order = np.empty(total, dtype=np.int64)
    for j in range(total):
        value = values[j]
        i = j
        while i > 0 and values[order[i - 1]] > value:
            order[i] = order[i - 1]
            i -= 1
        order[i] = j
    result = np.empty(total, dtype=np.int64)
    for j in range(total):
        result[j] = kept[order[j]]
    return result


_stable_order_compiled = numba.njit(cache=True, nogil=True)(_stable_order)


# A plan's `View.spec` (int64): the plan's masks over the book's bits and how many boosting
# groups it has, then its injections and pins (as Plan.injects and Plan.pins, in that order), then
# each boost bit's group among the plan's boosting groups (-1: not the plan's).
FILTER_MASK, BOOST_MASK, GROUPS, INJECTS, PINS, HEAD = 0, 1, 2, 3, 4, 5
BITS = 63
# What `place` returns, in one array (one object to hand over, one tolist): m placed, c chosen,
# the drop bits, the injection bits, the flags (REORDERED, CAPPED, CHANGED), then the placed rows,
# their bases and pins (m each), the chosen ones' sources and named boost bits (c each).
OUT = 5
REORDERED, CAPPED, CHANGED = 1, 2, 4
DROPS, BOOSTS = 0, 1  # the columns of Codes.bits


def _place(  # noqa: PLR0917 - the dispatcher takes arguments by position
    every: Any,
    refused: Any,
    n: int,
    codes: Any,
    factors: Any,
    keys: Any,
    limit: int,
    distinct: int,
    reserve: Any,
    spec: Any,
) -> Any:  # pragma: no cover - compiled by `place`
    """See `place`."""
    among, admits, stable_order = _among_compiled, _admits_compiled, _stable_order_compiled
    spurned = len(refused)
    filter_mask, boost_mask, groups = spec[FILTER_MASK], spec[BOOST_MASK], spec[GROUPS]
    injects, pins = spec[INJECTS], spec[PINS]
    bounds = HEAD  # injection k's rows: spec[rows_at + spec[bounds + k] : rows_at + spec[bounds + k + 1]]
    inject_at = bounds + injects + 1
    pin_rows = inject_at + injects
    pin_at = pin_rows + pins
    group_of = pin_at + pins
    rows_at = group_of + BITS
    products = np.ones(max(groups, 1), dtype=np.float32)

    def group_products(bits: int) -> None:
        """`products`: each boosting group's product of the boosts among `bits`, in float32 and in
        the group's order (as Group.weight holds it)."""
        for g in range(groups):
            products[g] = 1.0
        while bits:
            b = _lowest(bits)
            bits &= bits - 1
            products[spec[group_of + b]] *= factors[b]

    def weight_of(row: int) -> Any:
        """The product of the plan's boosts for `row` (as Plan.weight holds it: each group's
        product, then the groups' in order)."""
        bits = codes[row, BOOSTS] & boost_mask
        if bits == 0:
            return np.float32(1.0)
        group_products(bits)
        total = np.float32(1.0)
        for g in range(groups):
            total = np.float32(total * products[g])
        return total

    # Recommender._select: the candidates the request admits.
    size = len(every)
    rows = np.empty(size, dtype=np.int64)
    admitted = np.empty(size, dtype=np.int64)
    count = 0
    for i in range(size):
        if not among(refused, spurned, every[i]):
            admitted[count] = i
            rows[count] = every[i]
            count += 1
    # Ruling.select (gateway.recommend.kernels._select): without what the filters drop, the filters that
    # dropped a row ahead of the n-th kept one named, re-ranked by the boosts, through the cap.
    kept = np.empty(count, dtype=np.int64)
    total = 0
    for i in range(count):
        if codes[rows[i], DROPS] & filter_mask:
            continue
        kept[total] = i
        total += 1
    dropped = np.int64(0)
    if total < count:
        last = kept[n - 1] if total >= n else count
        for i in range(last):
            dropped |= codes[rows[i], DROPS] & filter_mask
    kept = kept[:total]
    reordered = False
    if boost_mask and total > 0:
        values = np.empty(total, dtype=np.float64)
        for j in range(total):
            factor = weight_of(rows[kept[j]])
            if factor != 1.0:
                reordered = True
            values[j] = -((1.0 - j / total) * np.float64(factor))
        if reordered:
            kept = stable_order(kept, values)
    capped = False
    counted = len(keys) > 0
    counts = np.zeros(distinct if counted else 0, dtype=np.int64)
    chosen = np.empty(n, dtype=np.int64)
    source = np.empty(n, dtype=np.int64)  # >= 0: a position in `every`; < 0: -1 - a position in `reserve`
    c = 0
    for j in range(total):
        if c >= n:
            break
        row = rows[kept[j]]
        if counted and not admits(counts, keys, row, limit):
            capped = True
            continue
        chosen[c] = row
        source[c] = admitted[kept[j]]
        c += 1
    # Ruling.fill: topped up from the reserve, past what was chosen, what the filters drop, the cap.
    if c < n:
        taken = c
        for at in range(len(reserve)):
            if c >= n:
                break
            row = reserve[at]
            if among(chosen, taken, row) or among(refused, spurned, row) or codes[row, DROPS] & filter_mask:
                continue
            if counted and not admits(counts, keys, row, limit):
                capped = True
                continue
            chosen[c] = row
            source[c] = -1 - at
            c += 1
    # Book.apply: the boosts each chosen item is named for (Plan.boosted_by: a group's boosts when
    # its product for the item is not 1), when a boost reordered the list.
    named = np.zeros(c, dtype=np.int64)
    if reordered:
        for j in range(c):
            bits = codes[chosen[j], BOOSTS] & boost_mask
            if bits == 0:
                continue
            group_products(bits)
            rest = bits
            while rest:
                b = _lowest(rest)
                rest &= rest - 1
                if products[spec[group_of + b]] != 1.0:
                    named[j] |= np.int64(1) << np.int64(b)
    # The list as (row, base, pin): base >= 0 a position in `chosen`, -1 - k injection k, NOTHING
    # for a pinned item that was not in it; pin k >= 0 for a pinned one.
    injected_rows = spec[bounds + injects] if injects else 0
    room = c + injected_rows + pins + n
    result = np.empty(room, dtype=np.int64)
    base = np.empty(room, dtype=np.int64)
    m = c
    for j in range(c):
        result[j] = chosen[j]
        base[j] = j
    injected = np.int64(0)
    place = np.empty(max(injected_rows, 1), dtype=np.int64)
    kept_rows = np.empty(room, dtype=np.int64)
    kept_base = np.empty(room, dtype=np.int64)
    changed = False
    for k in range(injects):  # _inject, lowest priority first
        p = 0
        shown = min(n, m)
        for t in range(rows_at + spec[bounds + k], rows_at + spec[bounds + k + 1]):
            row = spec[t]
            if among(place, p, row) or among(result, shown, row):
                continue
            if codes[row, DROPS] & filter_mask or among(refused, spurned, row):
                continue
            place[p] = row
            p += 1
        if p == 0:
            continue
        left = 0
        for j in range(m):
            if not among(place, p, result[j]):
                kept_rows[left] = result[j]
                kept_base[left] = base[j]
                left += 1
        wanted = spec[inject_at + k]
        start = min(max(n - p, 0) if wanted < 0 else wanted, left)
        m = 0
        for j in range(start):
            result[m] = kept_rows[j]
            base[m] = kept_base[j]
            m += 1
        for j in range(p):
            result[m] = place[j]
            base[m] = -1 - k
            m += 1
        for j in range(start, left):
            result[m] = kept_rows[j]
            base[m] = kept_base[j]
            m += 1
        injected |= np.int64(1) << np.int64(k)
        changed = True
    pin = np.empty(room, dtype=np.int64)
    pin[:] = -1
    slot_row = np.empty(n, dtype=np.int64)
    slot_row[:] = -1
    slot_pin = np.empty(n, dtype=np.int64)
    slot_pin[:] = -1
    pinned = np.empty(max(pins, 1), dtype=np.int64)
    slots = 0
    for k in range(pins):  # _pin, highest priority first
        at, row = spec[pin_at + k], spec[pin_rows + k]
        if at >= n or slot_row[at] >= 0 or among(pinned, slots, row):
            continue
        if codes[row, DROPS] & filter_mask or among(refused, spurned, row):
            continue
        slot_row[at] = row
        slot_pin[at] = k
        pinned[slots] = row
        slots += 1
    if slots:
        changed = True
        final = np.empty(room, dtype=np.int64)
        final_base = np.empty(room, dtype=np.int64)
        out = 0
        following = 0
        for index in range(max(n, m)):
            if index < n and slot_row[index] >= 0:
                row = slot_row[index]
                held = NOTHING
                for j in range(m - 1, -1, -1):
                    if result[j] == row:
                        held = base[j]
                        break
                final[out] = row
                final_base[out] = held
                pin[out] = slot_pin[index]
                out += 1
            else:
                while following < m and among(pinned, slots, result[following]):
                    following += 1
                if following >= m:
                    break
                final[out] = result[following]
                final_base[out] = base[following]
                following += 1
                out += 1
        for at in range(n):  # a pin below the end of a short list still lands, at the end
            if slot_row[at] >= 0 and at >= out:
                final[out] = slot_row[at]
                final_base[out] = NOTHING
                pin[out] = slot_pin[at]
                out += 1
        result, base, m = final, final_base, out
    m = min(m, n)
    packed = np.empty(OUT + 3 * m + 2 * c, dtype=np.int64)
    packed[0], packed[1], packed[2], packed[3] = m, c, dropped, injected
    packed[4] = (1 if reordered else 0) | (2 if capped else 0) | (4 if changed else 0)
    for j in range(m):  # loops, not slice assignments: less machine code to fetch on a cold call
        packed[OUT + j] = result[j]
        packed[OUT + m + j] = base[j]
        packed[OUT + 2 * m + j] = pin[j]
    for j in range(c):
        packed[OUT + 3 * m + j] = source[j]
        packed[OUT + 3 * m + c + j] = named[j]
    return packed


def _lowest_bit(bits: int) -> int:  # pragma: no cover - compiled below
    """The position of the lowest set bit of a nonzero `bits`."""
    b = 0
    while not (bits >> b) & 1:
        b += 1
    return b


_lowest = numba.njit(cache=True, nogil=True, inline="always")(_lowest_bit)
_place_compiled: Any = None
_entries: dict[np.dtype[Any], Any] = {}  # candidate rows' dtype -> the entry point of its signature
_INT64 = np.dtype(np.int64)
ROW_TYPES = (np.dtype(np.int32), _INT64)  # the candidate rows the kernel is compiled for


def place(
    every: npt.NDArray[np.integer],
    refused: npt.NDArray[np.int64],
    n: int,
    view: View,
    reserve: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """One request's ruled answer: the candidates `every` (best first) without `refused`, without
    the rows a filter of the plan (`view`) drops, re-ranked by its boosts, at most `view.limit` per
    `view.keys` code (`select`), topped up from `reserve` (ranked), each chosen item's boosts
    named, then the plan's injections (lowest priority first) and pins (highest priority first).
    Empty `view.keys`: the plan has no cap.

    Returns, in one array (see OUT): the (row, base, pin) of the at most m <= n placed (see
    `_place`), the c chosen items' sources (>= 0: a position in `every`; < 0: -1 - a position
    in `reserve`) and named boost bits, the drop bits ORed over the rows dropped ahead of the
    n-th kept one, the bits of the injections that changed the list, and whether a boost
    reordered it, the cap skipped an item, an injection or a pin changed it."""
    entry = _entries.get(every.dtype)
    codes = view.codes
    if (
        entry is not None
        and every.ndim == 1
        and every.flags.c_contiguous
        and refused.dtype is _INT64
        and refused.ndim == 1
        and refused.flags.c_contiguous
        and reserve.dtype is _INT64
        and reserve.ndim == 1
        and reserve.flags.c_contiguous
    ):
        # The compiled signature's entry point, past numba's type dispatch (3 µs of a cold call, 1 µs
        # warm). It does not check what it is given: the arrays that vary were checked just now,
        # the view's when it was made (View.__post_init__).
        found: Any = entry(
            every, refused, n, codes.bits, codes.factors, view.keys, view.limit, view.distinct, reserve, view.spec
        )
    else:  # numba's dispatcher checks the types (a wrong one raises); other layouts and widths made right
        rows: Any = np.ascontiguousarray(every)
        if rows.dtype.kind in "iu" and rows.dtype not in ROW_TYPES:  # compiled for int32 and int64 rows
            rows = rows.astype(np.int64)
        refused, reserve = np.ascontiguousarray(refused, dtype=np.int64), np.ascontiguousarray(reserve, dtype=np.int64)
        found = _dispatcher()(
            rows, refused, n, codes.bits, codes.factors, view.keys, view.limit, view.distinct, reserve, view.spec
        )
    return cast("npt.NDArray[np.int64]", found)


def _dispatcher() -> Any:
    """The kernel's dispatcher, compiled (or loaded from numba's cache) on first use, its signatures'
    entry points noted for `place`."""
    global _place_compiled  # noqa: PLW0603 - compiled on first use, once per process
    if _place_compiled is None:
        types: Any = numba.types

        def ro(dtype: Any) -> Any:
            return types.Array(dtype, 1, "C", readonly=True)

        count = types.int64
        bits = types.Array(count, 2, "C", readonly=True)
        rest = (bits, ro(types.float32), ro(types.int32), count, count, ro(count), ro(count))
        # Candidate rows as pools hold them (ROW_TYPES): int32 (the snapshot's and the live ones) or int64.
        signatures = [count[::1](ro(rows), ro(count), count, *rest) for rows in (types.int32, count)]
        _place_compiled = numba.njit(signatures, cache=True, nogil=True)(_place)
        for signature, compiled in _place_compiled.overloads.items():
            _entries[np.dtype(str(signature[0].dtype))] = compiled.entry_point
    return _place_compiled


@dataclass(frozen=True, eq=False)
class Codes:
    """A book's per-row codes (see the module): bit b of bits[row, DROPS] when filter action b drops
    the row, of bits[row, BOOSTS] when boost action b holds for it (factors[b] its weight); the actions are
    numbered group by group, in each group's order (so each group's are consecutive)."""

    bits: npt.NDArray[np.int64]  # row -> (drops, boosts): side by side, one cache line per row
    factors: npt.NDArray[np.float32]
    filters: list[tuple[int, CompiledRule]]  # bit -> (group, rule)
    boosting: list[tuple[int, CompiledRule]]  # bit -> (group, rule)
    _dropped: dict[int, int] = field(default_factory=dict, repr=False)
    _named: dict[int, tuple[int, tuple[str, ...]]] = field(default_factory=dict, repr=False)  # boosted_by's
    # tagged's answers so far, by (reason, bits): read directly by the hot path (one call less per
    # boosted pick); at most TAGS_KEPT, then it starts again
    tags: dict[tuple[Reason, int], tuple[int, Reason]] = field(default_factory=dict, repr=False)

    def view(
        self, fired: Sequence[int], boosting: Sequence[int], plan: Plan, capping: tuple[npt.NDArray[np.int32], int, int]
    ) -> View | None:
        """A plan's view (None: it has more than 63 injections): `fired` its groups, `boosting`
        those of them with boosts, in order; `capping` its cap's (keys, distinct, limit)."""
        if len(plan.injects) > BITS:
            return None
        chosen = set(fired)
        position = {group: at for at, group in enumerate(boosting)}
        filter_mask = sum(1 << b for b, (group, _) in enumerate(self.filters) if group in chosen)
        boost_mask = sum(1 << b for b, (group, _) in enumerate(self.boosting) if group in chosen)
        group_of = [position.get(group, -1) for group, _ in self.boosting] + [-1] * (BITS - len(self.boosting))
        bounds = [0]
        for _, rows, _ in plan.injects:
            bounds.append(bounds[-1] + len(rows))
        spec = [filter_mask, boost_mask, len(boosting), len(plan.injects), len(plan.pins)]
        spec += bounds
        spec += [-1 if at is None else at for _, _, at in plan.injects]
        spec += [row for _, row, _ in plan.pins]
        spec += [at for _, _, at in plan.pins]
        spec += group_of
        spec += [row for _, rows, _ in plan.injects for row in rows]
        array = np.array(spec, dtype=np.int64)
        array.setflags(write=False)
        keys, distinct, limit = capping
        return View(array, self, keys, limit, distinct)

    def dropped_by(self, bits: int) -> int:
        """The rules of the filter actions whose bits are set, as a mask over their ranks (see
        gateway.rules.book.Book.applied_of)."""
        found = self._dropped.get(bits)
        if found is None:
            found = self._dropped[bits] = _ranks(self.filters, bits)
        return found

    def boosted_by(self, bits: int) -> tuple[int, tuple[str, ...]]:
        """The rules of the boost actions whose bits are set, as a mask over their ranks, and their
        refs (each rule once, in bit order)."""
        found = self._named.get(bits)
        if found is None:
            refs = {c.ref: None for b, (_, c) in enumerate(self.boosting) if bits >> b & 1}
            found = self._named[bits] = (_ranks(self.boosting, bits), tuple(refs))
        return found

    def tagged(self, reason: Reason, bits: int) -> tuple[int, Reason]:
        """A pick's `reason` with the refs of the boost actions whose bits are set after it, and
        their rules as a mask over their ranks: one tuple per (reason, bits), shared by the picks
        that get it (the answers' encoder finds it by identity)."""
        ranks, refs = self.boosted_by(bits)
        found = (ranks, (reason, *refs) if isinstance(reason, str) else (*reason, *refs))
        if len(self.tags) >= TAGS_KEPT:
            self.tags.clear()
        self.tags[(reason, bits)] = found
        return found


def _ranks(actions: list[tuple[int, CompiledRule]], bits: int) -> int:
    """Bit `rule.rank` set for the rule of each action whose bit is set."""
    mask = 0
    for b, (_, c) in enumerate(actions):
        if bits >> b & 1:
            mask |= 1 << c.rank
    return mask


@dataclass(frozen=True, eq=False)
class View:
    """A plan over its book's codes: `spec` for `place` (see FILTER_MASK ...), and its cap: each
    row's cap key, how many per key, how many keys (no keys: no cap)."""

    spec: npt.NDArray[np.int64]
    codes: Codes
    keys: npt.NDArray[np.int32]
    limit: int
    distinct: int

    def __post_init__(self) -> None:
        """`place` hands these to the compiled code unchecked: they must be what its signature says."""
        for name, array, dtype, ndim in (
            ("spec", self.spec, np.int64, 1),
            ("bits", self.codes.bits, np.int64, 2),
            ("factors", self.codes.factors, np.float32, 1),
            ("keys", self.keys, np.int32, 1),
        ):
            if array.dtype != np.dtype(dtype) or array.ndim != ndim or not array.flags.c_contiguous:
                raise TypeError(
                    f"{name}: a C-contiguous {ndim}-d {np.dtype(dtype)} array expected, not {array.dtype} {array.shape}"
                )


def book_codes(groups: Sequence[Group], size: int) -> Codes | None:
    """The codes of a book whose enabled rules are `groups` (None past 63 filter or boost actions)."""
    filters = [(g, c, m) for g, group in enumerate(groups) for c in group.rules for m in c.filters]
    boosting = [(g, c, m, f) for g, group in enumerate(groups) for c in group.rules for m, f in c.boosts]
    if len(filters) > BITS or len(boosting) > BITS:
        return None
    factors = np.array([f for _, _, _, f in boosting], dtype=np.float32)
    factors.setflags(write=False)
    bits = np.stack(
        [code_plan(size, [m for _, _, m in filters]), code_plan(size, [m for _, _, m, _ in boosting])], axis=1
    )
    bits.setflags(write=False)
    return Codes(
        bits,
        factors,
        [(g, c) for g, c, _ in filters],
        [(g, c) for g, c, _, _ in boosting],
    )


def warm_up() -> None:
    """Compile (or load from numba's cache) `place` and `code_plan`, off the event loop."""
    code_plan(1, [np.zeros(1, dtype=np.bool_)])
    codes = Codes(np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32), [], [])
    spec = np.zeros(HEAD + 1 + BITS, dtype=np.int64)
    spec.setflags(write=False)
    place(NO_ROWS, NO_ROWS, 1, View(spec, codes, np.zeros(0, dtype=np.int32), 0, 0), NO_ROWS)
