"""Business rules at work: a rule set (gateway.rules.document) compiled against a snapshot (`Book`), and
what the rules that fire for one request do to its list (`Book.apply`, over what
gateway.rules.decision's `Ruling` selected).

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

import bisect
import math
import zoneinfo
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.recommend import kernels
from gateway.rules import conditions, flat, placing
from gateway.rules.conditions import Compiler, Condition, Context, ContextMatch, Facts, Predicate, parse_duration
from gateway.rules.decision import Ruling
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
from gateway.rules.plans import (
    HOT_BYTES,
    HOT_PLAN,
    PLANS_KEPT,
    CompiledRule,
    Group,
    Outcome,
    Pick,
    Plan,
    by_priority,
    rank_scores,
)
from gateway.rules.segments import MODEL_PREFIX, SegmentDefinition, Segmenter
from gateway.store import CounterKey
from gateway.store.base import DAY

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot

# Candidates the rules read beyond what the answer needs, for filters to drop and boosts to lift.
HEADROOM_MIN = 20
# Distinct pages whose page-only rule groups a Book remembers: 20 MB at most (a page is up to 2,048
# characters), usually far less; pages past these are scanned on each request, as before.
PAGES_KEPT = 10_000
# Request contexts whose decision for a visitor with an empty profile a Book remembers (see
# Book.decide_blank): a few hundred bytes each, 18 MB at most (a page and a referrer may each be
# 2,048 characters); past these the memory starts again.
BLANK_KEPT = 4_096


class Book:
    """One rule-set version compiled against one snapshot: item matches become boolean masks over
    the catalog, conditions become closures and, per surface, one generated function (gateway.rules.flat).
    Rebuilt on every activation, flag change and snapshot swap (off the event loop), so a request
    only evaluates compiled conditions and indexes masks."""

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
        # The counters the conditions and the segment model read: a profile read asks for only these.
        self.counter_query = _counter_query(ruleset, compiler, snap) if self.needs_counters else ()
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
        self.codes = placing.book_codes(self.groups, len(snap.item_ids))
        # Per surface, what `fire` checks of each group: its condition and validity; groups whose
        # whole condition is a page prefix (a category page's rules, often most of a rule set) are
        # found by one scan of their prefixes instead of a call each.
        # The checks also as one generated function per surface (gateway.rules.flat), when they compile.
        self._checks: dict[str, list[tuple[int, Predicate | None, float, float]]] = {}
        self._fire: dict[str, Callable[[Facts], int] | None] = {}
        self._pages: dict[str, list[tuple[tuple[str, ...], int, float, float]]] = {}
        for surface in SURFACES:
            checks, conditions_of, pages = [], [], []
            for index, (group, first) in enumerate(zip(self.groups, firsts, strict=True)):
                if surface not in group.surfaces:
                    continue
                prefixes = _page_only(first.rule.when)
                if prefixes is not None:
                    pages.append((prefixes, index, group.starts, group.ends))
                else:
                    checks.append((index, group.when, group.starts, group.ends))
                    conditions_of.append((index, first.rule.when, group.starts, group.ends))
            self._checks[surface], self._pages[surface] = checks, pages
            self._fire[surface] = flat.fired_function(conditions_of, compiler)
        self._page_groups: dict[tuple[str, str], tuple[int, tuple[tuple[int, float, float], ...]]] = {}
        # Every instant at which some group starts or stops being valid: between two of them the
        # same groups are valid (see decide_blank).
        self._boundaries = sorted({t for g in self.groups for t in (g.starts, g.ends) if np.isfinite(t)})
        self._blank: dict[tuple[object, ...], tuple[list[str], int, Plan | None]] = {}
        self._clock: tuple[float, float, int] = (0.0, 0.0, 0)  # see _clock_at
        self._plans: OrderedDict[int, Plan] = OrderedDict()  # by the mask of their groups (_fired)
        self._hot: OrderedDict[Plan, None] = OrderedDict()  # plans with combined arrays (see stepping)
        self._hot_kept = max(8, HOT_BYTES // (5 * max(len(snap.item_ids), 1)))
        self._cap_keys: dict[int, list[str]] = {}
        # Per byte of a rank mask and per value of that byte, the refs of its rules (applied_of).
        self._rank_bytes = [
            [
                tuple(self.rules[8 * at + b].ref for b in range(8) if byte >> b & 1 and 8 * at + b < len(self.rules))
                for byte in range(256)
            ]
            for at in range((len(self.rules) + 7) // 8)
        ]
        self._cap_codes: dict[int, tuple[list[int], int]] = {}
        self._cap_arrays: dict[int, tuple[npt.NDArray[np.int32], int]] = {}
        for depth in {c.cap[1] for c in self.rules if c.cap is not None}:
            self.cap_array(depth)  # here, in the compiling thread, not on a request

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
        return self._plan_of(self._fired(facts, surface))

    def _fired(self, facts: Facts, surface: Surface) -> int:
        """The groups that fire, as a mask: bit i for group i (an int hashes and combines faster
        than a sorted tuple of indexes)."""
        now = facts.now
        fire = self._fire[surface]
        if fire is not None:
            found = fire(facts)
        else:
            found = 0
            for index, when, starts, ends in self._checks[surface]:
                if starts <= now < ends and (when is None or when(facts)):
                    found |= 1 << index
        page = facts.page
        if page is not None:
            always, timed = self._on_page(surface, page)
            found |= always
            for bit, starts, ends in timed:
                if starts <= now < ends:
                    found |= bit
        return found

    def _plan_of(self, fired: int) -> Plan | None:
        """The plan of these fired groups (a mask, see _fired), made once and kept (the
        PLANS_KEPT most recent)."""
        if not fired:
            return None
        plan = self._plans.get(fired)
        if plan is None:
            indexes = [i for i in range(fired.bit_length()) if fired >> i & 1]
            plan = self._plans[fired] = Plan([self.groups[i] for i in indexes])
            if self.codes is not None:
                boosting = [i for i in indexes if self.groups[i].weighing is not None]
                plan.view = self.codes.view(indexes, boosting, plan, self.capping(plan))
            while len(self._plans) > PLANS_KEPT:
                dropped = self._plans.popitem(last=False)[1]
                if dropped in self._hot:  # a remembered blank decision may still hold it
                    del self._hot[dropped]
                    dropped.separate()
        else:
            self._plans.move_to_end(fired)
        return plan

    def stepping(self, plan: Plan) -> None:
        """`plan` is taken step by step (Ruling.select), which reads one drop array and one weight
        array fastest: a plan of several filtering or boosting groups taken this way often enough gets
        its groups' arrays combined (every HOT_PLAN-th time until it is), and the _hot_kept most
        recent keep them. The compiled answer (Ruling.place, a request without a category filter)
        reads the book's codes instead: combining for it (a few hundred µs and a catalog-sized
        write, which evicts the CPU caches) bought nothing."""
        hot = self._hot
        if plan in hot:
            hot.move_to_end(plan)
            return
        plan.steps += 1
        if plan.steps % HOT_PLAN == 0 and (len(plan.filtering) > 1 or len(plan.boosting) > 1):
            plan.combine()
            hot[plan] = None
            while len(hot) > self._hot_kept:
                hot.popitem(last=False)[0].separate()

    def _on_page(self, surface: Surface, page: str) -> tuple[int, tuple[tuple[int, float, float], ...]]:
        """The page-only groups whose prefixes `page` starts with, as the mask of those always
        valid and (bit, validity) of the others: one scan per distinct page, then a lookup (a shop
        has a bounded set of pages; past PAGES_KEPT of them, the others are scanned each time
        rather than remembered)."""
        found = self._page_groups.get((surface, page))
        if found is None:
            always, timed = 0, []
            for prefixes, index, starts, ends in self._pages[surface]:
                if page.startswith(prefixes):
                    if starts == -math.inf and ends == math.inf:
                        always |= 1 << index
                    else:
                        timed.append((1 << index, starts, ends))
            found = (always, tuple(timed))
            if len(self._page_groups) < PAGES_KEPT:
                self._page_groups[(surface, page)] = found
        return found

    def decide(self, facts: Facts, surface: Surface, *, personal: bool) -> Ruling:
        """The segments and the plan for one request (see Segmenter.assign on `personal`)."""
        return Ruling(self, self.segments(facts, personal=personal), self.fire(facts, surface))

    def decide_blank(self, now: float, surface: Surface, context: Context, *, personal: bool) -> Ruling:
        """`decide` for a visitor with nothing in their profile (no recent events, no counters, no
        last visit; or no profile read). Every condition then reads only the request's context,
        the local hour and weekday, and which groups are valid: counters are 0, recency and
        session facts have no event to read. So the segments and the fired groups are remembered
        per those (`context` whole; about 10 µs a request: the facts, the segments and the conditions; cold
        visitors, first page views and visitors without consent all get here). A property test
        compares it with `decide`."""
        start, end, clock = self._clock
        if not start <= now < end:
            clock = self._clock_at(now)
        key = (surface, personal, context, clock)
        found = self._blank.get(key)
        if found is None:
            device, country, referrer, page = context
            facts = conditions.facts(now, self.zone, device=device, country=country, referrer=referrer, page=page)
            segments = self.segments(facts, personal=personal)  # first: conditions may ask for them
            fired = self._fired(facts, surface)
            found = (segments, fired, self._plan_of(fired))
            if len(self._blank) >= BLANK_KEPT:
                self._blank.clear()
            self._blank[key] = found
            return Ruling(self, list(found[0]), found[2])
        segments, fired, plan = found
        # The plan is remembered with the decision: the bookkeeping of _plan_of (which plans are
        # recent) is done on every HOT_PLAN-th use, not on each (a few µs when cold).
        if plan is not None:
            plan.uses += 1
            if plan.uses % HOT_PLAN == 0:
                kept = self._plan_of(fired)
                if kept is not plan:  # forgotten meanwhile and made again
                    self._blank[key] = (segments, fired, kept)
                    plan = kept
        return Ruling(self, list(segments), plan)

    def _clock_at(self, now: float) -> int:
        """What of `now` a blank decision reads, as one number: the local hour and weekday, and
        which groups are valid (the boundaries passed). It holds to the end of the second (the
        local time is read to the second; zone offsets are whole seconds) or to the next boundary,
        whichever comes first; kept for that span, so most requests compare two floats instead of
        converting the time and searching the boundaries."""
        local = conditions.local_time(now, self.zone)
        boundaries = self._boundaries
        epoch = bisect.bisect_right(boundaries, now)
        second = float(math.floor(now))
        start = max(second, boundaries[epoch - 1]) if epoch else second
        end = min(second + 1.0, boundaries[epoch]) if epoch < len(boundaries) else second + 1.0
        clock = (epoch * 7 + local.weekday()) * 24 + local.hour
        self._clock = (start, end, clock)
        return clock

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
        # The recommender reads its candidates through the ruling (Ruling.select); a list of picks
        # from elsewhere goes through it here.
        kept = range(min(n, len(picks))) if ruling.ranked else ruling.select([p.row for p in picks], n)
        chosen = [picks[at] for at in kept]
        reordered = ruling.reordered
        passes = plan.passes
        if len(chosen) < n:
            taken = {p.row for p in picks}  # chosen are among them
            chosen = ruling.fill(chosen, reserve(), n, taken=taken, passes=passes)

        if reordered:
            boosted_by = plan.boosted_by
            for at, pick in enumerate(chosen):
                pairs, refs = boosted_by(pick.row)
                if refs:
                    applied.update(pairs)
                    reason = pick.reason  # `tagged`, inlined: one call less per pick
                    chosen[at] = Pick(
                        pick.row, pick.score, (reason, *refs) if isinstance(reason, str) else (*reason, *refs)
                    )
        placed = chosen
        if plan.injects:
            placed = ruling.inject(placed, n, allowed)
        if plan.pins:
            placed = ruling.pin(placed, n, allowed)
        final = placed[:n] if len(placed) > n else placed
        if reordered or placed is not chosen:
            scores = rank_scores(len(final))
            final = [Pick(p.row, score, p.reason) for p, score in zip(final, scores, strict=True)]
        for rule in plan.attaching:
            applied[rule.ref] = rule
        rules = sorted(applied.values(), key=by_priority)
        return Outcome(final, [rule.ref for rule in rules], plan.content, self.by_ref)

    def applied_of(self, ranks: int) -> list[str]:
        """The refs of the rules whose `rank` bits are set, by priority. Byte by byte, lowest
        (highest priority) first: a table lookup per byte costs less than one per bit. Not
        remembered: most masks are new (they name the boosts of each pick; 2,698 distinct in 3,421
        answers of the benchmark mix), and a memory of them cost more than it saved (3.9 against
        3.1 µs a cold call)."""
        found: list[str] = []
        by_byte = self._rank_bytes
        for at, byte in enumerate(ranks.to_bytes(len(by_byte), "little")):
            if byte:
                found += by_byte[at][byte]
        return found

    def capping(self, plan: Plan) -> tuple[npt.NDArray[np.int32], int, int]:
        """The plan's cap for the compiled calls: each row's cap key, how many keys, how many per key
        (no keys: no cap)."""
        rule = plan.cap
        if rule is None or rule.cap is None:
            return kernels.NO_KEYS, 0, 0
        keys, distinct = self.cap_array(rule.cap[1])
        return keys, distinct, rule.cap[0]

    def cap_codes(self, depth: int) -> tuple[list[int], int]:
        """Each row's cap category (see cap_keys) as a small number, and how many there are."""
        found = self._cap_codes.get(depth)
        if found is None:
            numbers: dict[str, int] = {}
            codes = [numbers.setdefault(key, len(numbers)) for key in self.cap_keys(depth)]
            found = self._cap_codes[depth] = (codes, len(numbers))
        return found

    def cap_array(self, depth: int) -> tuple[npt.NDArray[np.int32], int]:
        """cap_codes as an array (for gateway.recommend.kernels.select)."""
        found = self._cap_arrays.get(depth)
        if found is None:
            codes, distinct = self.cap_codes(depth)
            found = self._cap_arrays[depth] = (np.array(codes, dtype=np.int32), distinct)
        return found

    def cap_keys(self, depth: int) -> list[str]:
        """Each row's category for caps: its first category, `depth` levels deep."""
        keys = self._cap_keys.get(depth)
        if keys is None:
            keys = self._cap_keys[depth] = [
                "/".join(categories[0].split("/")[:depth]) if categories else "" for categories in self.snap.categories
            ]
        return keys

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


def _page_only(when: Condition | None) -> tuple[str, ...] | None:
    """The page prefixes of a condition that is nothing but `{"context": {"page": [...]}}`."""
    if when is None or when.context is None:
        return None
    context = when.context
    if context.page and context == ContextMatch(page=context.page):
        return tuple(context.page)
    return None


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
