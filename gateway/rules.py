"""Business rules: what merchandisers change about the model's list, declared as data.

A rule set is a JSON document (`RuleSet`): a time zone, predicate segments, rules and triggers. A
rule has a condition on the visitor and the request (`when`, see gateway.conditions), a priority,
an optional validity window, an enabled flag, the surfaces it applies to, and actions:

    filter   drop the items that match (`items`: ids, categories, tags, price range, stock)
    boost    multiply the standing of matching items by `weight` (below 1 buries them)
    pin      put one item at a 1-based position
    inject   bring specific items into the list (at a position, or in the last place)
    cap      at most `per_category` items of one category (its first category, `depth` levels deep)
    attach   add content (a banner, an offer) to the answer, in a named slot

Conflicts resolve deterministically: rules are taken by priority, highest first, ties by id. Every
filter of every firing rule holds, also against pins and injections (nothing a filter drops ever
shows). The highest-priority cap applies. For a position, the highest-priority pin wins; an item
pinned twice goes where the higher-priority pin puts it. Injections are placed lowest priority
first, so a higher-priority one lands exactly at its position. Per slot, the highest-priority
attachment wins. Boosts multiply.

Order of work on a list (over-fetched by the recommender): filter -> boost (re-rank) -> cap ->
inject -> pin -> cut to n. When a rule re-ranks, places or injects, the answer's scores become rank
scores (1 for the first item, falling by 1/n), so they still read "higher is better".
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.conditions import Compiler, Condition, ContextMatch, Facts, Name, Predicate, Slug
from gateway.segments import MODEL_PREFIX, SegmentDefinition, Segmenter
from gateway.triggers import Trigger

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot

Surface = Literal["recommend", "similar", "popular"]
SURFACES: tuple[Surface, ...] = ("recommend", "similar", "popular")
Position = Annotated[int, msgspec.Meta(ge=1, le=1000)]
# Candidates the rules read beyond what the answer needs, for filters to drop and boosts to lift.
HEADROOM_MIN = 20


class Pick(NamedTuple):
    row: int
    score: float
    reason: str | tuple[str, ...]  # one reason, or several (encoded as the item's `reasons` list)


def reasons_of(pick: Pick) -> tuple[str, ...]:
    return (pick.reason,) if isinstance(pick.reason, str) else pick.reason


class ItemMatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Items with every attribute given (a list: any of its values). Categories match their
    subcategories too; an item of unknown price or stock matches no price or stock condition."""

    ids: list[Name] = []
    categories: list[Name] = []
    tags: list[Name] = []
    price_at_least: Annotated[float, msgspec.Meta(ge=0)] | None = None
    price_at_most: Annotated[float, msgspec.Meta(ge=0)] | None = None
    in_stock: bool | None = None

    def __post_init__(self) -> None:
        given = (self.ids, self.categories, self.tags, self.price_at_least, self.price_at_most, self.in_stock)
        if all(value is None or value == [] for value in given):
            raise ValueError("an item match needs at least one of ids, categories, tags, price_*, in_stock")


class Filter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="filter", tag_field="type"):
    items: ItemMatch


class Boost(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="boost", tag_field="type"):
    items: ItemMatch
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000, description="Above 1 boosts, below 1 buries.")]


class Pin(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="pin", tag_field="type"):
    item: Name
    position: Position


class Inject(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="inject", tag_field="type"):
    items: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=50)]
    position: Position | None = None  # None: the last places of the list


class Cap(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cap", tag_field="type"):
    per_category: Annotated[int, msgspec.Meta(ge=1)]
    depth: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1  # 1: "books" for "books/fiction"


class Attach(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="attach", tag_field="type"):
    slot: Slug
    content: dict[str, Any]


Action = Filter | Boost | Pin | Inject | Cap | Attach


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: Slug
    actions: Annotated[list[Action], msgspec.Meta(min_length=1, max_length=20)]
    when: Condition | None = None  # None: always
    priority: Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000)] = 0
    enabled: bool = True
    valid_from: datetime | None = None  # without an offset: in the rule set's time zone
    valid_until: datetime | None = None
    surfaces: Annotated[list[Surface], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(SURFACES)
    )
    description: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


