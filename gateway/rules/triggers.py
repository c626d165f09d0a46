"""Behavioural triggers: a message or an offer for a visitor whose events match a pattern.

A trigger is declared as data (`Trigger`) and fires

- on the `count`-th `on` event within `window` (counted per item with `same_item`): "the third view
  of an item within a day" is `{"on": "view", "count": 3, "window": "1d", "same_item": true}`.
  Counts are the store's sliding-window counters (gateway.store.base.sliding_count), so a `window`
  must be one the gateway counts in (`counter_windows_s`), and a count is as approximate as they
  are. `count` 1 (the default) fires on every `on` event and needs no count;
- or, with `unless` and `wait`, when no `unless` event followed the (`count`-th) `on` event within
  `wait`: "added to cart, no purchase within 30 minutes" is `{"on": "add_to_cart", "unless":
  "purchase", "wait": "30m"}`. The `on` event sets a timer in the store, due `wait` after it; an
  `unless` event cancels it; a timer that comes due fires. A later `on` event leaves a pending timer
  as it is (due from the first), so a visitor who keeps adding to the cart still hears from you.

Firing records the message in the visitor's inbox (the next recommendation shows it, once: see
`Store.profile`'s `inbox`) and the store announces it, so the visitor's open sockets get it at once
on whichever gateway they are (gateway.api.push). A trigger fires at most once per visitor per
`period`. All of it needs the visitor's marketing consent, checked by the store inside each call
that schedules or fires: without it no timer is set and nothing fires, and a consent revoked while a
timer runs stops it.

Timers are durable with a Redis store: any gateway process claims them when due (atomically, so
each fires once), including one started after the process that set them stopped. With the memory
store they live and die with the process. A firing that fails (the store failed or timed out),
of a due timer or on an event, is set as a timer due `retry_s` later, doubling per failure, up to
`attempts` firings in all; one the store cannot take either is held by the process and set on a
later round.
A retry cannot repeat a message: a firing that got through despite the failure marks the trigger
fired for its `period`, and the retry finds the mark. A timer that exhausts its attempts is dropped
with a warning in the log.

Store round trips, per event batch of one visitor, besides its `record`: none when no active
trigger concerns the batch's event types; else one read of the counters when a trigger with a
`count` above 1 sees its `on` event, one to cancel timers when an `unless` event came, one to set
timers when an `on` event arms one, and one per trigger fired. Per due timer: its share of one claim
(up to `batch` timers at a time) and one to fire.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from gateway import crossfield
from gateway.rules.conditions import Duration, Slug, parse_duration
from gateway.store import Recorded, Requirement, Store, StoreError, Timer, window_label
from gateway.tasks import stop as stop_task

__all__ = ["Delivered", "Trigger", "TriggerEngine", "TriggerMessage", "parse_duration"]

log = logging.getLogger("tailor.triggers")

Event = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.:-]*$", max_length=64, description="An event type, e.g. `purchase`.")
]
Value = str | int | float | bool
DAY = 86_400.0


class TriggerMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the visitor is shown when a trigger fires."""

    title: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    body: Annotated[str, msgspec.Meta(max_length=2000)] = ""
    offer: Annotated[str, msgspec.Meta(max_length=200, description="An offer or coupon code, if any.")] | None = None
    data: Annotated[dict[str, Value], msgspec.Meta(max_length=50, description="Anything else the page needs.")] = {}


