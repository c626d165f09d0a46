"""The per-visitor state every gateway process reads on the hot path, behind one async protocol.

Two backends implement it, chosen by URL (`open_store` in `gateway.store`): `memory://` keeps the
state in this process; `redis://host:port/db` shares it between processes and hosts. The contract
tests in `tests/test_store_contract.py` run the same behaviours against both.

Every method is at most one round trip to the backend: `profile` is what a recommendation request
reads, `record` is what an event batch writes (for one visitor). Triggers (gateway.rules.triggers) keep
timers, fired marks and an inbox per visitor here too: timers are durable with a shared backend
(they outlive the process that set them), in-process only with the memory store.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal, NamedTuple, Protocol

import msgspec

Listener = Callable[[str], None]
MessageListener = Callable[[str, bytes], None]  # (visitor, message) of `fire`
ErasureListener = Callable[[str], Awaitable[int]]  # closes what this process holds of the visitor; how many sockets


class StoreError(Exception):
    """The store is unreachable or answered with an error; the caller degrades, it does not crash."""


class StoreTimeoutError(StoreError, TimeoutError):
    """The store did not answer in time."""


class PartlyStoredError(StoreError):
    """`record_many` failed part-way. `outcomes` maps the position in the batch of each visitor whose
    outcome is known to it (what `record` returns); every other visitor's events are not stored, or,
    when the connection failed mid-way, may be: a retry with the same event ids stores exactly what
    is missing (the rest come back as duplicates)."""

    def __init__(self, message: str, outcomes: dict[int, list[bool] | None]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


class Interaction(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One remembered interaction, stored compactly as [item, event, ts].

    gc=False: it holds only strings and a float, so it can never be part of a reference cycle, and
    an in-process store holding millions of them must not make every full collection walk them."""

    item: str
    event: str
    ts: float  # Unix seconds, UTC


class Recorded(msgspec.Struct, frozen=True, gc=False):
    """One accepted event, as `record` takes it."""

    event: str
    ts: float  # Unix seconds, UTC
    item: str | None = None
    id: str | None = None  # the client's event id: a second event with an id seen before is a duplicate
    categories: tuple[str, ...] = ()  # of the item: counted per category too
    query: str | None = None
    value: float | None = None
    request_id: str | None = None  # of the answer a click came from (experiments' attribution; not stored)

    def interaction(self) -> Interaction | None:
        return None if self.item is None else Interaction(self.item, self.event, self.ts)

    def counter_names(self) -> list[str]:
        """`event` for every event; `event@item:ID` and `event@category:C` for the details."""
        names = [self.event]
        if self.item is not None:
            names.append(f"{self.event}@item:{self.item}")
        names.extend(f"{self.event}@category:{category}" for category in self.categories)
        return names

    def log_line(self, visitor: str) -> bytes:
        """The event as a line of `tailor build --events` JSONL input."""
        return _encode_log(LogLine(visitor, self.event, self.ts, self.item, self.value, self.id, self.query))


class Forgotten(msgspec.Struct, frozen=True):
    """What `forget` removed."""

    profile: bool  # there was state for the visitor
    log_events: int  # events of the visitor removed from the event log


class LogLine(msgspec.Struct, omit_defaults=True):
    """The index builder's interaction record (index_builder.schema.Interaction), with `timestamp`
    as Unix seconds: the gateway's event log is a `tailor build --events` input as it stands."""

    user_id: str
    event: str
    timestamp: float
    item_id: str | None = None
    value: float | None = None
    event_id: str | None = None
    query: str | None = None


_encode_log = msgspec.json.Encoder().encode
decode_log = msgspec.json.Decoder(LogLine).decode

DAY = 86_400.0
DEFAULT_WINDOWS = (3_600.0, DAY, 7 * DAY, 30 * DAY)


class Retention(msgspec.Struct, frozen=True):
    """How much of each visitor a store keeps, and for how long."""

    keep: int = 100  # recent interactions
    ttl: float = 30 * DAY  # everything of a visitor expires this long after their latest event
    ids: int = 1000  # event ids remembered for de-duplication
    windows: tuple[float, ...] = DEFAULT_WINDOWS  # counter windows, seconds
    max_counters: int = 500  # counter fields; past it no new per-item or per-category counters start
    log: int = 1_000_000  # events the shared log keeps (Redis stream, approximately); 0 = no log
    log_ttl: float = 90 * DAY  # logged events older than this are dropped (0: kept until `log` pushes them out)

    def __post_init__(self) -> None:
        if self.keep < 1 or self.ttl <= 0 or self.ids < 0 or self.max_counters < 1 or self.log < 0 or self.log_ttl < 0:
            raise ValueError(f"retention out of range: {self}")
        if not self.windows or any(w <= 0 for w in self.windows):
            raise ValueError(f"counter windows must be positive seconds, not {self.windows}")


def window_label(seconds: float) -> str:
    """3600 -> "1h", 604800 -> "7d": how a window names its counters in a profile."""
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def counter_field(name: str, window: float) -> str:
    """A counter's name in a visitor's state, "name|window" (the window as Python writes a float):
    the Redis store's hash field (its record script joins the same in Lua) and the memory store's key."""
    return f"{name}|{float(window)!r}"


