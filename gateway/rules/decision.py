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
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.rules.conditions import Predicate
from gateway.rules.document import Content, Rule
from gateway.rules.picks import Pick, reasons_of

Bits = npt.NDArray[np.uint8]  # action bits, little-endian: bit b of byte b // 8 is action b


@dataclass(eq=False)
class CompiledRule:
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


@dataclass(frozen=True, eq=False)
class Actions:
    """A book's filter and boost actions over its catalog, numbered in priority order: bits[row]
    says which hold for the row (a filter drops it, a boost weighs it), one bit each."""

    bits: Bits  # rows x bytes
    rules: list[CompiledRule]  # action -> its rule
    factors: npt.NDArray[np.float32]  # action -> its weight (1 for a filter)
    filtering: npt.NDArray[np.bool_]  # action -> whether it is a filter
    cap_keys: dict[int, npt.NDArray[np.int32]]  # depth -> each row's category for caps, as a number

    def decoded(self, bits: Bits) -> list[CompiledRule]:
        """The rules of the actions whose bits are set, each once, by priority."""
        found = np.flatnonzero(np.unpackbits(bits, count=len(self.rules), bitorder="little"))
        return list({id(rule): rule for rule in (self.rules[b] for b in found.tolist())}.values())


class Plan:
    """What one set of fired rules (by priority) does; made once per set (gateway.rules.book)."""

    def __init__(self, rules: list[CompiledRule], actions: Actions) -> None:
        self.rules = rules
        self.refs = [c.ref for c in rules]
        self.actions = actions
        ranks = np.array([c.rank for c in actions.rules], dtype=np.int64)
        own = np.isin(ranks, [c.rank for c in rules])
        self.drop = _mask(own & actions.filtering)  # None: no filter
        self.lift = _mask(own & ~actions.filtering)  # None: no boost
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
        """Per row of action bits, the product of the plan's boosts that hold (1 where none does)."""
        weight = np.ones(len(held), dtype=np.float32)
        if self.lift is None:
            return weight
        lifts = held & self.lift
        some = lifts.any(axis=1)
        if some.any():
            on = np.unpackbits(lifts[some], axis=1, count=len(self.actions.rules), bitorder="little")
            weight[some] = np.where(on.astype(np.bool_), self.actions.factors, np.float32(1.0)).prod(axis=1)
        return weight

    def boosts_of(self, rows: Sequence[int]) -> list[list[CompiledRule]]:
        """Per row, the rules of the plan's boosts that moved it (none where they cancel out)."""
        held = self.actions.bits[np.asarray(rows, dtype=np.intp)]
        weight = self.weights(held)
        assert self.lift is not None
        return [self.actions.decoded(held[at] & self.lift) if weight[at] != 1.0 else [] for at in range(len(rows))]


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
    `select` and a boost `reordered` them)."""

    segments: list[str]
    plan: Plan | None
    applied: dict[str, CompiledRule] = field(default_factory=dict)
    ranked: bool = False
    reordered: bool = False
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
        held = plan.actions.bits[at]
        positions = np.arange(len(at))
        if plan.drop is not None:
            drops = held & plan.drop
            hit = drops.any(axis=1)
            if hit.any():
                positions = np.flatnonzero(~hit)
                # The filters that changed the answer: those dropping a row ahead of the n-th kept.
                last = int(positions[n - 1]) if len(positions) >= n else len(at)
                for rule in plan.actions.decoded(np.bitwise_or.reduce(drops[:last], axis=0)):
                    self.applied[rule.ref] = rule
                held = held[positions]
        if plan.lift is not None and len(positions):
            weight = plan.weights(held)
            if (weight != 1.0).any():
                self.reordered = True
                standing = (1.0 - np.arange(len(positions)) / len(positions)) * weight
                positions = positions[np.argsort(-standing, kind="stable")]  # stable: ties keep their order
        if plan.capping is None:
            kept: list[int] = positions[:n].tolist()
            return kept
        # Each candidate's place among those of its cap category: admitted while under the limit.
        rule, limit, keys = plan.capping[0], plan.capping[1], plan.capping[2][at[positions]]
        order = np.argsort(keys, kind="stable")
        grouped = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
        place = np.empty(len(keys), dtype=np.intp)
        place[order] = np.arange(len(keys)) - np.repeat(starts, np.diff(np.append(starts, len(keys))))
        admitted = np.flatnonzero(place < limit)[:n]
        looked = int(admitted[-1]) + 1 if len(admitted) == n else len(keys)  # how far the cap looked
        if looked > len(admitted):
            self.applied[rule.ref] = rule
        kept = positions[admitted].tolist()
        return kept

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
        if self.reordered and plan.lift is not None:
            for at, rules in enumerate(plan.boosts_of([p.row for p in chosen])):
                if rules:
                    self.applied.update((rule.ref, rule) for rule in rules)
                    pick = chosen[at]
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
        plan's cap still admits."""
        more: list[Pick] = []
        counts = Counter(int(plan.capping[2][pick.row]) for pick in chosen) if plan.capping else Counter[int]()
        for pick in reserve:
            if len(more) >= n - len(chosen):
                break
            if pick.row in taken or not plan.passes(pick.row):
                continue
            if plan.capping is not None:
                rule, limit, keys = plan.capping
                key = int(keys[pick.row])
                if counts[key] >= limit:
                    self.applied[rule.ref] = rule
                    continue
                counts[key] += 1
            more.append(pick)
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
