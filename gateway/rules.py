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

from gateway.conditions import Compiler, Condition, Facts, Name, Predicate, Slug
from gateway.segments import MODEL_PREFIX, SegmentDefinition, Segmenter
from gateway.triggers import Trigger

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot

Surface = Literal["recommend", "similar", "popular"]
SURFACES: tuple[Surface, ...] = ("recommend", "similar", "popular")
Position = Annotated[int, msgspec.Meta(ge=1, le=1000)]
# Candidates the recommender fetches beyond n when rules may drop some (filters, caps).
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


# Distinct sets of fired rules whose combined effect is kept (each up to ~0.5 MB at 100k items).
PLANS_KEPT = 64


@dataclass(eq=False)
class Group:
    """Enabled rules with one condition, validity window and surfaces: they fire together."""

    when: Predicate | None
    starts: float
    ends: float
    surfaces: frozenset[str]
    rules: list[CompiledRule]


class Plan:
    """What one set of fired rules does, over the whole catalog, made once for every request that
    fires the same set: the rows all its filters drop together, and the product of its boosts."""

    def __init__(self, snap: Snapshot, rules: list[CompiledRule]) -> None:
        self.rules = rules  # by priority
        self.refs = [c.ref for c in rules]
        self.filters = [(c, m) for c in rules for m in c.filters]
        self.boosts = [(c, m, w) for c in rules for m, w in c.boosts]
        self.cap = next((c for c in rules if c.cap is not None), None)
        self.placing = [c for c in rules if c.pins or c.injects or c.attach]
        self.drop: npt.NDArray[np.bool_] | None = None
        if self.filters:
            self.drop = (
                np.logical_or.reduce([m for _, m in self.filters]) if len(self.filters) > 1 else self.filters[0][1]
            )
        self.weight: npt.NDArray[np.float32] | None = None
        if self.boosts:
            weight = np.ones(len(snap.item_ids), dtype=np.float32)
            for _, mask, factor in self.boosts:
                weight[mask] *= np.float32(factor)
            self.weight = weight
        # Injections lowest priority first (a higher one placed later lands exactly where it asks);
        # pins highest first (it takes the slot, and the item).
        self.injects = [(c, rows, at) for c in reversed(rules) for rows, at in c.injects]
        self.pins = [(c, row, at) for c in rules for row, at in c.pins]
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
        # Which of the filters and boosts hold for each row, as bits (up to 63 rules of each kind in
        # one plan; past that, attribution checks each rule's mask for the few rows that need it).
        self._filter_code = _codes([m for _, m in self.filters])
        self._boost_code = _codes([m for _, m, _ in self.boosts])
        self._decoded: dict[tuple[bool, int], tuple[list[tuple[str, CompiledRule]], list[str]]] = {}

    def dropped_by(self, rows: npt.NDArray[np.int64]) -> list[tuple[str, CompiledRule]]:
        """(ref, rule) of the filters that drop any of `rows`."""
        if self._filter_code is None:
            return [(c.ref, c) for c, m in self.filters if m[rows].any()]
        bits = int(np.bitwise_or.reduce(self._filter_code[rows]))
        return self._decode(False, bits)[0]

    def boosted_by(self, row: int) -> tuple[list[tuple[str, CompiledRule]], list[str]]:
        """(ref, rule) of the boosts that hold for `row`, and their refs."""
        if self._boost_code is None:
            pairs = list({c.ref: (c.ref, c) for c, m, _ in self.boosts if m[row]}.values())
            return pairs, [ref for ref, _ in pairs]
        return self._decode(True, int(self._boost_code[row]))

    def _decode(self, boosts: bool, bits: int) -> tuple[list[tuple[str, CompiledRule]], list[str]]:
        found = self._decoded.get((boosts, bits))
        if found is None:
            rules = [c for c, *_ in (self.boosts if boosts else self.filters)]
            pairs = list({rules[i].ref: (rules[i].ref, rules[i]) for i in range(len(rules)) if bits >> i & 1}.values())
            found = self._decoded[(boosts, bits)] = (pairs, [ref for ref, _ in pairs])
        return found


def _codes(masks: list[npt.NDArray[np.bool_]]) -> npt.NDArray[np.int64] | None:
    """Per row, bit i set when masks[i] holds; None for none or more than 63 masks."""
    if not masks or len(masks) > 63:
        return None
    code = np.zeros(len(masks[0]), dtype=np.int64)
    for bit, mask in enumerate(masks):
        code[mask] |= 1 << bit
    return code