def counter_of_field(field: str) -> tuple[str, float]:
    """The counted name and the window of a `counter_field`."""
    name, _, window = field.rpartition("|")
    return name, float(window)


def sliding_count(bucket: int, current: int, previous: int, window: float, now: float) -> int:
    """Events in the `window` seconds before `now`, estimated from the counts of the fixed window
    (bucket = floor(ts / window)) written last and the one before it, the older one weighted by how
    much of it the sliding window still covers. Bounded state per counter, exact at bucket edges."""
    now_bucket = math.floor(now / window)
    into = (now - now_bucket * window) / window
    if bucket == now_bucket:
        estimate = current + previous * (1.0 - into)
    elif bucket == now_bucket - 1:
        estimate = current * (1.0 - into)
    else:
        return 0
    return round(estimate)


def bump(state: tuple[int, int, int] | None, bucket: int) -> tuple[int, int, int] | None:
    """A counter's (bucket, current, previous) after one event in `bucket`; None when the event
    belongs to a window older than the counter's latest (a lagging clock): it is not counted."""
    if state is None:
        return bucket, 1, 0
    held, current, previous = state
    if bucket == held:
        return bucket, current + 1, previous
    if bucket == held + 1:
        return bucket, 1, current
    if bucket > held + 1:
        return bucket, 1, 0
    if bucket == held - 1:
        return held, current, previous + 1
    return None


PURPOSES = ("analytics", "personalization", "marketing")
ConsentState = Literal["granted", "denied", "revoked"]


