"""What the rules that fire for one request do to its list.

A `Plan` is what one set of fired rules does: which of its book's filter and boost actions are its
own (masks over the per-item action bits the book computes once, `Actions`), its cap, pins,
injections and content. A `Ruling` takes one request through its plan:

    select  the candidates' action bits gathered, then, vectorised: drop what a filter matches,
            re-rank by the boosts (a stable sort of rank standing times the boosts' product), cap
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
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.rules.conditions import Predicate
from gateway.rules.document import Content, Rule
from gateway.rules.picks import Pick, reasons_of

Bits = npt.NDArray[np.uint8]  # action bits, little-endian: bit b of byte b // 8 is action b
Ints = npt.NDArray[np.intp]
BITS_OF = [tuple(b for b in range(8) if value >> b & 1) for value in range(256)]  # a byte's set bits


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
    says which hold for the row (a filter drops it, a boost weighs it), one bit each."""

    bits: Bits  # rows x bytes
    rules: list[CompiledRule]  # action -> its rule
    # action -> a boost's weight, NaN for a filter: a row's product of the actions that hold for it
    # is then its weight, or NaN when a filter drops it (boosts are finite and positive)
    factors: npt.NDArray[np.float32]
    cap_keys: dict[int, npt.NDArray[np.int32]]  # depth -> each row's category for caps, as a number
    # Per byte of the bits and per value of that byte, the product of its actions' factors: a row's
    # product is then one lookup per byte, not an unpacking of its bits.
    products: npt.NDArray[np.float32] = field(init=False)
    columns: npt.NDArray[np.intp] = field(init=False)  # 0, 1, ... one per byte

    def __post_init__(self) -> None:
        factors = np.ones(self.bits.shape[1] * 8, dtype=np.float32)
        factors[: len(self.factors)] = self.factors
        held = (np.arange(256)[:, None] >> np.arange(8) & 1).astype(np.bool_)
        self.products = np.where(held, factors.reshape(-1, 1, 8), np.float32(1.0)).prod(axis=2)
        self.columns = np.arange(self.bits.shape[1])

    def decoded(self, bits: list[int]) -> list[CompiledRule]:
        """The rules of the actions whose bits (the bytes of one row) are set, each once, by priority."""
        found: list[CompiledRule] = []
        for at, byte in enumerate(bits):
            for b in BITS_OF[byte]:
                rule = self.rules[8 * at + b]
                if rule not in found:
                    found.append(rule)
        return found


