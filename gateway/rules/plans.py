"""What fired rules do, made once and reused: rules compiled against a snapshot (`CompiledRule`),
grouped by condition (`Group`: one evaluation, one combined drop and weight array), and a `Plan`
per distinct set of fired groups (gateway.rules.book.Book.fire caches them)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.rules.conditions import Predicate
from gateway.rules.document import Content, Rule

if TYPE_CHECKING:
    from gateway.rules.placing import View


class Pick(msgspec.Struct, frozen=True, gc=False):
    """One item of an answer: its catalog row, score and reasons. Lists of these are cached (popular
    lists of whole categories, remembered answers): gc=False keeps the collector from walking them
    (an int, a float and strings never make a cycle)."""

    row: int
    score: float
    reason: str | tuple[str, ...]  # one reason, or several (encoded as the item's `reasons` list)


def rounded(score: float) -> float:
    """round(score, 6), three times faster: scores are float32 values, whose product with 10**6
    is exact in a double, so rounding that to an integer and dividing is the correctly rounded
    decimal round() computes (tests/test_plans.py compares them). Not finite: as it is."""
    return round(score * 1e6) / 1e6 if score - score == 0 else score


def reasons_of(pick: Pick) -> tuple[str, ...]:
    return (pick.reason,) if isinstance(pick.reason, str) else pick.reason


def tagged(pick: Pick, more: Sequence[str]) -> Pick:
    """`pick` with `more` reasons after its own (the same pick when there are none)."""
    return pick if not more else Pick(pick.row, pick.score, (*reasons_of(pick), *more))


def with_reasons(picks: Sequence[Pick], extra: tuple[str, ...]) -> list[Pick]:
    """Picks whose reasons end with `extra` (the visitor's experiments and arms)."""
    return [tagged(pick, extra) for pick in picks]


@dataclass
class Outcome:
    """What the rules did to one list."""

    picks: list[Pick]
    # The rules that fired and changed something, by priority, as "rule:<id>@<version>" (may be
    # shared: not to be changed). Refs, not the rules: an answer names them, and building a list of
    # the rules themselves touched every one of them on every request.
    refs: list[str]
    content: list[Content]
    by_ref: Mapping[str, CompiledRule] = field(default_factory=dict, repr=False)  # the book's rules

    @property
    def applied(self) -> list[CompiledRule]:
        """The rules of `refs`, by priority."""
        return [self.by_ref[ref] for ref in self.refs]


@functools.cache
def rank_scores(size: int) -> tuple[float, ...]:
    """Scores of a list the rules re-ranked or placed into: 1 for the first, falling by 1/size."""
    return tuple(round(1.0 - i / size, 6) for i in range(size))


@dataclass(eq=False)
class CompiledRule:
    rule: Rule
    ref: str  # "rule:<id>@<version>": how answers name it
    when: Predicate | None
    starts: float
    ends: float
    surfaces: frozenset[str]
    filters: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    boosts: list[tuple[npt.NDArray[np.bool_], float]] = field(default_factory=list)
    pins: list[tuple[int, int]] = field(default_factory=list)  # (row, 0-based index)
    injects: list[tuple[list[int], int | None]] = field(default_factory=list)
    cap: tuple[int, int] | None = None  # (per category, depth)
    attach: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    rank: int = 0  # position in the book's priority order

    @property
    def id(self) -> str:
        return self.rule.id


# Distinct sets of fired groups whose plans are kept (a few kB each); the most used of them keep
# their groups' arrays combined (5 bytes an item), in this much memory at most.
PLANS_KEPT = 4096
HOT_BYTES = 128 * 1024 * 1024
# A plan not combined is combined on every HOT_PLAN-th step-by-step use (Book.stepping); a plan a
# remembered blank decision holds is marked recent on every HOT_PLAN-th use (Book.decide_blank).
HOT_PLAN = 4
# Rows per plan whose boosting rules are remembered (about 65 bytes each). With PLANS_KEPT plans,
# 10,000 could grow to 2.6 GB; the benchmark's busiest plan held 731 after 20,000 answers.
BOOSTED_KEPT = 2_000


class Group:
    """Enabled rules with one condition, validity window and surfaces: they fire together, so the
    condition is evaluated once, and their filters and boosts are combined once, at compile time.

    A request looks at a few dozen rows: Python indexing of memoryviews over the combined arrays
    beats numpy's per-call overhead (about 2 µs an operation) at that size."""

    def __init__(self, when: Predicate | None, starts: float, ends: float, surfaces: frozenset[str]) -> None:
        self.when = when
        self.starts = starts
        self.ends = ends
        self.surfaces = surfaces
        self.rules: list[CompiledRule] = []
        self.dropping: memoryview | None = None  # row -> whether a filter of the group drops it
        self.weighing: memoryview | None = None  # row -> product of the group's boosts
        self.drop: npt.NDArray[np.bool_] | None = None  # the same as arrays
        self.weight: npt.NDArray[np.float32] | None = None
        self._filters: list[tuple[CompiledRule, npt.NDArray[np.bool_]]] = []
        self.boosts: list[tuple[CompiledRule, npt.NDArray[np.bool_]]] = []
        # Per row, which filters (boosts) hold, as bits; None past 63 (then each mask is asked).
        self._filter_code: memoryview | None = None
        self.filter_codes: npt.NDArray[np.int64] | None = None  # the same as an array
        self._boost_code: memoryview | None = None
        self._decoded: dict[tuple[bool, int], tuple[list[tuple[str, CompiledRule]], list[str]]] = {}

    def prepare(self, size: int) -> None:
        self._filters = [(c, m) for c in self.rules for m in c.filters]
        self.boosts = [(c, m) for c in self.rules for m, _ in c.boosts]
        if self._filters:
            masks = [m for _, m in self._filters]
            self.drop = np.logical_or.reduce(masks) if len(masks) > 1 else masks[0]
            self.dropping = self.drop.data
            self.filter_codes = _codes(masks)
            self._filter_code = None if self.filter_codes is None else self.filter_codes.data
        if self.boosts:
            weight = np.ones(size, dtype=np.float32)
            for c in self.rules:
                for mask, factor in c.boosts:
                    weight[mask] *= np.float32(factor)
            self.weight = weight
            self.weighing = weight.data
            codes = _codes([m for _, m in self.boosts])
            self._boost_code = None if codes is None else codes.data

    def dropped_by(self, rows: list[int]) -> list[tuple[str, CompiledRule]]:
        """(ref, rule) of the group's filters that drop any of `rows`."""
        codes = self._filter_code
        if codes is None:
            return list({c.ref: (c.ref, c) for c, m in self._filters if m[rows].any()}.values())
        bits = 0
        for row in rows:
            bits |= codes[row]
        return self.dropped_by_bits(bits)

    def dropped_by_bits(self, bits: int) -> list[tuple[str, CompiledRule]]:
        """(ref, rule) of the group's filters whose bits (of `filter_codes`) are set."""
        return self._decode(False, bits)[0] if bits else []

    def boosted_by(self, row: int) -> tuple[list[tuple[str, CompiledRule]], list[str]]:
        """(ref, rule) of the group's boosts that hold for `row`, and their refs."""
        codes = self._boost_code
        if codes is None:
            pairs = list({c.ref: (c.ref, c) for c, m in self.boosts if m[row]}.values())
            return pairs, [ref for ref, _ in pairs]
        return self._decode(True, codes[row])

    def _decode(self, boosts: bool, bits: int) -> tuple[list[tuple[str, CompiledRule]], list[str]]:
        found = self._decoded.get((boosts, bits))
        if found is None:
            rules = [c for c, _ in (self.boosts if boosts else self._filters)]
            pairs = list({rules[i].ref: (rules[i].ref, rules[i]) for i in range(len(rules)) if bits >> i & 1}.values())
            found = self._decoded[(boosts, bits)] = (pairs, [ref for ref, _ in pairs])
        return found


class Plan:
    """What one set of fired groups does, made once for every request that fires the same set."""

    def __init__(self, groups: list[Group]) -> None:
        rules = sorted((c for g in groups for c in g.rules), key=by_priority)
        self.rules = rules  # by priority
        self.refs = [c.ref for c in rules]
        self.filtering = [g for g in groups if g.dropping is not None]
        self.boosting = [g for g in groups if g.weighing is not None]
        self.cap = next((c for c in rules if c.cap is not None), None)
        # Injections lowest priority first (a higher one placed later lands exactly where it asks);
        # pins highest first (it takes the slot, and the item).
        self.injects = [(c, rows, at) for c in reversed(rules) for rows, at in c.injects]
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

        # All the groups' drops in one array, and all their weights, once the plan proves popular
        # (see Book.stepping): then a request checks one array, not one per group.
        self.drop: npt.NDArray[np.bool_] | None = self.filtering[0].drop if len(self.filtering) == 1 else None
        self.weight: npt.NDArray[np.float32] | None = self.boosting[0].weight if len(self.boosting) == 1 else None
        self.dropping: memoryview | None = None if self.drop is None else self.drop.data
        self.weighing: memoryview | None = None if self.weight is None else self.weight.data
        # Per row, which of the plan's filters drop it, as bits: the compiled selection ORs them
        # over the rows it drops, and `dropped_by_bits` names the filters. The codes of a plan with
        # one filtering group (its own); None for more groups (combining their codes as well took
        # milliseconds, on the request that made a plan hot, and 8 more bytes an item), then the
        # groups say which filters dropped the rows.
        self.drop_codes: npt.NDArray[np.int64] | None = (
            self.filtering[0].filter_codes if len(self.filtering) == 1 else None
        )
        self.uses = 0  # by remembered blank decisions (Book.decide_blank)
        self.steps = 0  # step-by-step selections while not combined (Book.stepping)
        self._boosted: dict[int, tuple[list[tuple[str, CompiledRule]], list[str]]] = {}
        self._shared: dict[tuple[str, ...], tuple[list[tuple[str, CompiledRule]], list[str]]] = {}
        # Pins of items no filter drops (filters hold against pins), highest priority first.
        self.pins = [(c, row, at) for c in rules for row, at in c.pins if self.passes(row)]
        self.view: View | None = None  # over the book's codes (gateway.rules.placing), when it has them
        self.attach_mask = sum(1 << c.rank for c in self.attaching)  # see Book.applied_of

    def combine(self) -> None:
        """Combine the groups' arrays (well under a millisecond for 100k items and a few groups)."""
        drops = [g.drop for g in self.filtering if g.drop is not None]
        if len(drops) > 1:
            drop = drops[0].copy()
            for more in drops[1:]:
                drop |= more
            self.drop, self.dropping = drop, drop.data
        weights = [g.weight for g in self.boosting if g.weight is not None]
        if len(weights) > 1:
            product = weights[0].copy()
            for factor in weights[1:]:
                product *= factor
            self.weight, self.weighing = product, product.data

    def separate(self) -> None:
        """Let go of the combined arrays (the plan is no longer among the popular ones)."""
        if len(self.filtering) > 1:
            self.drop = self.dropping = None
        if len(self.boosting) > 1:
            self.weight = self.weighing = None

    def boosted_by(self, row: int) -> tuple[list[tuple[str, CompiledRule]], list[str]]:
        """(ref, rule) of the plan's boosts that hold for `row`, and their refs."""
        known = self._boosted.get(row)
        if known is not None:
            return known
        pairs: list[tuple[str, CompiledRule]] = []
        refs: list[str] = []
        for group in self.boosting:
            assert group.weighing is not None
            if group.weighing[row] != 1.0:
                found, names = group.boosted_by(row)
                pairs += found
                refs += names
        # Rows share one answer per combination of rules: the cache holds no object of its own per
        # row, so it adds nothing for the garbage collector to walk.
        shared = self._shared.setdefault(tuple(refs), (pairs, refs))
        if len(self._boosted) < BOOSTED_KEPT:
            self._boosted[row] = shared
        return shared

    def dropped_by_bits(self, bits: int) -> list[tuple[str, CompiledRule]]:
        """(ref, rule) of the filters whose bits (of `drop_codes`) are set."""
        return self.filtering[0].dropped_by_bits(bits)

    def hits(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_] | None:
        """Per row, whether a filter of the plan drops it; None without filters. One numpy
        operation per group (a few µs) beats asking every group in Python for each of ~50 rows."""
        if not self.filtering:
            return None
        if self.drop is not None:
            return self.drop[rows]
        drops = [g.drop for g in self.filtering if g.drop is not None]
        hit = drops[0][rows]
        for more in drops[1:]:
            hit |= more[rows]
        return hit

    def factors(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.float32]:
        """Per row, the product of the plan's boosts (1.0 where none holds)."""
        if self.weight is not None:
            return self.weight[rows]
        weights = [g.weight for g in self.boosting if g.weight is not None]
        product = weights[0][rows]
        for more in weights[1:]:
            product *= more[rows]
        return product

    def passes(self, row: int) -> bool:
        """Whether no filter of the plan drops `row`."""
        if self.dropping is not None:
            return not self.dropping[row]
        for group in self.filtering:
            assert group.dropping is not None
            if group.dropping[row]:
                return False
        return True


def _codes(masks: list[npt.NDArray[np.bool_]]) -> npt.NDArray[np.int64] | None:
    """Per row, bit i set when masks[i] holds; None for none or more than 63 masks."""
    if not masks or len(masks) > 63:
        return None
    code = np.zeros(len(masks[0]), dtype=np.int64)
    for bit, mask in enumerate(masks):
        code[mask] |= 1 << bit
    return code


# A rule's position in its book's priority order, as a sort key (attrgetter: no Python call per rule).
by_priority: Callable[[CompiledRule], int] = operator.attrgetter("rank")