class RuleSet(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    timezone: Annotated[str, msgspec.Meta(max_length=64)] = "UTC"
    segments: Annotated[list[SegmentDefinition], msgspec.Meta(max_length=200)] = []
    rules: Annotated[list[Rule], msgspec.Meta(max_length=2000)] = []
    triggers: Annotated[list[Trigger], msgspec.Meta(max_length=200)] = []


class RuleSetError(ValueError):
    """An invalid rule set; `field` is a path like `rules[3].actions[0].weight`, `rule` the id of the
    rule (or segment) it is in."""

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


_PATH = re.compile(r"^(rules|segments|triggers)\[(\d+)\]")


def parse(body: bytes) -> RuleSet:
    """The rule set in a JSON body; RuleSetError naming the rule and the field when invalid."""
    try:
        return msgspec.json.decode(body, type=RuleSet)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$.")
        path = at.rstrip("`") or None
        rule = _id_at(body, path)
        kind = next((k for k in ("segment", "trigger") if path and path.startswith(k)), "rule")
        where = f"{kind} {rule!r}: " if rule else ""
        raise RuleSetError(f"{where}{message}" + (f" (at {path})" if path else ""), field=path, rule=rule) from None
    except msgspec.DecodeError as exc:
        raise RuleSetError(f"not JSON: {exc}") from None


def _id_at(body: bytes, path: str | None) -> str | None:
    found = _PATH.match(path or "")
    if found is None:
        return None
    try:
        entry = msgspec.json.decode(body)[found[1]][int(found[2])]
    except (msgspec.DecodeError, LookupError, TypeError):
        return None
    ident = entry.get("id") if isinstance(entry, dict) else None
    return ident if isinstance(ident, str) else None


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


class Content(msgspec.Struct, frozen=True):
    slot: str
    rule: str
    content: dict[str, Any]


@dataclass
class Outcome:
    """What the rules did to one list."""

    picks: list[Pick]
    applied: list[CompiledRule]  # fired and changed something, by priority
    content: list[Content]


# Distinct sets of fired groups whose plans are kept (a few kB each); the most used of them keep
# their groups' arrays combined (5 bytes an item), in this much memory at most.
PLANS_KEPT = 4096
HOT_BYTES = 128 * 1024 * 1024
HOT_PLAN = 4  # a plan not combined is combined on every HOT_PLAN-th use
BOOSTED_KEPT = 10_000  # rows per plan whose boosting rules are remembered


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
        self._boost_code: memoryview | None = None
        self._decoded: dict[tuple[bool, int], tuple[list[tuple[str, CompiledRule]], list[str]]] = {}

    def prepare(self, size: int) -> None:
        self._filters = [(c, m) for c in self.rules for m in c.filters]
        self.boosts = [(c, m) for c in self.rules for m, _ in c.boosts]
        if self._filters:
            masks = [m for _, m in self._filters]
            self.drop = np.logical_or.reduce(masks) if len(masks) > 1 else masks[0]
            self.dropping = self.drop.data
            self._filter_code = _codes(masks)
        if self.boosts:
            weight = np.ones(size, dtype=np.float32)
            for c in self.rules:
                for mask, factor in c.boosts:
                    weight[mask] *= np.float32(factor)
            self.weight = weight
            self.weighing = weight.data
            self._boost_code = _codes([m for _, m in self.boosts])

    def dropped_by(self, rows: list[int]) -> list[tuple[str, CompiledRule]]:
        """(ref, rule) of the group's filters that drop any of `rows`."""
        codes = self._filter_code
        if codes is None:
            return list({c.ref: (c.ref, c) for c, m in self._filters if m[rows].any()}.values())
        bits = 0
        for row in rows:
            bits |= codes[row]
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
        rules = sorted((c for g in groups for c in g.rules), key=_rank)
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
        # (see Book.fire): then a request checks one array, not one per group.
        self.drop: npt.NDArray[np.bool_] | None = self.filtering[0].drop if len(self.filtering) == 1 else None
        self.weight: npt.NDArray[np.float32] | None = self.boosting[0].weight if len(self.boosting) == 1 else None
        self.dropping: memoryview | None = None if self.drop is None else self.drop.data
        self.weighing: memoryview | None = None if self.weight is None else self.weight.data
        self.uses = 0
        self._boosted: dict[int, tuple[list[tuple[str, CompiledRule]], list[str]]] = {}
        self._shared: dict[tuple[str, ...], tuple[list[tuple[str, CompiledRule]], list[str]]] = {}
        # Pins of items no filter drops (filters hold against pins), highest priority first.
        self.pins = [(c, row, at) for c in rules for row, at in c.pins if self.passes(row)]

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

    def hits(self, rows: npt.NDArray[np.int32]) -> list[bool] | None:
        """Per row, whether a filter of the plan drops it; None without filters. One numpy
        operation per group (a few µs) beats asking every group in Python for each of ~50 rows."""
        if not self.filtering:
            return None
        if self.drop is not None:
            found: list[bool] = self.drop[rows].tolist()
            return found
        drops = [g.drop for g in self.filtering if g.drop is not None]
        hit = drops[0][rows]
        for more in drops[1:]:
            hit |= more[rows]
        combined: list[bool] = hit.tolist()
        return combined

    def factors(self, rows: list[int]) -> list[float]:
        """Per row, the product of the plan's boosts (1.0 where none holds)."""
        if self.weighing is not None:
            return [self.weighing[row] for row in rows]
        weights = [g.weight for g in self.boosting if g.weight is not None]
        at = np.asarray(rows, dtype=np.intp)
        product = weights[0][at]
        for more in weights[1:]:
            product *= more[at]
        found: list[float] = product.tolist()
        return found

    def passes(self, row: int) -> bool:
        """Whether no filter of the plan drops `row`."""
        if self.dropping is not None:
            return not self.dropping[row]
        for group in self.filtering:
            assert group.dropping is not None
            if group.dropping[row]:
                return False
        return True


def _codes(masks: list[npt.NDArray[np.bool_]]) -> memoryview | None:
    """Per row, bit i set when masks[i] holds; None for none or more than 63 masks."""
    if not masks or len(masks) > 63:
        return None
    code = np.zeros(len(masks[0]), dtype=np.int64)
    for bit, mask in enumerate(masks):
        code[mask] |= 1 << bit
    return code.data


def _rank(rule: CompiledRule) -> int:
    return rule.rank


@functools.cache
def _standing(size: int) -> tuple[float, ...]:
    """A list's rank-based standing before boosts: 1 for the first, falling evenly towards 0."""
    return tuple(1.0 - i / size for i in range(size))


@functools.cache
def _rank_scores(size: int) -> tuple[float, ...]:
    """Scores of a list the rules re-ranked or placed into: 1 for the first, falling by 1/size."""
    return tuple(round(1.0 - i / size, 6) for i in range(size))


def _inject(
    picks: list[Pick],
    plan: Plan,
    *,
    n: int,
    passes: Callable[[int], bool],
    allowed: Callable[[int], bool],
    applied: dict[str, CompiledRule],
) -> list[Pick]:
    result = picks
    for rule, rows, at in plan.injects:
        shown = {p.row for p in result[:n]}
        place = [row for row in dict.fromkeys(rows) if row not in shown and passes(row) and allowed(row)]
        if not place:
            continue
        kept = [p for p in result if p.row not in place]
        start = min(max(n - len(place), 0) if at is None else at, len(kept))
        result = kept[:start] + [Pick(row, 0.0, rule.ref) for row in place] + kept[start:]
        applied[rule.ref] = rule
    return result


def _pin(
    picks: list[Pick],
    plan: Plan,
    *,
    n: int,
    passes: Callable[[int], bool],
    allowed: Callable[[int], bool],
    applied: dict[str, CompiledRule],
) -> list[Pick]:
    slots: dict[int, tuple[int, CompiledRule]] = {}
    pinned_rows: set[int] = set()
    for rule, row, at in plan.pins:
        if at >= n or at in slots or row in pinned_rows or not passes(row) or not allowed(row):
            continue
        slots[at] = (row, rule)
        pinned_rows.add(row)
    if not slots:
        return picks
    by_row = {p.row: p for p in picks}
    rest: Iterator[Pick] = (p for p in picks if p.row not in pinned_rows)
    result: list[Pick] = []
    for index in range(max(n, len(picks))):
        if index in slots:
            row, rule = slots[index]
            held = by_row.get(row)
            reasons = (*reasons_of(held), rule.ref) if held is not None else (rule.ref,)
            result.append(Pick(row, 0.0, reasons))
            applied[rule.ref] = rule
        else:
            following = next(rest, None)
            if following is None:
                break
            result.append(following)
    # A pin below the end of a short list still lands, at the end.
    result.extend(Pick(row, 0.0, (rule.ref,)) for at, (row, rule) in sorted(slots.items()) if at >= len(result))
    return result


@dataclass(eq=False)
class Ruling:
    """The rules of one request: the visitor's segments, the plan that fires (None: no rule), and
    what the plan's filters and boosts already did to the model's candidates (`rank`)."""

    book: Book
    segments: list[str]
    plan: Plan | None
    applied: dict[str, CompiledRule] = field(default_factory=dict)
    ranked: bool = False  # every candidate went through `order` (and `cap`, if the plan has one)
    reordered: bool = False

    def dropped(self, rows: list[int]) -> None:
        """Note the filters that dropped `rows` (ahead of the answer's last place)."""
        plan = self.plan
        assert plan is not None
        for group in plan.filtering:
            self.applied.update(group.dropped_by(rows))

    def cap(self, rows: list[int], scores: list[float], n: int) -> tuple[list[int], list[float]]:
        """The first n of `rows` (best first) that the plan's cap admits, with their scores."""
        rule = self.plan.cap if self.plan is not None else None
        if rule is None or rule.cap is None:
            return rows, scores
        limit, depth = rule.cap
        keys, distinct = self.book.cap_codes(depth)
        counts = [0] * distinct  # per category, how many are kept
        kept_rows: list[int] = []
        kept_scores: list[float] = []
        skipped = False
        for row, score in zip(rows, scores, strict=True):
            key = keys[row]
            held = counts[key]
            if held >= limit:
                skipped = True
                continue
            counts[key] = held + 1
            kept_rows.append(row)
            kept_scores.append(score)
            if len(kept_rows) == n:
                break
        if skipped:
            self.applied[rule.ref] = rule
        return kept_rows, kept_scores

    def order(self, rows: list[int]) -> list[int] | None:
        """The positions of `rows` (best first) re-ranked by the plan's boosts; None when no boost
        holds for any of them. Every candidate goes through here, so the answer is `ranked`."""
        self.ranked = True
        plan = self.plan
        if plan is None or not plan.boosting or not rows:
            return None
        factors = plan.factors(rows)
        if factors.count(1.0) == len(factors):
            return None
        standing = [s * f for s, f in zip(_standing(len(factors)), factors, strict=True)]
        self.reordered = True
        # reverse=True keeps equal standings in their order: the sort is stable either way
        return sorted(range(len(standing)), key=standing.__getitem__, reverse=True)


class Book:
    """One rule-set version compiled against one snapshot: item matches become boolean masks over
    the catalog, conditions become closures. Rebuilt on every activation, flag change and snapshot
    swap (off the event loop), so a request only evaluates closures and indexes masks."""

    def __init__(
        self,
        ruleset: RuleSet,
        version: int | None,
        snap: Snapshot,
        compiler: Compiler,
        *,
        flags: Mapping[str, bool] | None = None,
        strict: bool = True,
    ) -> None:
        """`strict`: an item a pin or an injection names must be in the catalog (checked when a
        version is stored or activated); otherwise (a later snapshot dropped it) that item is left
        out, with a line in `warnings`, and the rest of the rule set serves."""
        self.ruleset = ruleset
        self.strict = strict
        self.warnings: list[str] = []
        self.version = version
        self.snap = snap
        self.flags = dict(flags or {})
        try:
            self.zone: tzinfo = zoneinfo.ZoneInfo(ruleset.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise RuleSetError(f"unknown time zone {ruleset.timezone!r}", field="timezone") from None
        _check_ids(ruleset)
        self.segmenter = Segmenter(_checked_segments(ruleset, compiler), compiler, snap.segment_model)
        self._masks: dict[bytes, npt.NDArray[np.bool_]] = {}
        compiled = [self._compile(index, rule, compiler) for index, rule in enumerate(ruleset.rules)]
        compiled.sort(key=lambda c: (-c.rule.priority, c.rule.id))
        self.all_rules = compiled
        self.rules = [c for c in compiled if self.flags.get(c.id, c.rule.enabled)]
        self.needs_counters = bool(ruleset.segments or ruleset.rules) and (
            snap.segment_model is not None or _uses_counters(ruleset)
        )
        self.by_ref = {c.ref: c for c in compiled}
        # Rules with the same condition, validity and surfaces fire together: one evaluation each.
        groups: dict[bytes, Group] = {}
        for rank, c in enumerate(self.rules):
            c.rank = rank
            key = msgspec.json.encode((c.rule.when, c.starts, c.ends, sorted(c.surfaces)))
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(c.when, c.starts, c.ends, c.surfaces)
            group.rules.append(c)
        self.groups = list(groups.values())
        firsts = [group.rules[0] for group in self.groups]
        for group in self.groups:
            group.prepare(len(snap.item_ids))
        # Per surface, what `fire` checks of each group: its condition and validity; groups whose
        # whole condition is a page prefix (a category page's rules, often most of a rule set) are
        # found by one scan of their prefixes instead of a call each.
        self._checks: dict[str, list[tuple[int, Predicate | None, float, float]]] = {}
        self._pages: dict[str, list[tuple[tuple[str, ...], int, float, float]]] = {}
        for surface in SURFACES:
            checks, pages = [], []
            for index, (group, first) in enumerate(zip(self.groups, firsts, strict=True)):
                if surface not in group.surfaces:
                    continue
                prefixes = _page_only(first.rule.when)
                if prefixes is not None:
                    pages.append((prefixes, index, group.starts, group.ends))
                else:
                    checks.append((index, group.when, group.starts, group.ends))
            self._checks[surface], self._pages[surface] = checks, pages
        self._plans: OrderedDict[tuple[int, ...], Plan] = OrderedDict()
        self._hot: OrderedDict[tuple[int, ...], Plan] = OrderedDict()  # those with combined arrays
        self._hot_kept = max(8, HOT_BYTES // (5 * max(len(snap.item_ids), 1)))
        self._cap_keys: dict[int, list[str]] = {}
        self._cap_codes: dict[int, tuple[list[int], int]] = {}
        for depth in {c.cap[1] for c in self.rules if c.cap is not None}:
            self.cap_codes(depth)  # here, in the compiling thread, not on a request

    def _compile(self, index: int, rule: Rule, compiler: Compiler) -> CompiledRule:
        where = f"rules[{index}]"
        try:
            when = compiler.compile(rule.when) if rule.when is not None else None
        except ValueError as exc:
            raise RuleSetError(f"rule {rule.id!r}: {exc}", field=f"{where}.when", rule=rule.id) from None
        unknown = (rule.when.segments() if rule.when else set()) - self._segment_ids()
        if unknown:
            name = sorted(unknown)[0]
            raise RuleSetError(f"rule {rule.id!r}: unknown segment {name!r}", field=f"{where}.when", rule=rule.id)
        starts, ends = self._instant(rule.valid_from, -np.inf), self._instant(rule.valid_until, np.inf)
        if starts >= ends:
            raise RuleSetError(
                f"rule {rule.id!r}: valid_until is not after valid_from", field=f"{where}.valid_until", rule=rule.id
            )
        label = "candidate" if self.version is None else self.version  # None: a preview's unsaved rule set
        compiled = CompiledRule(rule, f"rule:{rule.id}@{label}", when, starts, ends, frozenset(rule.surfaces))
        row_of = self.snap.row_of
        for number, action in enumerate(rule.actions):
            if isinstance(action, Filter):
                compiled.filters.append(self.mask(action.items))
            elif isinstance(action, Boost):
                compiled.boosts.append((self.mask(action.items), action.weight))
            elif isinstance(action, Pin):
                if action.item not in row_of and not self.strict:
                    self.warnings.append(f"rule {rule.id!r}: pinned item {action.item!r} is not in the catalog")
                    continue
                if action.item not in row_of:
                    raise RuleSetError(
                        f"rule {rule.id!r}: item {action.item!r} is not in the catalog",
                        field=f"{where}.actions[{number}].item",
                        rule=rule.id,
                    )
                compiled.pins.append((row_of[action.item], action.position - 1))
            elif isinstance(action, Inject):
                missing = [item for item in action.items if item not in row_of]
                if missing and not self.strict:
                    self.warnings.append(
                        f"rule {rule.id!r}: injected items not in the catalog: {', '.join(missing[:5])}"
                    )
                    missing = []
                if missing:
                    raise RuleSetError(
                        f"rule {rule.id!r}: items not in the catalog: {', '.join(missing[:5])}",
                        field=f"{where}.actions[{number}].items",
                        rule=rule.id,
                    )
                at = None if action.position is None else action.position - 1
                compiled.injects.append(([row_of[item] for item in action.items if item in row_of], at))
            elif isinstance(action, Cap):
                if compiled.cap is None:  # a rule's first cap: one cap per rule makes sense
                    compiled.cap = (action.per_category, action.depth)
            else:
                compiled.attach.append((action.slot, action.content))
        return compiled

    def _segment_ids(self) -> set[str]:
        """Segments a rule may refer to: the predicate ones, and any `model:` one (the next snapshot
        may cluster differently; a model segment no visitor is in never fires)."""
        return {s.id for s in self.ruleset.segments} | {
            s for s in _all_segments(self.ruleset) if s.startswith(MODEL_PREFIX)
        }

    def _instant(self, moment: datetime | None, default: float) -> float:
        if moment is None:
            return default
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self.zone)
        return moment.timestamp()

    def mask(self, match: ItemMatch) -> npt.NDArray[np.bool_]:
        """The catalog rows `match` selects (shared between rules that use the same match)."""
        key = msgspec.json.encode(match)
        found = self._masks.get(key)
        if found is not None:
            return found
        snap = self.snap
        size = len(snap.item_ids)
        selected = np.ones(size, dtype=bool)
        if match.ids:
            rows = [snap.row_of[i] for i in match.ids if i in snap.row_of]
            only = np.zeros(size, dtype=bool)
            only[rows] = True
            selected &= only
        if match.categories:
            only = np.zeros(size, dtype=bool)
            for category in match.categories:
                if category in snap.category_rows:
                    only[snap.category_rows[category]] = True
            selected &= only
        if match.tags:
            only = np.zeros(size, dtype=bool)
            for tag in match.tags:
                if tag in snap.tag_rows:
                    only[snap.tag_rows[tag]] = True
            selected &= only
        if match.price_at_least is not None:
            selected &= snap.prices >= match.price_at_least  # NaN (unknown) compares False
        if match.price_at_most is not None:
            selected &= snap.prices <= match.price_at_most
        if match.in_stock is not None:
            known = snap.stock >= 0
            selected &= known & ((snap.stock > 0) == match.in_stock)
        selected.setflags(write=False)
        self._masks[key] = selected
        return selected

    def fire(self, facts: Facts, surface: Surface) -> Plan | None:
        """What the rules that fire for this visitor and request do (None: nothing fires): the
        enabled rules for this surface, valid now, whose condition holds."""
        now = facts.now
        found: list[int] = []
        for index, when, starts, ends in self._checks[surface]:
            if starts <= now < ends and (when is None or when(facts)):
                found.append(index)
        page = facts.page
        if page is not None:
            for prefixes, index, starts, ends in self._pages[surface]:
                if page.startswith(prefixes) and starts <= now < ends:
                    found.append(index)
        if not found:
            return None
        fired = tuple(sorted(found))
        if not fired:
            return None
        plan = self._plans.get(fired)
        if plan is None:
            plan = self._plans[fired] = Plan([self.groups[i] for i in fired])
            while len(self._plans) > PLANS_KEPT:
                self._hot.pop(self._plans.popitem(last=False)[0], None)
        else:
            self._plans.move_to_end(fired)
        plan.uses += 1
        if fired in self._hot:
            self._hot.move_to_end(fired)
        elif plan.uses % HOT_PLAN == 0 and (len(plan.filtering) > 1 or len(plan.boosting) > 1):
            plan.combine()
            self._hot[fired] = plan
            while len(self._hot) > self._hot_kept:
                self._hot.popitem(last=False)[1].separate()
        return plan

    def decide(self, facts: Facts, surface: Surface, *, personal: bool) -> Ruling:
        """The segments and the plan for one request (see Segmenter.assign on `personal`)."""
        return Ruling(self, self.segments(facts, personal=personal), self.fire(facts, surface))

    def fired(self, facts: Facts, surface: Surface) -> list[CompiledRule]:
        """The rules that fire, by priority."""
        plan = self.fire(facts, surface)
        return [] if plan is None else plan.rules

    def apply(
        self,
        picks: Sequence[Pick],
        ruling: Ruling,
        *,
        n: int,
        reserve: Callable[[], Iterable[Pick]],
        allowed: Callable[[int], bool],
    ) -> Outcome:
        """The n picks after the fired rules (`plan`): `picks` is the model's list, best first and
        longer than n where it could be; `reserve` gives more (popular items) when rules leave too
        few; `allowed` says whether the request itself admits a row (its category filter and
        `exclude`), which injections and pins respect as well."""
        plan = ruling.plan
        if plan is None:
            return Outcome(list(picks[:n]), [], [])
        applied = ruling.applied
        ranked: Sequence[Pick] = picks
        reordered = ruling.reordered
        if ruling.ranked:  # filtered and boosted already (Ruling.rank)
            pass
        elif plan.filtering and ranked:
            drop = plan.dropping
            if drop is not None:
                kept = [p for p in ranked if not drop[p.row]]
            else:
                kept = [p for p in ranked if plan.passes(p.row)]
            if len(kept) < len(ranked):
                dropped = [p.row for p in ranked if not plan.passes(p.row)]
                for group in plan.filtering:
                    assert group.dropping is not None
                    mine = [row for row in dropped if group.dropping[row]]
                    if mine:
                        applied.update(group.dropped_by(mine))
                ranked = kept
        if not ruling.ranked and plan.boosting and ranked:
            weight = plan.weighing
            if weight is not None:
                factors: list[float] = [weight[p.row] for p in ranked]
            else:
                factors = [1.0] * len(ranked)
                for group in plan.boosting:
                    assert group.weighing is not None
                    each = group.weighing
                    factors = [f * each[p.row] for f, p in zip(factors, ranked, strict=True)]
            if factors.count(1.0) < len(factors):
                standing = [s * f for s, f in zip(_standing(len(factors)), factors, strict=True)]
                # reverse=True keeps equal standings in their order: the sort is stable either way
                order = sorted(range(len(standing)), key=standing.__getitem__, reverse=True)
                ranked = [ranked[i] for i in order]
                reordered = True
        passes = plan.passes

        cap = plan.cap
        # Candidates the ruling read were capped then (Ruling.cap); others are capped here.
        chosen = list(ranked[:n]) if ruling.ranked else self._capped(ranked, cap, n, applied)
        if len(chosen) < n:
            taken = {p.row for p in chosen} | {p.row for p in ranked}
            more = (p for p in reserve() if p.row not in taken and passes(p.row))
            chosen += self._capped(more, cap, n - len(chosen), applied, counts=self._category_counts(chosen, cap))

        if reordered:
            for at, pick in enumerate(chosen):
                pairs, refs = plan.boosted_by(pick.row)
                if refs:
                    applied.update(pairs)
                    chosen[at] = _tagged(pick, refs)
        placed = chosen
        if plan.injects:
            placed = _inject(placed, plan, n=n, passes=passes, allowed=allowed, applied=applied)
        if plan.pins:
            placed = _pin(placed, plan, n=n, passes=passes, allowed=allowed, applied=applied)
        final = placed[:n] if len(placed) > n else placed
        if reordered or placed is not chosen:
            scores = _rank_scores(len(final))
            final = [Pick(p.row, score, p.reason) for p, score in zip(final, scores, strict=True)]
        for rule in plan.attaching:
            applied[rule.ref] = rule
        return Outcome(final, sorted(applied.values(), key=_rank), plan.content)

    def _capped(
        self,
        picks: Iterable[Pick],
        cap: CompiledRule | None,
        n: int,
        applied: dict[str, CompiledRule],
        counts: dict[str, int] | None = None,
    ) -> list[Pick]:
        if cap is None or cap.cap is None:
            return list(_first(picks, n))
        limit, depth = cap.cap
        keys = self.cap_keys(depth)
        counts = {} if counts is None else counts
        chosen: list[Pick] = []
        for pick in picks:
            key = keys[pick.row]
            held = counts.get(key, 0)
            if held >= limit:
                applied.setdefault(cap.ref, cap)
                continue
            counts[key] = held + 1
            chosen.append(pick)
            if len(chosen) == n:
                break
        return chosen

    def cap_codes(self, depth: int) -> tuple[list[int], int]:
        """Each row's cap category (see cap_keys) as a small number, and how many there are."""
        found = self._cap_codes.get(depth)
        if found is None:
            numbers: dict[str, int] = {}
            codes = [numbers.setdefault(key, len(numbers)) for key in self.cap_keys(depth)]
            found = self._cap_codes[depth] = (codes, len(numbers))
        return found

    def cap_keys(self, depth: int) -> list[str]:
        """Each row's category for caps: its first category, `depth` levels deep."""
        keys = self._cap_keys.get(depth)
        if keys is None:
            keys = self._cap_keys[depth] = [
                "/".join(categories[0].split("/")[:depth]) if categories else "" for categories in self.snap.categories
            ]
        return keys

    def _category_counts(self, picks: Sequence[Pick], cap: CompiledRule | None) -> dict[str, int]:
        counts: dict[str, int] = {}
        if cap is not None and cap.cap is not None:
            keys = self.cap_keys(cap.cap[1])
            for pick in picks:
                counts[keys[pick.row]] = counts.get(keys[pick.row], 0) + 1
        return counts

    def segments(self, facts: Facts, *, personal: bool) -> list[str]:
        return self.segmenter.assign(facts, personal=personal)


def _tagged(pick: Pick, refs: Sequence[str]) -> Pick:
    return pick if not refs else Pick(pick.row, pick.score, (*reasons_of(pick), *refs))


def _first(picks: Iterable[Pick], n: int) -> Iterator[Pick]:
    if n <= 0:
        return
    for count, pick in enumerate(picks, 1):
        yield pick
        if count == n:
            return


def _check_ids(ruleset: RuleSet) -> None:
    lists: tuple[tuple[str, list[str]], ...] = (
        ("rules", [r.id for r in ruleset.rules]),
        ("segments", [s.id for s in ruleset.segments]),
    )
    for kind, ids in lists:
        seen: set[str] = set()
        for index, ident in enumerate(ids):
            if ident in seen:
                raise RuleSetError(f"{kind[:-1]} id {ident!r} is used twice", field=f"{kind}[{index}].id", rule=ident)
            seen.add(ident)


def _checked_segments(ruleset: RuleSet, compiler: Compiler) -> list[SegmentDefinition]:
    """Segments may refer to model segments and to segments defined before them."""
    earlier: set[str] = set()
    for index, segment in enumerate(ruleset.segments):
        unknown = {s for s in segment.when.segments() if not s.startswith(MODEL_PREFIX)} - earlier
        if unknown:
            raise RuleSetError(
                f"segment {segment.id!r}: refers to {sorted(unknown)[0]!r}, which is not defined before it",
                field=f"segments[{index}].when",
                rule=segment.id,
            )
        try:
            compiler.compile(segment.when)
        except ValueError as exc:
            raise RuleSetError(
                f"segment {segment.id!r}: {exc}", field=f"segments[{index}].when", rule=segment.id
            ) from None
        earlier.add(segment.id)
    return list(ruleset.segments)


def _all_segments(ruleset: RuleSet) -> set[str]:
    found: set[str] = set()
    for rule in ruleset.rules:
        if rule.when is not None:
            found |= rule.when.segments()
    return found


def _page_only(when: Condition | None) -> tuple[str, ...] | None:
    """The page prefixes of a condition that is nothing but `{"context": {"page": [...]}}`."""
    if when is None or when.context is None:
        return None
    context = when.context
    if context.page and context == ContextMatch(page=context.page):
        return tuple(context.page)
    return None


def _uses_counters(ruleset: RuleSet) -> bool:
    conditions = [s.when for s in ruleset.segments] + [r.when for r in ruleset.rules if r.when is not None]
    return any("counter" in c.kinds() for c in conditions)
