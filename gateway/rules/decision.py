"""What the rules that fire for one request do to its list.

A `Plan` is what one set of fired rules does: which of its book's filter and boost actions are its
own (masks over the per-item action bits the book computes once, `Actions`), its cap, pins,
injections and content. A `Ruling` takes one request through its plan:

    select  the candidates' action bits (a Python int per row) read, then drop what a filter
            matches, re-rank by the boosts (a stable sort of rank standing times the boosts'
            product, remembered per plan by the bits), cap (plain Python over a few dozen rows)
    apply   top up from a reserve when the rules leave too few, name each boosted pick's boosts,
            inject and pin (plain Python over the first n), score and explain the answer

Conflicts resolve deterministically: rules are taken by priority, highest first, ties by id. Every
filter of every firing rule holds, also against pins and injections (nothing a filter drops ever
shows). The highest-priority cap applies. For a position, the highest-priority pin wins; an item
pinned twice goes where the higher-priority pin puts it. Injections are placed lowest priority
first, so a higher-priority one lands exactly at its position. Per slot, the highest-priority
attachment wins. Boosts multiply. When a rule re-ranks, places or injects, the answer's scores
become rank scores (1 for the first item, falling by 1/n), so they still read "higher is better".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import islice
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.rules.conditions import Predicate
from gateway.rules.document import Content, Rule
from gateway.rules.picks import Pick, reasons_of

FILL_BATCH = 16  # reserve picks whose bits one numpy call gathers while topping up
Bits = npt.NDArray[np.uint8]  # action bits, little-endian: bit b of byte b // 8 is action b


def _set_bits(mask: int) -> Iterator[int]:
    """The numbers of the bits set in `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass(eq=False)
class CompiledRule:
    """A rule compiled against a snapshot: its condition a closure, its validity instants, its
    pins, injections, cap and content in rows (its filters and boosts are bits of `Actions`)."""

    rule: Rule
    ref: str  # "rule:<id>@<version>": how answers name it
    when: Predicate | None
    starts: float
    ends: float
    surfaces: frozenset[str]
    pins: list[tuple[int, int]] = field(default_factory=list)  # (row, 0-based index)
    injects: list[tuple[list[int], int | None]] = field(default_factory=list)
    cap: tuple[int, int] | None = None  # (per category, depth)
    attach: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    rank: int = 0  # position in the book's priority order

    @property
    def id(self) -> str:
        return self.rule.id


@dataclass(eq=False)
class Actions:
    """A book's filter and boost actions over its catalog, numbered in priority order: bits[row]
    says which hold for the row (a filter drops it, a boost weighs it), one bit each. A request
    works on a few dozen rows: it gathers their bits in one numpy call (`held`) and tests them as
    Python ints, since a numpy call per test costs more than a loop over that many rows does."""

    bits: Bits  # rows x bytes
    rules: list[CompiledRule]  # action -> its rule
    factors: list[float]  # action -> a boost's weight (a float32), NaN for a filter
    cap_keys: dict[int, list[int]]  # depth -> each row's category for caps, as a number
    words: npt.NDArray[np.uint64] = field(init=False)  # bits as rows x 64-action words, little-endian
    filters: int = field(init=False)  # the bits of the filter actions

    def __post_init__(self) -> None:
        words = np.zeros((len(self.bits), max(-(-self.bits.shape[1] // 8), 1) * 8), dtype=np.uint8)
        words[:, : self.bits.shape[1]] = self.bits
        self.words = words.view("<u8")
        self.filters = sum(1 << b for b, factor in enumerate(self.factors) if factor != factor)  # noqa: PLR0124

    def held(self, rows: Sequence[int] | npt.NDArray[np.integer]) -> list[int]:
        """Each row's action bits as one int: bit b is action b."""
        columns: list[list[int]] = self.words[rows].T.tolist()
        held = columns[0]
        for k, column in enumerate(columns[1:], 1):
            if any(column):
                held = [h | w << 64 * k for h, w in zip(held, column, strict=True)]
        return held

    def decoded(self, mask: int) -> list[CompiledRule]:
        """The rules of the actions set in `mask`, each once, by priority."""
        return list(dict.fromkeys(self.rules[b] for b in _set_bits(mask)))


class Plan:
    """What one set of fired rules (by priority) does; made once per set (gateway.rules.book)."""

    def __init__(self, rules: list[CompiledRule], actions: Actions) -> None:
        self.rules = rules
        self.refs = [c.ref for c in rules]
        self.actions = actions
        ranks = {c.rank for c in rules}
        own = sum(1 << b for b, c in enumerate(actions.rules) if c.rank in ranks)
        self.drop = own & actions.filters  # 0: no filter
        self.lift = own & ~actions.filters  # 0: no boost
        # The highest-priority cap: its rule, how many per category, each row's category.
        self.capping: tuple[CompiledRule, int, list[int]] | None = next(
            ((c, c.cap[0], actions.cap_keys[c.cap[1]]) for c in rules if c.cap is not None), None
        )
        # Injections lowest priority first (a higher one placed later lands exactly where it asks);
        # pins highest first (it takes the slot, and the item); both only of items no filter drops.
        self.injects = [(c, [r for r in rows if self.passes(r)], at) for c in reversed(rules) for rows, at in c.injects]
        self.pins = [(c, row, at) for c in rules for row, at in c.pins if self.passes(row)]
        self.content: list[Content] = []
        self.attaching: list[CompiledRule] = []
        slots: set[str] = set()
        for c in rules:
            for slot, body in c.attach:
                if slot not in slots:
                    slots.add(slot)
                    self.content.append(Content(slot, c.ref, body))
                    if not self.attaching or self.attaching[-1] is not c:
                        self.attaching.append(c)
        # Per boost bits (a row's action bits and lift) met so far, their product and rules (`boosts`).
        self.boosted: dict[int, tuple[float, list[CompiledRule]]] = {0: (1.0, [])}

    def passes(self, row: int) -> bool:
        """Whether no filter of the plan drops `row`."""
        return not self.actions.held([row])[0] & self.drop

    def boosts(self, held: int) -> tuple[float, list[CompiledRule]]:
        """For a row's action bits, the product of the plan's boosts that hold (a float32, taken in
        action order) and the rules of those boosts, by priority; remembered by the bits."""
        lifted = held & self.lift
        found = self.boosted.get(lifted)
        if found is None:
            product = np.float32(1.0)
            for b in _set_bits(lifted):
                product = np.float32(product * np.float32(self.actions.factors[b]))
            found = self.boosted[lifted] = (float(product), self.actions.decoded(lifted))
        return found


@dataclass(frozen=True)
class Outcome:
    """What the rules did to one list: its picks, the rules that fired and changed something (by
    priority), the content attached."""

    picks: list[Pick]
    applied: list[CompiledRule]
    content: list[Content]

    @property
    def refs(self) -> list[str]:
        """The applied rules as answers name them: "rule:<id>@<version>"."""
        return [rule.ref for rule in self.applied]


@cache
def rank_scores(size: int) -> tuple[float, ...]:
    """Scores of a list the rules re-ranked or placed into: 1 for the first, falling by 1/size."""
    return tuple(round(1.0 - i / size, 6) for i in range(size))


@dataclass(eq=False, slots=True)
class Ruling:
    """The rules of one request: the visitor's segments, the plan that fires (None: no rule), and
    what the plan did so far (the rules `applied`, whether the candidates were `ranked` through
    `select`, whether a boost `reordered` them, and which boosts moved each row)."""

    segments: list[str]
    plan: Plan | None
    applied: dict[str, CompiledRule] = field(default_factory=dict)
    ranked: bool = False
    reordered: bool = False
    named: dict[int, list[CompiledRule]] = field(default_factory=dict)  # row -> the boosts that moved it
    # The recommender's remembered [selected picks, final outcome] for this plan and these inputs
    # (Recommender._select); the outcome is filled in by the first request that gets that far.
    memo: list[Any] | None = None

    def select(self, rows: Sequence[int] | npt.NDArray[np.integer], n: int) -> list[int]:
        """The positions in `rows` (candidates the request admits, best first) of the at most n
        the plan keeps: without what its filters drop, re-ranked by its boosts, through its cap."""
        plan = self.plan
        assert plan is not None
        self.ranked = True
        held = plan.actions.held(rows)
        rows = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
        positions = list(range(len(rows)))
        if plan.drop:
            drop = plan.drop
            positions = [at for at in positions if not held[at] & drop]
            if len(positions) < len(rows):
                # The filters that changed the answer: those dropping a row ahead of the n-th kept.
                dropped = 0
                for h in held[: positions[n - 1] if len(positions) >= n else len(rows)]:
                    dropped |= h
                for rule in plan.actions.decoded(dropped & drop):
                    self.applied[rule.ref] = rule
        if plan.lift:
            lift, boosted = plan.lift, plan.boosted
            weights = [(boosted.get(held[at] & lift) or plan.boosts(held[at]))[0] for at in positions]
            if weights.count(1.0) < len(weights):
                self.reordered = True
                # Rank standing (k for the first of k, falling by 1) times the boosts, exact in
                # float64; a stable sort keeps ties in their order.
                k = len(positions)
                standing = [(j - k) * weight for j, weight in enumerate(weights)]
                positions = [positions[j] for j in sorted(range(k), key=standing.__getitem__)]
        chosen = positions[:n] if plan.capping is None else self._capped(plan.capping, rows, positions, n)
        if self.reordered:
            for at in chosen:
                weight, rules = plan.boosts(held[at])
                if weight != 1.0:
                    self.named[rows[at]] = rules
        return chosen

    def _capped(
        self, capping: tuple[CompiledRule, int, list[int]], rows: list[int], positions: list[int], n: int
    ) -> list[int]:
        """The first n of `positions` (in `rows`) the cap admits: those of whose cap category fewer
        than its limit came before."""
        rule, limit, keys = capping
        counts: dict[int, int] = {}
        admitted: list[int] = []
        for at in positions:
            if len(admitted) >= n:
                break
            key = keys[rows[at]]
            seen = counts.get(key, 0)
            if seen >= limit:
                self.applied[rule.ref] = rule
                continue
            counts[key] = seen + 1
            admitted.append(at)
        return admitted

    def apply(
        self,
        picks: Sequence[Pick],
        *,
        n: int,
        reserve: Callable[[], Iterable[Pick]],
        allowed: Callable[[int], bool],
    ) -> Outcome:
        """The n picks after the plan: `picks` is the model's list, best first and longer than n
        where it could be (as `select` left it, if it went through there); `reserve` gives more
        (popular items) when rules leave too few; `allowed` says whether the request itself admits
        a row (its category filter and `exclude`), which injections and pins respect as well."""
        plan = self.plan
        if plan is None:
            return Outcome(list(picks[:n]), [], [])
        kept = range(min(n, len(picks))) if self.ranked else self.select([p.row for p in picks], n)
        chosen = [picks[at] for at in kept]
        if len(chosen) < n:
            chosen = self._fill(plan, chosen, reserve(), n, taken={p.row for p in picks})
        if self.reordered:
            for at, pick in enumerate(chosen):
                rules = self.named.get(pick.row)
                if rules:
                    self.applied.update((rule.ref, rule) for rule in rules)
                    chosen[at] = Pick(pick.row, pick.score, (*reasons_of(pick), *(rule.ref for rule in rules)))
        placed = self._inject(plan, chosen, n, allowed) if plan.injects else chosen
        if plan.pins:
            placed = self._pin(plan, placed, n, allowed)
        final = placed[:n]
        if self.reordered or placed is not chosen:
            final = [Pick(p.row, score, p.reason) for p, score in zip(final, rank_scores(len(final)), strict=True)]
        for rule in plan.attaching:
            self.applied[rule.ref] = rule
        return Outcome(final, sorted(self.applied.values(), key=lambda rule: rule.rank), plan.content)

    def _fill(
        self, plan: Plan, chosen: list[Pick], reserve: Iterable[Pick], n: int, *, taken: Container[int]
    ) -> list[Pick]:
        """`chosen` and, up to n, the picks of `reserve` not `taken` that pass the filters and the
        plan's cap still admits, read a few at a time (a cap or a strict filter may make it skip many)."""
        more: list[Pick] = []
        rule, limit, keys = plan.capping or (None, 0, [])
        counts = Counter(keys[p.row] for p in chosen) if rule is not None else Counter[int]()
        room, picks = n - len(chosen), iter(reserve)
        while len(more) < room:
            read = list(islice(picks, FILL_BATCH))
            if not read:
                break
            batch = [pick for pick in read if pick.row not in taken]
            for pick, held in zip(batch, plan.actions.held([pick.row for pick in batch]), strict=True):
                if len(more) >= room:
                    break
                if held & plan.drop:
                    continue
                if rule is not None:
                    if counts[keys[pick.row]] >= limit:
                        self.applied[rule.ref] = rule
                        continue
                    counts[keys[pick.row]] += 1
                more.append(pick)
                if self.reordered:
                    weight, rules = plan.boosts(held)
                    if weight != 1.0:
                        self.named[pick.row] = rules
        return chosen + more

    def _inject(self, plan: Plan, picks: list[Pick], n: int, allowed: Callable[[int], bool]) -> list[Pick]:
        """`picks` with the plan's injections placed, lowest priority first: the items the list
        does not show yet among its first n that the request `allowed`, at the injection's
        position (without one, at the end of the first n)."""
        result = picks
        for rule, rows, at in plan.injects:
            shown = {p.row for p in result[:n]}
            place = [row for row in dict.fromkeys(rows) if row not in shown and allowed(row)]
            if not place:
                continue
            kept = [p for p in result if p.row not in place]
            start = min(max(n - len(place), 0) if at is None else at, len(kept))
            result = kept[:start] + [Pick(row, 0.0, rule.ref) for row in place] + kept[start:]
            self.applied[rule.ref] = rule
        return result

    def _pin(self, plan: Plan, picks: list[Pick], n: int, allowed: Callable[[int], bool]) -> list[Pick]:
        """`picks` with the plan's pins placed, highest priority first (it takes the slot, and the
        item): a pinned item keeps its reasons and gains the pin's."""
        slots: dict[int, tuple[int, CompiledRule]] = {}
        pinned: set[int] = set()
        for rule, row, at in plan.pins:
            if at < n and at not in slots and row not in pinned and allowed(row):
                slots[at] = (row, rule)
                pinned.add(row)
        if not slots:
            return picks
        by_row = {p.row: p for p in picks}
        rest = iter([p for p in picks if p.row not in pinned])
        result: list[Pick] = []
        for index in range(max(n, len(picks))):
            if index in slots:
                row, rule = slots[index]
                held = by_row.get(row)
                result.append(Pick(row, 0.0, (*reasons_of(held), rule.ref) if held is not None else (rule.ref,)))
                self.applied[rule.ref] = rule
            else:
                following = next(rest, None)
                if following is None:
                    break
                result.append(following)
        # A pin below the end of a short list still lands, at the end (and changed the list as well).
        for at, (row, rule) in sorted(slots.items()):
            if at >= len(result):
                result.append(Pick(row, 0.0, (rule.ref,)))
                self.applied[rule.ref] = rule
        return result