class Trigger(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One trigger (see the module's description)."""

    id: Slug
    on: Event
    count: Annotated[
        int, msgspec.Meta(ge=1, le=1000, description="Fire on the count-th `on` event within `window`.")
    ] = 1
    window: Duration = "1d"
    same_item: Annotated[bool, msgspec.Meta(description="Count `on` events per item.")] = False
    unless: Annotated[Event, msgspec.Meta(description="An event type that cancels (needs `wait`).")] | None = None
    wait: Annotated[Duration, msgspec.Meta(description="Fire when `unless` did not come within this.")] | None = None
    period: Annotated[Duration, msgspec.Meta(description="Fire at most once per visitor per period.")] = "1d"
    enabled: bool = True
    message: TriggerMessage

    def __post_init__(self) -> None:
        for name in ("window", "wait", "period"):
            value = getattr(self, name)
            if value is not None and _seconds(self.id, name, value) <= 0:
                raise ValueError(f"trigger {self.id!r}: `{name}` must be longer than nothing, not {value!r}")
        if self.count < 1:
            raise ValueError(f"trigger {self.id!r}: `count` must be at least 1, not {self.count}")
        if (self.unless is None) != (self.wait is None):
            raise ValueError(
                f"trigger {self.id!r}: `unless` and `wait` go together (fire when `unless` did not follow `on` "
                "within `wait`)"
            )
        if self.unless is not None and self.unless == self.on:
            raise ValueError(f"trigger {self.id!r}: `unless` must be another event type than `on`")
        if self.same_item and self.unless is not None:
            raise ValueError(
                f"trigger {self.id!r}: `same_item` counts `on` per item; a trigger with `unless` is per visitor"
            )


# A Duration other than zero ("0s", "0.0h"): what `window`, `wait` and `period` must be.
LONGER_THAN_NOTHING = r"^(?:[0-9]*[1-9][0-9]*(?:\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)[smhdw]$"
# What Trigger.__post_init__ refuses across fields, for the OpenAPI document (gateway.crossfield).
# Not stated: `unless` the same event type as `on` (JSON Schema cannot compare two values).
STATED: dict[type[msgspec.Struct], crossfield.Schema] = {
    Trigger: crossfield.merged(
        {"properties": {name: {"pattern": LONGER_THAN_NOTHING} for name in ("window", "wait", "period")}},
        # `unless` and `wait` together, or neither
        {"anyOf": [crossfield.given("unless", "wait"), crossfield.absent("unless", "wait")]},
        # no `same_item` with `unless`
        {"anyOf": [{"properties": {"same_item": {"const": False}}}, crossfield.absent("unless")]},
    )
}


def _seconds(trigger: str, name: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"trigger {trigger!r}: `{name}`: {exc}") from None


class Delivered(msgspec.Struct, frozen=True, tag_field="type", tag="message"):
    """A fired trigger's message as the visitor gets it: a frame on their sockets, and an entry of
    the next recommendation's `messages` (the same JSON, kept in their inbox in the meantime)."""

    trigger: Annotated[str, msgspec.Meta(description="The trigger's id.")]
    version: Annotated[int, msgspec.Meta(description="The rule-set version that defined it.")]
    message: TriggerMessage
    id: Annotated[str, msgspec.Meta(description="Unique per message, for de-duplication by the page.")]
    at: Annotated[float, msgspec.Meta(description="When it fired (Unix seconds).")]


class _Armed(msgspec.Struct, frozen=True, array_like=True):
    """A timer's payload in the store: which version set it, at the time of which event, and how many
    firings of it failed so far."""

    version: int
    at: float
    failed: int = 0


_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class _Active:
    trigger: Trigger
    label: str  # of the counter window
    wait: float | None
    period: float


@dataclass(frozen=True)
class _Definitions:
    version: int
    by_id: dict[str, _Active]  # enabled ones
    by_event: dict[str, list[_Active]]  # event type -> the enabled triggers it is `on` or `unless` of


class TriggerEngine:
    """Evaluates the active triggers on every stored event batch, and fires due timers in the background.

    `requires` is the marketing consent requirement (as the consent mode makes it); `windows` are the
    store's counter windows (seconds); fired messages go to inboxes of `inbox_keep` messages that
    expire `inbox_ttl_s` after the last. The background task looks for due timers every `poll_s`
    seconds, up to `batch` at a time, and claims nothing before `use` gave it definitions (so a
    restarting gateway does not take the timers due while it loads its rule set). A timer whose
    firing fails is retried `retry_s` later (doubling), `attempts` firings in all (see the module)."""

    def __init__(
        self,
        store: Store,
        *,
        requires: Requirement,
        windows: Sequence[float],
        poll_s: float = 1.0,
        batch: int = 100,
        retry_s: float = 30.0,
        attempts: int = 5,
        inbox_keep: int = 10,
        inbox_ttl_s: float = 7 * DAY,
        clock: Callable[[], float] = time.time,
        on_fired: Callable[[str], None] | None = None,
        on_scheduled: Callable[[str], None] | None = None,
        on_cancelled: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.requires = requires
        self.windows = tuple(windows)
        self.poll_s = poll_s
        self.batch = batch
        self.retry_s = retry_s
        self.attempts = attempts
        # Timers whose firing failed and that the store could not take back either; put back first thing
        # on the next round, so a store outage delays them rather than losing them.
        self._held: list[tuple[str, Timer]] = []
        self.inbox_keep = inbox_keep
        self.inbox_ttl_s = inbox_ttl_s
        self._clock = clock
        self._on_fired = on_fired
        self._on_scheduled = on_scheduled
        self._on_cancelled = on_cancelled
        self._definitions: _Definitions | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def version(self) -> int | None:
        """The version of the definitions in use (None before the first `use`)."""
        return self._definitions.version if self._definitions is not None else None

    def use(self, triggers: Sequence[Trigger], version: int) -> None:
        """Make `triggers` the active ones (replacing all others at once); ValueError, and nothing
        changed, when `check` finds a problem. Pending timers of triggers no longer active (or
        disabled) are dropped when they come due."""
        by_id = self._compile(triggers)
        by_event: dict[str, list[_Active]] = {}
        for active in by_id.values():
            for event in (active.trigger.on, active.trigger.unless):
                if event is not None:
                    by_event.setdefault(event, []).append(active)
        self._definitions = _Definitions(version, by_id, by_event)

    def check(self, triggers: Sequence[Trigger]) -> None:
        """ValueError when these triggers cannot be used together here: an id repeats, or a counted
        window is not one the store counts in (each trigger on its own was checked when it was made)."""
        self._compile(triggers)

    def _compile(self, triggers: Sequence[Trigger]) -> dict[str, _Active]:
        """The enabled triggers by id, their durations in seconds."""
        by_id: dict[str, _Active] = {}
        seen: set[str] = set()
        for trigger in triggers:
            if trigger.id in seen:
                raise ValueError(f"trigger id {trigger.id!r} is used twice")
            seen.add(trigger.id)
            window = parse_duration(trigger.window)
            if trigger.count > 1 and window not in self.windows:
                counted = ", ".join(window_label(w) for w in self.windows)
                raise ValueError(
                    f"trigger {trigger.id!r}: the gateway counts events in windows of {counted} "
                    f"(counter_windows_s), not {trigger.window}"
                )
            if trigger.enabled:
                wait = parse_duration(trigger.wait) if trigger.wait is not None else None
                by_id[trigger.id] = _Active(trigger, window_label(window), wait, parse_duration(trigger.period))
        return by_id

    # -- events ------------------------------------------------------------------------------------
    async def on_recorded(self, key: str, events: Sequence[Recorded], now: float) -> None:
        """After `events` of the visitor the store knows as `key` were stored (oldest first, the
        duplicates left out): cancel, set and fire what they call for. Store failures are logged,
        never raised: the events are stored whatever becomes of their triggers."""
        definitions = self._definitions
        if definitions is None:
            return
        concerned: dict[str, _Active] = {}
        for event in events:
            for active in definitions.by_event.get(event.event, ()):
                concerned.setdefault(active.trigger.id, active)
        if not concerned:
            return
        try:
            await self._evaluate(definitions.version, key, events, list(concerned.values()), now)
        except StoreError as exc:
            log.warning("triggers not evaluated for a batch of events: %s", exc)

    async def _evaluate(
        self, version: int, key: str, events: Sequence[Recorded], concerned: list[_Active], now: float
    ) -> None:
        counters: dict[str, int] | None = None
        if any(a.trigger.count > 1 and any(e.event == a.trigger.on for e in events) for a in concerned):
            # A marketing-consent read: without it nothing can fire or be set, so nothing is counted either.
            profile = await self.store.profile(key, limit=0, now=now, requires=self.requires)
            counters = None if profile.withheld else profile.counters
        cancel: list[str] = []
        timers: list[Timer] = []
        fire: list[_Active] = []
        for active in concerned:
            trigger = active.trigger
            stopped = _last(events, trigger.unless) if trigger.unless is not None else None
            armed = _armed(active, events, counters, after=stopped)
            if trigger.unless is None:
                if armed is not None:
                    fire.append(active)
                continue
            if stopped is not None:
                cancel.append(trigger.id)
            if armed is not None:
                assert active.wait is not None
                at = events[armed].ts
                timers.append(Timer(trigger.id, at + active.wait, _encode(_Armed(version, at))))
        # Cancelling comes first: an `on` event after the `unless` one sets a new timer.
        if cancel:
            for trigger_id in await self.store.cancel(key, cancel):
                if self._on_cancelled is not None:
                    self._on_cancelled(trigger_id)
        if timers:
            set_now = await self.store.schedule(key, timers, now=now, requires=self.requires)
            for timer, was_set in zip(timers, set_now or (), strict=False):
                if was_set and self._on_scheduled is not None:
                    self._on_scheduled(timer.trigger)
        if fire:
            # Fired as a timer due now, so one whose firing fails is retried like one.
            payload = _encode(_Armed(version, now))
            await asyncio.gather(
                *(self._fire_timer(key, Timer(a.trigger.id, now, payload), a, version, now) for a in fire)
            )

    async def _deliver(self, key: str, active: _Active, version: int, now: float) -> bool:
        """Fire the trigger for the visitor; whether it fired; StoreError when the store failed."""
        trigger = active.trigger
        delivered = Delivered(trigger.id, version, trigger.message, uuid.uuid4().hex, now)
        fired = await self.store.fire(
            key,
            trigger.id,
            _encode(delivered),
            period=active.period,
            keep=self.inbox_keep,
            ttl=self.inbox_ttl_s,
            now=now,
            requires=self.requires,
        )
        if fired and self._on_fired is not None:
            self._on_fired(trigger.id)
        return bool(fired)

    async def _fire_timer(self, key: str, timer: Timer, active: _Active, version: int, now: float) -> None:
        try:
            await self._deliver(key, active, version, now)
        except StoreError as exc:
            armed = _armed_payload(timer.payload, version, now)
            failed = armed.failed + 1
            if failed >= self.attempts:
                log.warning("trigger %s dropped after %d failed firings: %s", timer.trigger, failed, exc)
                return
            log.warning("trigger %s not fired (attempt %d), retried later: %s", timer.trigger, failed, exc)
            due = now + self.retry_s * 2 ** (failed - 1)
            again = Timer(timer.trigger, due, _encode(msgspec.structs.replace(armed, failed=failed)))
            await self._put_back([(key, again)], now)

    async def _put_back(self, timers: Sequence[tuple[str, Timer]], now: float) -> None:
        """Set these timers again (a timer set since for the same trigger stays as it is); the ones the
        store does not take are held for the next round."""
        for key, timer in timers:
            try:
                await self.store.schedule(key, [timer], now=now, requires=self.requires)
            except StoreError:
                self._held.append((key, timer))

    # -- timers ------------------------------------------------------------------------------------
    async def fire_due(self, now: float | None = None) -> int:
        """Claim the timers due at `now` (default: the clock), up to `batch`, and fire them; how many
        were claimed. Nothing before the first `use`."""
        definitions = self._definitions
        if definitions is None:
            return 0
        now = self._clock() if now is None else now
        if self._held:
            held, self._held = self._held, []
            await self._put_back(held, now)
        claimed = await self.store.claim_due(now=now, limit=self.batch)
        firing = []
        for visitor, timer in claimed:
            active = definitions.by_id.get(timer.trigger)
            # A trigger without `unless` has a timer only to retry a failed firing.
            retry = active is not None and _armed_payload(timer.payload, definitions.version, now).failed > 0
            if active is None or (active.trigger.unless is None and not retry):
                log.info(
                    "due timer of trigger %s dropped: not active in version %d", timer.trigger, definitions.version
                )
                continue
            firing.append(self._fire_timer(visitor, timer, active, definitions.version, now))
        await asyncio.gather(*firing)
        return len(claimed)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="trigger-timers")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                while await self.fire_due() >= self.batch:  # more may be due
                    await asyncio.sleep(0)
            except StoreError as exc:
                log.warning("due trigger timers not claimed: %s", exc)
            except Exception:
                log.exception("trigger timers")
            await asyncio.sleep(self.poll_s)


def _armed_payload(payload: bytes, version: int, now: float) -> _Armed:
    """A timer's payload; one this version cannot read counts as set by `version` at `now`, never failed."""
    try:
        return msgspec.json.decode(payload, type=_Armed)
    except msgspec.DecodeError:
        return _Armed(version, now)


def _last(events: Sequence[Recorded], event_type: str) -> int | None:
    """The position of the last event of `event_type`, if any."""
    for position in range(len(events) - 1, -1, -1):
        if events[position].event == event_type:
            return position
    return None


def _armed(
    active: _Active, events: Sequence[Recorded], counters: dict[str, int] | None, *, after: int | None
) -> int | None:
    """The position of the `on` event that fires or arms the trigger, if one of `events` does: the
    first `on` event after position `after` for a count of 1; else the one that brings the stored
    count (which includes the batch) to `count`, unless it came before position `after`."""
    trigger = active.trigger
    matching = [position for position, event in enumerate(events) if event.event == trigger.on]
    if trigger.count == 1:
        later = [position for position in matching if after is None or position > after]
        return later[0] if later else None
    if not matching or counters is None:
        return None
    by_counter: dict[str, list[int]] = {}
    for position in matching:
        item = events[position].item
        if trigger.same_item and item is None:
            continue
        name = f"{trigger.on}@item:{item}" if trigger.same_item else trigger.on
        by_counter.setdefault(name, []).append(position)
    found: int | None = None
    for name, positions in by_counter.items():
        # The batch's own events are in the count; before them it stood `before` (a sliding
        # estimate rounds, but adding k events to the current window adds exactly k to it).
        after_batch = counters.get(f"{name}/{active.label}", 0)
        before = max(0, after_batch - len(positions))
        if before < trigger.count <= after_batch:
            nth = positions[min(trigger.count - before, len(positions)) - 1]
            found = nth if found is None else min(found, nth)
    if found is not None and after is not None and found < after:
        return None
    return found
