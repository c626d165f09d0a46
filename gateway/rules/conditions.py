"""Conditions over a visitor and a request, shared by rules and segments: declared as data, compiled
once per rule-set version into plain closures, evaluated per request on `Facts`.

A condition is a JSON object with exactly one key:

    {"segment": "frequent-buyers"}                          member of a segment (predicate or model)
    {"counter": {"event": "view", "item": "i1", "window": "7d", "at_least": 3}}
    {"recency": {"event": "purchase", "not_within": "30d"}}  last such event (any event without `event`)
    {"session": {"pages_at_least": 3, "seconds_at_least": 60}}
    {"context": {"device": ["mobile"], "hours": [18, 19, 20], "weekdays": ["sat", "sun"]}}
    {"all": [...]}, {"any": [...]}, {"not": {...}}

Counters are the store's sliding-window counts (gateway.store.base.Profile.counters), so a window
must be one the gateway counts in (`counter_windows_s`: 1h, 1d, 7d, 30d by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Literal, NamedTuple

import msgspec

from gateway.store import Interaction

# A session ends after this long without an event (the common web-analytics convention).
SESSION_GAP_S = 30 * 60.0
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 7 * 86_400.0}
DURATION = r"^[0-9]+(\.[0-9]+)?[smhdw]$"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

Duration = Annotated[
    str, msgspec.Meta(pattern=DURATION, description='A length of time: "90s", "30m", "2h", "7d", "1w".')
]
Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,63}$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Hour = Annotated[int, msgspec.Meta(ge=0, le=23)]


def parse_duration(text: str) -> float:
    """Seconds in "90s", "30m", "2h", "7d" or "1w"."""
    if not re.match(DURATION, text):
        raise ValueError(f"not a duration: {text!r} (expected a number and one of s, m, h, d, w)")
    return float(text[:-1]) * DURATION_UNITS[text[-1]]


_ENTRY = re.compile(r"^([A-Za-z_]+)\[(\d+)\]")


def entry_id(body: bytes, path: str | None) -> str | None:
    """The `id` of the list entry a validation error's path starts in ("rules[3].actions[0]" ->
    the id of the body's rules[3]), so an error can name what the author wrote, not a position."""
    found = _ENTRY.match(path or "")
    if found is None:
        return None
    try:
        entry = msgspec.json.decode(body)[found[1]][int(found[2])]
    except (msgspec.DecodeError, LookupError, TypeError):
        return None
    ident = entry.get("id") if isinstance(entry, dict) else None
    return ident if isinstance(ident, str) else None


class Counter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How often `event` happened in the trailing `window` (for one item or category, if given)."""

    event: Name
    window: Duration = "30d"
    item: Name | None = None
    category: Name | None = None
    at_least: NonNegativeInt | None = None
    at_most: NonNegativeInt | None = None

    def __post_init__(self) -> None:
        if self.item is not None and self.category is not None:
            raise ValueError("give `item` or `category`, not both")
        if self.at_least is None and self.at_most is None:
            raise ValueError("give `at_least`, `at_most` or both")

    def name(self, label: str) -> str:
        """The key of this count in Profile.counters, for the window labelled `label`."""
        detail = f"@item:{self.item}" if self.item else f"@category:{self.category}" if self.category else ""
        return f"{self.event}{detail}/{label}"


class Recency(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """When `event` (any event without it) last happened: `within` a time, or not (`not_within`;
    also true when it never did). Per event type it looks at the recent interactions the gateway
    reads (`recent_limit`), so for "no purchase in 30 days" a counter with `at_most: 0` is exact."""

    event: Name | None = None
    within: Duration | None = None
    not_within: Duration | None = None

    def __post_init__(self) -> None:
        if (self.within is None) == (self.not_within is None):
            raise ValueError("give exactly one of `within` and `not_within`")


class Session(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The current session: the visitor's events with no gap over 30 minutes, the last one less
    than 30 minutes ago. Pages are its views; seconds run from its first event to now."""

    pages_at_least: NonNegativeInt | None = None
    pages_at_most: NonNegativeInt | None = None
    seconds_at_least: NonNegativeInt | None = None
    seconds_at_most: NonNegativeInt | None = None


class ContextMatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The request: every field given must match (a list: any of its values). `referrer` matches a
    part of the referrer, `page` the start of the page; hours and weekdays are in the rule set's
    time zone."""

    device: list[Name] = []
    country: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2}$")]] = []
    referrer: list[Name] = []
    page: list[Name] = []
    hours: list[Hour] = []
    weekdays: list[Weekday] = []


class Condition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of the fields."""

    all: list[Condition] | None = None
    any: list[Condition] | None = None
    not_: Condition | None = msgspec.field(default=None, name="not")
    segment: Slug | None = None
    counter: Counter | None = None
    recency: Recency | None = None
    session: Session | None = None
    context: ContextMatch | None = None

    def __post_init__(self) -> None:
        given = [name for name in CONDITION_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            kinds = ", ".join(f"`{CONDITION_NAMES[name]}`" for name in CONDITION_KINDS)
            raise ValueError(f"a condition has exactly one of {kinds}; this one has {len(given)}")

    def children(self) -> list[Condition]:
        return (self.all or []) + (self.any or []) + ([self.not_] if self.not_ is not None else [])

    def segments(self) -> set[str]:
        """The segments this condition refers to, at any depth."""
        found = {self.segment} if self.segment is not None else set()
        for child in self.children():
            found |= child.segments()
        return found

    def counters(self) -> list[Counter]:
        """The counter conditions in it, at any depth."""
        found = [self.counter] if self.counter is not None else []
        for child in self.children():
            found += child.counters()
        return found

    def kinds(self) -> set[str]:
        """The kinds of condition in it ("counter", "session", ...), at any depth."""
        found = {CONDITION_NAMES[name] for name in CONDITION_KINDS if getattr(self, name) is not None}
        for child in self.children():
            found |= child.kinds()
        return found


CONDITION_KINDS = ("all", "any", "not_", "segment", "counter", "recency", "session", "context")
CONDITION_NAMES = {name: name.rstrip("_") for name in CONDITION_KINDS}


@dataclass(slots=True)
class Facts:
    """What conditions look at for one request. An empty profile stands for a visitor the gateway
    may not or cannot read (no consent, store down): only the request's context is known."""

    now: float
    local: datetime  # now in the rule set's time zone, to the second
    counters: Mapping[str, int] = field(default_factory=dict)
    recent: Sequence[Interaction] = ()
    last_seen: float | None = None
    device: str | None = None
    country: str | None = None
    referrer: str | None = None
    page: str | None = None
    segments: set[str] = field(default_factory=set)
    _session: tuple[int, float] | None = None

    def session(self) -> tuple[int, float]:
        """(pages, seconds) of the current session; (0, 0) without one."""
        if self._session is None:
            pages, start = 0, None
            newest = self.now
            for interaction in reversed(self.recent):
                if newest - interaction.ts > SESSION_GAP_S:
                    break
                start = newest = interaction.ts
                pages += interaction.event == "view"
            self._session = (pages, 0.0) if start is None else (pages, max(self.now - start, 0.0))
        return self._session

    def last(self, event: str | None) -> float | None:
        if event is None:
            return self.last_seen
        for interaction in reversed(self.recent):
            if interaction.event == event:
                return interaction.ts
        return None


class Context(NamedTuple):
    """The request's side of rule conditions."""

    device: str | None = None
    country: str | None = None
    referrer: str | None = None
    page: str | None = None


NO_CONTEXT = Context()


def facts(
    now: float,
    zone: tzinfo = UTC,
    *,
    counters: Mapping[str, int] | None = None,
    recent: Sequence[Interaction] = (),
    last_seen: float | None = None,
    device: str | None = None,
    country: str | None = None,
    referrer: str | None = None,
    page: str | None = None,
) -> Facts:
    return Facts(
        now,
        datetime.fromtimestamp(math.floor(now), zone),  # to the second: its hour and weekday are read
        {} if counters is None else counters,
        recent,
        last_seen,
        device.lower() if device else None,
        country.upper() if country else None,
        referrer,
        page,
    )


Predicate = Callable[[Facts], bool]


class Compiler:
    """Turns conditions into closures, checking what only the gateway knows: its counter windows."""

    def __init__(self, windows: Collection[float], window_label: Callable[[float], str]) -> None:
        self.labels = {seconds: window_label(seconds) for seconds in windows}

    def compile(self, condition: Condition) -> Predicate:  # noqa: PLR0911 - one return per kind
        if condition.all is not None:
            return _every([self.compile(c) for c in condition.all])
        if condition.any is not None:
            return _some([self.compile(c) for c in condition.any])
        if condition.not_ is not None:
            inner = self.compile(condition.not_)
            return lambda f: not inner(f)
        if condition.segment is not None:
            segment = condition.segment
            return lambda f: segment in f.segments
        if condition.counter is not None:
            return self._counter(condition.counter)
        if condition.recency is not None:
            return recency_check(condition.recency)
        if condition.session is not None:
            return session_check(condition.session)
        assert condition.context is not None
        return _context(condition.context)

    def counter_name(self, counter: Counter) -> str:
        seconds = parse_duration(counter.window)
        label = self.labels.get(seconds)
        if label is None:
            known = ", ".join(self.labels.values())
            raise ValueError(f"window {counter.window!r} is not counted by this gateway; counted: {known}")
        return counter.name(label)

    def _counter(self, counter: Counter) -> Predicate:
        name = self.counter_name(counter)
        low = counter.at_least if counter.at_least is not None else 0
        high = counter.at_most if counter.at_most is not None else float("inf")
        return lambda f: low <= f.counters.get(name, 0) <= high


def recency_check(recency: Recency) -> Predicate:
    event = recency.event
    if recency.within is not None:
        within = parse_duration(recency.within)

        def recent_enough(f: Facts) -> bool:
            last = f.last(event)
            return last is not None and f.now - last <= within

        return recent_enough
    assert recency.not_within is not None
    quiet = parse_duration(recency.not_within)

    def quiet_enough(f: Facts) -> bool:
        last = f.last(event)
        return last is None or f.now - last > quiet

    return quiet_enough


def session_check(session: Session) -> Predicate:
    inf = float("inf")
    pages = (session.pages_at_least or 0, inf if session.pages_at_most is None else session.pages_at_most)
    seconds = (session.seconds_at_least or 0, inf if session.seconds_at_most is None else session.seconds_at_most)

    def in_session(f: Facts) -> bool:
        count, length = f.session()
        return pages[0] <= count <= pages[1] and seconds[0] <= length <= seconds[1]

    return in_session


def _every(checks: list[Predicate]) -> Predicate:
    def every(f: Facts) -> bool:
        for check in checks:  # noqa: SIM110 - a loop is twice as fast as all() over a generator
            if not check(f):
                return False
        return True

    return every


def _some(checks: list[Predicate]) -> Predicate:
    def some(f: Facts) -> bool:
        for check in checks:  # noqa: SIM110 - a loop is twice as fast as any() over a generator
            if check(f):
                return True
        return False

    return some


def _context(match: ContextMatch) -> Predicate:
    checks: list[Predicate] = []
    if match.device:
        devices = frozenset(d.lower() for d in match.device)
        checks.append(lambda f: f.device in devices)
    if match.country:
        countries = frozenset(c.upper() for c in match.country)
        checks.append(lambda f: f.country in countries)
    if match.referrer:
        parts = tuple(match.referrer)
        checks.append(lambda f: f.referrer is not None and any(p in f.referrer for p in parts))
    if match.page:
        prefixes = tuple(match.page)
        checks.append(lambda f: f.page is not None and f.page.startswith(prefixes))
    if match.hours:
        hours = frozenset(match.hours)
        checks.append(lambda f: f.local.hour in hours)
    if match.weekdays:
        days = frozenset(WEEKDAYS.index(d) for d in match.weekdays)
        checks.append(lambda f: f.local.weekday() in days)
    return checks[0] if len(checks) == 1 else _every(checks)