class Plan:
    """What one set of fired rules (by priority) does; made once per set (gateway.rules.book)."""

    def __init__(self, rules: list[CompiledRule], actions: Actions) -> None:
        self.rules = rules
        self.refs = [c.ref for c in rules]
        self.actions = actions
        own = np.isin([c.rank for c in actions.rules], [c.rank for c in rules])
        filtering = np.isnan(actions.factors)
        self.acts = _mask(own)  # None: neither filter nor boost
        self.drop = _mask(own & filtering)  # None: no filter
        self.lift = _mask(own & ~filtering)  # None: no boost
        # The highest-priority cap: its rule, how many per category, each row's category.
        self.capping: tuple[CompiledRule, int, npt.NDArray[np.int32]] | None = next(
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

    def passes(self, row: int) -> bool:
        """Whether no filter of the plan drops `row`."""
        return self.drop is None or not np.bitwise_and(self.actions.bits[row], self.drop).any()

    def weights(self, held: Bits) -> npt.NDArray[np.float32]:
        """Per row of action bits, the product of the plan's boosts that hold (1 where none does),
        NaN where a filter of the plan holds."""
        actions = self.actions
        if self.acts is None:
            return np.ones(len(held), dtype=np.float32)
        weight: npt.NDArray[np.float32] = actions.products[actions.columns, held & self.acts].prod(axis=1)
        return weight

    def named(self, rows: list[int], held: Bits, weight: npt.NDArray[np.float32]) -> dict[int, list[CompiledRule]]:
        """The rules of the plan's boosts that moved each of `rows` (`held` their action bits,
        `weight` their boosts' product), by priority; rows whose boosts cancel out are not moved."""
        if self.lift is None:
            return {}
        moving, lifted = (weight != 1.0).tolist(), (held & self.lift).tolist()
        return {row: self.actions.decoded(lifted[at]) for at, row in enumerate(rows) if moving[at]}


def _mask(actions: npt.NDArray[np.bool_]) -> Bits | None:
    return np.packbits(actions, bitorder="little") if actions.any() else None


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


def rank_scores(size: int) -> list[float]:
    """Scores of a list the rules re-ranked or placed into: 1 for the first, falling by 1/size."""
    return [round(1.0 - i / size, 6) for i in range(size)]


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
        at = np.asarray(rows, dtype=np.intp)
        if not len(at):
            return []
        positions, held, weight = np.arange(len(at)), None, None
        if plan.acts is not None:
            held = plan.actions.bits[at]
            weight = plan.weights(held)
            positions = np.flatnonzero(weight == weight)  # noqa: PLR0124 - NaN where a filter drops the row
            if len(positions) < len(at) and plan.drop is not None:
                # The filters that changed the answer: those dropping a row ahead of the n-th kept.
                last = int(positions[n - 1]) if len(positions) >= n else len(at)
                for rule in plan.actions.decoded(np.bitwise_or.reduce(held[:last] & plan.drop, axis=0).tolist()):
                    self.applied[rule.ref] = rule
            factors = weight[positions]
            if plan.lift is not None and (factors != 1.0).any():
                self.reordered = True
                # Rank standing (k for the first of k, falling by 1) times the boosts, exact in
                # float64; a stable sort keeps ties in their order.
                positions = positions[np.argsort(np.arange(-len(positions), 0) * factors, kind="stable")]
        chosen = positions[:n] if plan.capping is None else positions[self._capped(plan.capping, at[positions], n)]
        if self.reordered and held is not None and weight is not None:
            self.named.update(plan.named(at[chosen].tolist(), held[chosen], weight[chosen]))
        kept: list[int] = chosen.tolist()
        return kept

    def _capped(self, capping: tuple[CompiledRule, int, npt.NDArray[np.int32]], rows: Ints, n: int) -> Ints:
        """The positions of the first n of `rows` the cap admits: each row's place among those of
        its cap category (a stable sort on the category, its position there less its category's
        first) under the limit."""
        rule, limit, keys = capping[0], capping[1], capping[2][rows]
        order = np.argsort(keys, kind="stable")
        grouped = keys[order]
        place = np.empty(len(keys), dtype=np.intp)
        place[order] = np.arange(len(keys)) - np.searchsorted(grouped, grouped)
        admitted = np.flatnonzero(place < limit)[:n]
        looked = int(admitted[-1]) + 1 if len(admitted) == n else len(keys)  # how far the cap looked
        if looked > len(admitted):
            self.applied[rule.ref] = rule
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
        plan's cap still admits. The reserve is read a slice at a time (growing: a cap or a strict
        filter may make it skip many), its filters checked in one gather per slice."""
        more: list[Pick] = []
        rule, limit, keys = plan.capping or (None, 0, None)
        counts = Counter(keys[[p.row for p in chosen]].tolist() if keys is not None else [])
        room = n - len(chosen)
        picks, size = iter(reserve), 8 * room
        while len(more) < room and (batch := list(islice(picks, size))):
            size *= 2
            rows = np.array([p.row for p in batch], dtype=np.intp)
            held = plan.actions.bits[rows]
            weight = plan.weights(held)
            passing = (weight == weight).tolist()  # noqa: PLR0124 - NaN where a filter drops the row
            categories = keys[rows].tolist() if keys is not None else []
            added: list[int] = []
            for at, pick in enumerate(batch):
                if len(more) >= room:
                    break
                if pick.row in taken or not passing[at]:
                    continue
                if rule is not None:
                    if counts[categories[at]] >= limit:
                        self.applied[rule.ref] = rule
                        continue
                    counts[categories[at]] += 1
                more.append(pick)
                added.append(at)
            if self.reordered:
                self.named.update(plan.named([batch[at].row for at in added], held[added], weight[added]))
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