def _rank(rule: CompiledRule) -> int:
    return rule.rank


@functools.cache
def _standing(size: int) -> npt.NDArray[np.float64]:
    """A list's rank-based standing before boosts: 1 for the first, falling evenly towards 0."""
    standing = 1.0 - np.arange(size) / size
    standing.setflags(write=False)
    return standing


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
        self.headroom = any(c.filters or c.cap for c in self.rules)
        self.by_ref = {c.ref: c for c in compiled}
        # Rules with the same condition, validity and surfaces fire together: one evaluation each.
        groups: dict[bytes, Group] = {}
        for rank, c in enumerate(self.rules):
            c.rank = rank
            key = msgspec.json.encode((c.rule.when, c.starts, c.ends, sorted(c.surfaces)))
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(c.when, c.starts, c.ends, c.surfaces, [])
            group.rules.append(c)
        self.groups = list(groups.values())
        self._plans: OrderedDict[tuple[int, ...], Plan] = OrderedDict()
        self._cap_keys: dict[int, list[str]] = {}

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
            wanted = frozenset(match.tags)
            selected &= np.fromiter((not wanted.isdisjoint(t) for t in snap.item_tags), dtype=bool, count=size)
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
        fired = tuple(
            index
            for index, g in enumerate(self.groups)
            if surface in g.surfaces and g.starts <= now < g.ends and (g.when is None or g.when(facts))
        )
        if not fired:
            return None
        plan = self._plans.get(fired)
        if plan is None:
            plan = self._plans[fired] = Plan(
                self.snap, sorted((c for i in fired for c in self.groups[i].rules), key=_rank)
            )
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(fired)
        return plan

    def fired(self, facts: Facts, surface: Surface) -> list[CompiledRule]:
        """The rules that fire, by priority."""
        plan = self.fire(facts, surface)
        return [] if plan is None else plan.rules

    def apply(
        self,
        picks: Sequence[Pick],
        plan: Plan | None,
        *,
        n: int,
        reserve: Callable[[], Iterable[Pick]],
        allowed: Callable[[int], bool],
    ) -> Outcome:
        """The n picks after the fired rules (`plan`): `picks` is the model's list, best first and
        longer than n where it could be; `reserve` gives more (popular items) when rules leave too
        few; `allowed` says whether the request itself admits a row (its category filter and
        `exclude`), which injections and pins respect as well."""
        if plan is None:
            return Outcome(list(picks[:n]), [], [])
        applied: dict[str, CompiledRule] = {}
        ranked: Sequence[Pick] = picks
        drop, weight = plan.drop, plan.weight
        reordered = False
        if (drop is not None or weight is not None) and picks:
            rows = np.fromiter((p.row for p in picks), dtype=np.int64, count=len(picks))
            index: npt.NDArray[np.intp] | None = None  # of the picks kept, in their new order
            if drop is not None:
                hit = drop[rows]
                if hit.any():
                    applied.update(plan.dropped_by(rows[hit]))
                    index = np.flatnonzero(~hit)
                    rows = rows[index]
            if weight is not None and len(rows):
                factors = weight[rows]
                if (factors != 1.0).any():
                    order = np.argsort(-(_standing(len(rows)) * factors), kind="stable")
                    index = order if index is None else index[order]
                    reordered = True
            if index is not None:
                ranked = [picks[i] for i in index.tolist()]

        def passes(row: int) -> bool:
            return drop is None or not drop[row]

        cap = plan.cap
        chosen = self._capped(ranked, cap, n, applied)
        if len(chosen) < n:
            taken = {p.row for p in chosen} | {p.row for p in ranked}
            more = (p for p in reserve() if p.row not in taken and passes(p.row))
            chosen += self._capped(more, cap, n - len(chosen), applied, counts=self._category_counts(chosen, cap))

        if reordered and weight is not None:
            for at, pick in enumerate(chosen):
                if weight[pick.row] != 1.0:
                    pairs, refs = plan.boosted_by(pick.row)
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
        keys = self._keys_at(depth)
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

    def _keys_at(self, depth: int) -> list[str]:
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
            keys = self._keys_at(cap.cap[1])
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


def _uses_counters(ruleset: RuleSet) -> bool:
    conditions = [s.when for s in ruleset.segments] + [r.when for r in ruleset.rules if r.when is not None]
    return any("counter" in c.kinds() for c in conditions)