class Consent(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """One purpose's choice: what, when (Unix seconds), who set it, and until when it holds.

    gc=False: strings and numbers only, never part of a cycle (the memory store keeps one per
    visitor and purpose; see memory._Visitor)."""

    state: ConsentState
    at: float
    source: str
    expires_at: float | None = None

    def allows(self, now: float) -> bool:
        return self.state == "granted" and (self.expires_at is None or self.expires_at > now)


class Requirement(NamedTuple):
    """What a store call may touch only with the visitor's consent: a purpose, and whether a visitor
    who made no choice for it counts as allowing it (the opt-out model) or not (opt-in). A choice
    made decides: only an unexpired "granted" allows; an expired grant counts as not granted."""

    purpose: str
    default: bool

    def permits(self, consent: Mapping[str, Consent], now: float) -> bool:
        choice = consent.get(self.purpose)
        return self.default if choice is None else choice.allows(now)


class Profile(msgspec.Struct, frozen=True):
    """What the store knows of one visitor right now."""

    recent: list[Interaction]  # oldest first, the newest `limit` at most
    # "view/7d": views in the last 7 days; "purchase@item:i1/30d"; "add_to_cart@category:shoes/1d".
    counters: dict[str, int]
    last_seen: float | None = None  # Unix seconds of the newest event
    consent: dict[str, Consent] = {}  # purpose -> the latest choice (absent: none made)
    # True when the call's Requirement was not met: the store read nothing else (recent, counters
    # and last_seen are empty), only the consent that said no.
    withheld: bool = False
    # The visitor's inbox (messages of `fire`, oldest first), when the read asked for it (`inbox`):
    # taken out of the store by that read. Opaque to the store.
    messages: list[bytes] = []


class ConsentChange(msgspec.Struct, frozen=True, omit_defaults=True):
    """A line of the consent audit log."""

    visitor: str
    purpose: str
    state: ConsentState
    at: float
    source: str
    expires_at: float | None = None


encode_consent = msgspec.json.Encoder().encode
decode_consent = msgspec.json.Decoder(Consent).decode


EMPTY_PROFILE = Profile(recent=[], counters={})


class CounterKey(NamedTuple):
    """One counter a read asks for: its key in Profile.counters ("view@item:a/7d"), the counted
    name ("view@item:a") and the window in seconds."""

    key: str
    name: str
    window: float


class Timer(NamedTuple):
    """A visitor's pending timer for one trigger: due at `due` (Unix seconds), with the caller's payload."""

    trigger: str
    due: float
    payload: bytes = b""


class TriggerState(msgspec.Struct, frozen=True):
    """What the store holds of a visitor for triggers (for an export, and to check an erasure)."""

    timers: list[Timer]  # pending, soonest first
    fired: dict[str, float]  # trigger -> until when it may not fire again (Unix seconds)
    messages: list[bytes]  # the inbox, oldest first


class Store(Protocol):
    async def profile(
        self,
        visitor: str,
        *,
        limit: int,
        now: float,
        counters: bool | Sequence[CounterKey] = True,
        requires: Requirement | None = None,
        inbox: Requirement | None = None,
    ) -> Profile:
        """The visitor's newest `limit` interactions (oldest first), last-seen time, live counters
        and consent; with `counters=False` the counters are left out (empty), which spares reading
        them when the caller has no use for them, and with a sequence of CounterKey only those are
        read (the ones rules and segments look at, out of hundreds a visitor may have). With
        `requires`, the store checks the visitor's consent first, in the same round trip, and reads
        nothing else when it does not permit
        (the answer is `withheld`, with the consent only). With `inbox`, the same round trip also
        empties the visitor's inbox: its messages come back in `messages` when the consent permits
        `inbox` (whatever `requires` said), and are dropped unshown when it does not."""
        ...

    async def record(
        self,
        visitor: str,
        events: Sequence[Recorded],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
    ) -> list[bool] | None:
        """With `requires` not permitted by the visitor's consent (checked first, in the same round
        trip), store nothing and return None. Otherwise store a visitor's events, in the order
        given, all or nothing, in one round trip: append
        their interactions (the newest `retention.keep` survive), count each of `counter_names()`
        in every window, move `last_seen`, append them to the event log, and let the visitor's
        state expire `retention.ttl` after `now`. An event whose `id` was recorded before for this
        visitor is a duplicate and changes nothing. Returns, per event, whether it was stored."""
        ...

    async def record_many(
        self,
        batch: Sequence[tuple[str, Sequence[Recorded]]],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
        timeout: float | None = None,
    ) -> list[list[bool] | None]:
        """`record` for many visitors (each visitor's events all or nothing, as there), in a bounded
        number of round trips however many visitors there are; the outcome per visitor. Raises
        PartlyStoredError, with the outcomes it knows, when any visitor's events could not be
        stored, or when `timeout` seconds passed."""
        ...

    async def forget(self, visitor: str) -> Forgotten:
        """Delete everything stored for the visitor: profile, counters, event ids, pending timers,
        fired marks, the inbox, and their events in the event log (a scan of the log: erasure is
        rare, the log is not indexed by visitor)."""
        ...

    async def logged(self, visitor: str) -> list[LogLine]:
        """The visitor's events in the event log, oldest first (for an export)."""
        ...

    async def set_consent(self, visitor: str, choices: Mapping[str, Consent], *, ttl: float, now: float) -> None:
        """Record the visitor's choices (purpose -> Consent), replacing earlier ones for those
        purposes, and append each to the consent audit log; kept `ttl` after `now` like the rest.
        Listeners hear of the visitor as after `record` (their answer may change)."""
        ...

    async def schedule(
        self, visitor: str, timers: Sequence[Timer], *, now: float, requires: Requirement | None = None
    ) -> list[bool] | None:
        """Set the visitor's timers, one round trip. A trigger with a timer of the visitor's pending
        keeps that one (due when it was). Returns, per timer, whether it was set; None (nothing set)
        when `requires` is not permitted by the visitor's consent, checked first."""
        ...

    async def cancel(self, visitor: str, triggers: Sequence[str]) -> list[str]:
        """Remove the visitor's pending timers of these triggers, one round trip; the triggers that had one."""
        ...

    async def claim_due(self, *, now: float, limit: int) -> list[tuple[str, Timer]]:
        """Take up to `limit` timers due at `now` (any visitor's), soonest first, as (visitor, timer),
        out of the store, one round trip. Atomic: of several processes claiming at once, each timer
        goes to exactly one."""
        ...

    async def fire(
        self,
        visitor: str,
        trigger: str,
        message: bytes,
        *,
        period: float,
        keep: int,
        ttl: float,
        now: float,
        requires: Requirement | None = None,
    ) -> bool | None:
        """In one round trip, all or nothing: unless `trigger` fired for the visitor less than
        `period` seconds ago (False), mark it fired for `period`, append `message` to the visitor's
        inbox (the newest `keep` survive; the inbox expires `ttl` after its last message), and
        announce it to `subscribe_messages` listeners (True). None, and nothing done, when
        `requires` is not permitted by the visitor's consent, checked first."""
        ...

    async def trigger_state(self, visitor: str, *, now: float) -> TriggerState:
        """The visitor's pending timers, unexpired fired marks and inbox, leaving them as they are."""
        ...

    def subscribe_messages(self, listener: MessageListener) -> None:
        """Call `listener(visitor, message)` for every message `fire` records, by this store object
        or, for a shared backend, any process using the same one; best effort, as `subscribe`."""
        ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(visitor)` after every `record` for that visitor, by this store object or,
        for a shared backend, by any process using the same one. Listeners run on the event loop
        and must not block. Announcements are best effort: a shared backend's subscriber that lost
        its connection misses what was recorded until it is back."""
        ...

    def subscribe_erasures(self, listener: ErasureListener) -> None:
        """Call `listener(visitor)` whenever any process using the same store (this one included)
        announces the visitor's erasure; it answers how many of the visitor's sockets it closed."""
        ...

    async def announce_erasure(self, visitor: str, *, wait: float) -> int:
        """Tell every process using the same store that the visitor was erased, and add up the sockets
        their erasure listeners closed, as far as they answered within `wait` seconds."""
        ...

    async def ping(self) -> None:
        """Raise StoreError unless the backend answers."""
        ...

    async def close(self) -> None: ...
