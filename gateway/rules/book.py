"""Business rules at work: a rule set (gateway.rules.document) compiled against a snapshot (`Book`),
and the decision for one request (`Book.decide`: the visitor's segments and the plan of the rules
that fire, gateway.rules.decision).

Compiling turns conditions into closures (gateway.rules.conditions) and every filter and boost
action into one bit per catalog item (`Actions`), so a request evaluates the conditions, gathers
its candidates' bits and works on those (gateway.rules.decision.Ruling).
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Mapping
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.rules import conditions
from gateway.rules.conditions import Compiler, Context, Facts, Predicate, parse_duration
from gateway.rules.decision import Actions, CompiledRule, Plan, Ruling
from gateway.rules.document import (
    SURFACES,
    Boost,
    Cap,
    Filter,
    Inject,
    ItemMatch,
    Pin,
    Rule,
    RuleSet,
    RuleSetError,
    Surface,
)
from gateway.rules.segments import MODEL_PREFIX, SegmentDefinition, Segmenter
from gateway.snapshot import attribute_key
from gateway.store import CounterKey
from gateway.store.base import DAY

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot

# Candidates the rules read beyond what the answer needs, for filters to drop and boosts to lift.
HEADROOM_MIN = 20
# Plans a book keeps (a few kB each; see Book.plan); past these it starts again.
PLANS_KEPT = 4096


class Book:
    """One rule-set version compiled against one snapshot. Rebuilt on every activation, flag
    change and snapshot swap (off the event loop), so a request only evaluates closures and
    gathers bits."""

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
        compiled = [self._compile(index, rule, compiler) for index, rule in enumerate(ruleset.rules)]
        compiled.sort(key=lambda c: (-c.rule.priority, c.rule.id))
        self.all_rules = compiled
        self.rules = [c for c in compiled if self.flags.get(c.id, c.rule.enabled)]
        for rank, c in enumerate(self.rules):
            c.rank = rank
        self.needs_counters = bool(ruleset.segments or ruleset.rules) and (
            snap.segment_model is not None or _uses_counters(ruleset)
        )
        # The counters the conditions and the segment model read: a profile read asks for only these.
        self.counter_query = _counter_query(ruleset, compiler, snap) if self.needs_counters else ()
        self.actions = self._actions()
        # Per surface, each distinct (condition, validity) of its rules, with the ranks of the rules
        # it fires as a mask: rules with the same condition take one evaluation.
        self._checks: dict[str, list[tuple[Predicate | None, float, float, int]]] = {}
        for surface in SURFACES:
            checks: dict[tuple[bytes, float, float], tuple[Predicate | None, float, float, int]] = {}
            for c in self.rules:
                if surface in c.surfaces:
                    key = (msgspec.json.encode(c.rule.when), c.starts, c.ends)
                    when, starts, ends, ranks = checks.get(key, (c.when, c.starts, c.ends, 0))
                    checks[key] = (when, starts, ends, ranks | 1 << c.rank)
            self._checks[surface] = list(checks.values())
        # The plan of each set of fired rules (by the mask of their ranks) made so far: the sets
        # repeat (a rule set's conditions let visitors fire a few dozen sets), a plan takes a
        # numpy call or two per rule to make, and the recommender remembers the answers of
        # shared candidate lists by plan (Recommender._select).
        self._plans: dict[int, Plan] = {}

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
            if isinstance(action, Filter | Boost):
                continue  # see _actions
            if isinstance(action, Pin):
                if action.item not in row_of and not self.strict:
                    self.warnings.append(f"rule {rule.id!r}: pinned item {action.item!r} is not in the catalog")
                    continue
                if action.item not in row_of:
                    raise RuleSetError(
                        f"rule {rule.id!r}: item {action.item!r} is not in the catalog",
                        field=f"{where}.actions[{number}].item",
                        rule=rule.id,
                    )
                if row_of[action.item] not in self.snap.withheld:  # retired, unavailable, out of stock
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
                withheld = self.snap.withheld
                rows = [row_of[item] for item in action.items if item in row_of]
                compiled.injects.append(([row for row in rows if row not in withheld], at))
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
        """The catalog rows `match` selects."""
        snap = self.snap
        size = len(snap.item_ids)
        selected = np.ones(size, dtype=bool)
        for wanted, index in ((match.categories, snap.category_rows), (match.tags, snap.tag_rows)):
            if wanted:
                only = np.zeros(size, dtype=bool)
                for name in wanted:
                    if name in index:
                        only[index[name]] = True
                selected &= only
        if match.ids:
            only = np.zeros(size, dtype=bool)
            only[[snap.row_of[i] for i in match.ids if i in snap.row_of]] = True
            selected &= only
        if match.price_at_least is not None:
            selected &= snap.prices >= match.price_at_least  # NaN (unknown) compares False
        if match.price_at_most is not None:
            selected &= snap.prices <= match.price_at_most
        if match.in_stock is not None:
            selected &= (snap.stock >= 0) & ((snap.stock > 0) == match.in_stock)
        for name, values in match.attributes.items():
            only = np.zeros(size, dtype=bool)
            for value in values:
                rows = snap.attribute_rows.get(attribute_key(name, value))
                if rows is not None:
                    only[rows] = True
            selected &= only
        return selected

    def _actions(self) -> Actions:
        """The enabled rules' filter and boost actions as bits per catalog row (see Actions), and
        each row's category for the caps they use."""
        found = [(c, action) for c in self.rules for action in c.rule.actions if isinstance(action, Filter | Boost)]
        bits = np.zeros((len(self.snap.item_ids), (len(found) + 7) // 8), dtype=np.uint8)
        for b, (_, action) in enumerate(found):
            bits[self.mask(action.items), b >> 3] |= np.uint8(1 << (b & 7))
        bits.setflags(write=False)
        cap_keys = {}
        for depth in {c.cap[1] for c in self.rules if c.cap is not None}:
            numbers: dict[str, int] = {}
            keys = [
                "/".join(categories[0].split("/")[:depth]) if categories else "" for categories in self.snap.categories
            ]
            cap_keys[depth] = [numbers.setdefault(key, len(numbers)) for key in keys]
        return Actions(
            bits,
            [c for c, _ in found],
            np.array([a.weight if isinstance(a, Boost) else np.nan for _, a in found], dtype=np.float32).tolist(),
            cap_keys,
        )

    def decide(self, facts: Facts, surface: Surface, *, personal: bool) -> Ruling:
        """The segments and the plan for one request (see Segmenter.assign on `personal`)."""
        segments = self.segments(facts, personal=personal)  # first: conditions may ask for them
        return Ruling(segments, self.fire(facts, surface))

    def decide_blank(self, now: float, surface: Surface, context: Context, *, personal: bool) -> Ruling:
        """`decide` for a visitor with nothing in their profile (no recent events, no counters, no
        last visit; or no profile read): only the request's context and the time are known."""
        device, country, referrer, page = context
        facts = conditions.facts(now, self.zone, device=device, country=country, referrer=referrer, page=page)
        return self.decide(facts, surface, personal=personal)

    def fire(self, facts: Facts, surface: Surface) -> Plan | None:
        """What the rules that fire for this visitor and request do (None: nothing fires): the
        enabled rules for this surface, valid now, whose condition holds."""
        now, fired = facts.now, 0
        for when, starts, ends, ranks in self._checks[surface]:
            if starts <= now < ends and (when is None or when(facts)):
                fired |= ranks
        return self.plan(fired) if fired else None

    def plan(self, fired: int) -> Plan:
        """The plan of the rules whose ranks are set in `fired`."""
        plan = self._plans.get(fired)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[fired] = Plan([c for c in self.rules if fired >> c.rank & 1], self.actions)
        return plan

    def fired(self, facts: Facts, surface: Surface) -> list[CompiledRule]:
        """The rules that fire, by priority."""
        plan = self.fire(facts, surface)
        return [] if plan is None else plan.rules

    def segments(self, facts: Facts, *, personal: bool) -> list[str]:
        return self.segmenter.assign(facts, personal=personal)


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


def _counter_query(ruleset: RuleSet, compiler: Compiler, snap: Snapshot) -> tuple[CounterKey, ...]:
    conditions = [s.when for s in ruleset.segments] + [r.when for r in ruleset.rules if r.when is not None]
    wanted = {
        compiler.counter_name(counter): parse_duration(counter.window)
        for condition in conditions
        for counter in condition.counters()
    }
    model = snap.segment_model
    if model is not None:
        wanted.update((key, model.window_days * DAY) for key in model.counter_names())
    return tuple(CounterKey(key, key.rsplit("/", 1)[0], window) for key, window in sorted(wanted.items()))


def _uses_counters(ruleset: RuleSet) -> bool:
    conditions = [s.when for s in ruleset.segments] + [r.when for r in ruleset.rules if r.when is not None]
    return any("counter" in c.kinds() for c in conditions)
