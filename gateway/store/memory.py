"""The in-process store: per-visitor state in a bounded LRU map, for a single gateway process.

Trigger timers live in a heap of this process: they are gone when it stops (Redis keeps them).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import ClassVar

import msgspec

from gateway.store.base import (
    EMPTY_PROFILE,
    Consent,
    ConsentChange,
    CounterKey,
    ErasureListener,
    Forgotten,
    Interaction,
    Listener,
    LogLine,
    MessageListener,
    Profile,
    Recorded,
    Requirement,
    Retention,
    Timer,
    TriggerState,
    bump,
    counter_field,
    counter_of_field,
    encode_consent,
    sliding_count,
    window_label,
)
from gateway.store.log import FileLog

DEFAULT_MAX_VISITORS = 1_000_000
# What the visitors may take by default: a small machine's share, about 20,000 visitors of 20 events
# each, or 400,000 of one event (docs/stores.md; loadtests/store_memory.py measures them).
DEFAULT_MAX_MB = 512.0
# Resident bytes a visitor's parts take (measured by loadtests/store_memory.py's calibration on CPython
# 3.11, event ids of 36 characters): the estimate the byte budget is held to, within about 10%.
VISITOR_BYTES = 800
INTERACTION_BYTES = 128
EVENT_ID_BYTES = 128
COUNTER_BYTES = 210
CONSENT_BYTES = 200
WITHHELD = Profile(recent=[], counters={}, withheld=True)  # no choice made, and the model is opt-in


_COUNT_MAX = 2**32 - 1


def _packed(state: tuple[int, int, int]) -> int:
    """A counter's (bucket, current, previous) as one int. A store of many visitors holds millions
    of counters: as tuples, each a tracked object until the collector's next pass (which CPython
    3.11 may put off while they pile up: a pass over 3.6 million took 0.8 s), as ints none is."""
    bucket, current, previous = state
    return bucket << 64 | min(current, _COUNT_MAX) << 32 | min(previous, _COUNT_MAX)


def _unpacked(value: int) -> tuple[int, int, int]:
    return value >> 64, value >> 32 & _COUNT_MAX, value & _COUNT_MAX


class _Visitor(msgspec.Struct, gc=False):
    """One visitor's state. Hundreds of thousands of these live as long as the process, so none of
    it is for the cyclic garbage collector to walk on every full collection (as a slotted object
    with a list, a list and an OrderedDict, a visitor was four tracked objects: 160,000 of them at
    the benchmarks' 40,000 visitors). The struct itself is untracked (gc=False: it refers to
    nothing that could refer back to it), and what it holds are tuples and dicts of atoms, which
    the collector stops tracking once it has seen them."""

    expires_at: float
    recent: tuple[Interaction, ...] = ()
    # "name|window" -> (bucket, current, previous) packed into one int: see _packed, base.sliding_count
    counters: dict[str, int] = {}
    ids: dict[str, None] = {}  # event ids seen, oldest first
    last_seen: float | None = None
    consent: dict[str, Consent] = {}
    fired: dict[str, float] = {}  # trigger -> until when it may not fire again
    inbox: tuple[bytes, ...] = ()
    inbox_expires_at: float = 0.0
    weight: int = 0  # estimated resident bytes, as last weighed (MemoryStore._settle)

    def weigh(self) -> int:
        return (
            VISITOR_BYTES
            + INTERACTION_BYTES * len(self.recent)
            + EVENT_ID_BYTES * len(self.ids)
            + COUNTER_BYTES * len(self.counters)
            + CONSENT_BYTES * len(self.consent)
            + sum(len(message) for message in self.inbox)
        )

    def take_inbox(self, now: float) -> list[bytes]:
        messages = list(self.inbox) if self.inbox_expires_at > now else []
        self.inbox = ()
        return messages


class MemoryStore:
    """Implements `Store` with plain dict work and no awaits, so a call never yields to the event loop.

    At most `max_visitors` visitors are kept, taking at most about `max_mb` megabytes (by an estimate
    from each visitor's sizes, see `_Visitor.weigh`); past either the least recently used (read or
    written) visitors go. Expiry is judged against the `now` each call passes in, never the wall clock.
    """

    # Tells the hot path it needs no timeout around this store: a call cannot wait on anything.
    in_process: ClassVar[bool] = True

    def __init__(
        self,
        *,
        max_visitors: int = DEFAULT_MAX_VISITORS,
        max_mb: float = DEFAULT_MAX_MB,
        log: FileLog | None = None,
        audit: FileLog | None = None,
    ) -> None:
        if max_visitors < 1:
            raise ValueError(f"max_visitors must be at least 1, not {max_visitors}")
        if not max_mb > 0:
            raise ValueError(f"max_mb must be positive, not {max_mb}")
        self.max_visitors = max_visitors
        self.max_mb = max_mb
        self._max_bytes = int(max_mb * 1024 * 1024)
        self._visitors: OrderedDict[str, _Visitor] = OrderedDict()
        self.bytes = 0  # the estimated resident bytes of every visitor held (see _Visitor.weigh)
        self._listeners: list[Listener] = []
        self._log = log  # the event log: JSONL files, for `tailor build --event-log`
        self._audit = audit  # the consent audit log: JSONL files
        # Pending timers, apart from the visitors' LRU (a timer must not go with an eviction):
        # visitor -> trigger -> (timer, serial), and a heap of (due, serial, visitor, trigger) in which a
        # cancelled or claimed timer's entry stays until it comes up (the serial tells it is stale).
        self._timers: dict[str, dict[str, tuple[Timer, int]]] = {}
        self._due: list[tuple[float, int, str, str]] = []
        self._serial = 0
        self._message_listeners: list[MessageListener] = []
        self._erasure_listeners: list[ErasureListener] = []
        self._last_query: tuple[object, dict[str, tuple[float, list[str]]]] = (None, {})

    def _index_of(self, query: Sequence[CounterKey]) -> dict[str, tuple[float, list[str]]]:
        """The window and the keys a counter query asks for, by counter field; the last query's is
        kept (one rule set's query comes with every request)."""
        last, index = self._last_query
        if last is not query:
            index = {}
            for wanted in query:
                window = float(wanted.window)
                index.setdefault(counter_field(wanted.name, window), (window, []))[1].append(wanted.key)
            self._last_query = (query, index)
        return index

    def __len__(self) -> int:
        """Visitors held right now, including expired ones not yet retired."""
        return len(self._visitors)

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
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        state = self._visitors.get(visitor)
        if state is not None and state.expires_at <= now:
            self._drop(visitor)
            state = None
        if state is None:
            return EMPTY_PROFILE if requires is None or requires.default else WITHHELD
        self._visitors.move_to_end(visitor)
        consent = dict(state.consent)
        messages: list[bytes] = []
        if inbox is not None:
            taken = state.take_inbox(now)
            if inbox.permits(consent, now):
                messages = taken
        if requires is not None and not requires.permits(consent, now):
            return Profile(recent=[], counters={}, consent=consent, withheld=True, messages=messages)
        recent = list(state.recent[-limit:]) if limit else []
        if not counters:
            return Profile(recent=recent, counters={}, last_seen=state.last_seen, consent=consent, messages=messages)
        counts: dict[str, int] = {}
        if counters is not True:
            held_counters = state.counters
            index = self._index_of(counters)
            # The two key sets met in C (walking the smaller): a Python step per match only.
            for field in held_counters.keys() & index.keys():
                window, labels = index[field]
                count = sliding_count(*_unpacked(held_counters[field]), window, now)
                if count:
                    for label in labels:
                        counts[label] = count
            return Profile(
                recent=recent, counters=counts, last_seen=state.last_seen, consent=consent, messages=messages
            )
        stale: list[str] = []
        for key, value in state.counters.items():
            name, window = counter_of_field(key)
            bucket, current, previous = _unpacked(value)
            count = sliding_count(bucket, current, previous, window, now)
            if count:
                counts[f"{name}/{window_label(window)}"] = count
            elif bucket < math.floor(now / window) - 1:
                stale.append(key)  # nothing of it is inside the window any more
        for key in stale:
            del state.counters[key]
        return Profile(recent=recent, counters=counts, last_seen=state.last_seen, consent=consent, messages=messages)

    async def record_many(
        self,
        batch: Sequence[tuple[str, Sequence[Recorded]]],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
        timeout: float | None = None,
    ) -> list[list[bool] | None]:
        # In process and without an await that yields, so it never fails part-way nor runs long.
        return [await self.record(v, events, retention=retention, now=now, requires=requires) for v, events in batch]

    async def record(
        self,
        visitor: str,
        events: Sequence[Recorded],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
    ) -> list[bool] | None:
        state = self._visitors.get(visitor)
        if state is not None and state.expires_at <= now:
            state = None
        if requires is not None and not requires.permits(state.consent if state is not None else {}, now):
            return None
        if not events:
            return []
        if state is None:
            state = self._visitors[visitor] = _Visitor(now + retention.ttl)
        else:
            state.expires_at = now + retention.ttl
        self._visitors.move_to_end(visitor)

        stored: list[bool] = []
        added: list[Interaction] = []
        for event in events:
            if event.id is not None and retention.ids:
                if event.id in state.ids:
                    stored.append(False)
                    continue
                state.ids[event.id] = None
            stored.append(True)
            interaction = event.interaction()
            if interaction is not None:
                added.append(interaction)
            for number, name in enumerate(event.counter_names()):
                for window in retention.windows:
                    key = counter_field(name, window)
                    held = state.counters.get(key)
                    if held is None and number and len(state.counters) >= retention.max_counters:
                        continue  # full: no new per-item or per-category counters, totals still count
                    bumped = bump(None if held is None else _unpacked(held), math.floor(event.ts / window))
                    if bumped is not None:
                        state.counters[key] = _packed(bumped)
            state.last_seen = event.ts if state.last_seen is None else max(state.last_seen, event.ts)
            if self._log is not None and retention.log:
                self._log.append(event.log_line(visitor))
        if added:
            recent = (*state.recent, *added)
            state.recent = recent[-retention.keep :] if len(recent) > retention.keep else recent
        ids = state.ids
        while len(ids) > retention.ids:
            del ids[next(iter(ids))]

        self._settle(state, now)
        if any(stored):
            for listener in self._listeners:
                listener(visitor)
        return stored

    async def set_consent(self, visitor: str, choices: Mapping[str, Consent], *, ttl: float, now: float) -> None:
        state = self._visitors.get(visitor)
        if state is None or state.expires_at <= now:
            state = self._visitors[visitor] = _Visitor(now + ttl)
        else:
            state.expires_at = max(state.expires_at, now + ttl)
        self._visitors.move_to_end(visitor)
        state.consent.update(choices)
        if self._audit is not None:
            for purpose, choice in choices.items():
                change = ConsentChange(visitor, purpose, choice.state, choice.at, choice.source, choice.expires_at)
                self._audit.append(encode_consent(change))
        self._settle(state, now)
        if choices:
            for listener in self._listeners:
                listener(visitor)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def subscribe_messages(self, listener: MessageListener) -> None:
        self._message_listeners.append(listener)

    def subscribe_erasures(self, listener: ErasureListener) -> None:
        self._erasure_listeners.append(listener)

    async def announce_erasure(self, visitor: str, *, wait: float) -> int:
        return sum([await listener(visitor) for listener in self._erasure_listeners])

    def _consent(self, visitor: str, now: float) -> dict[str, Consent]:
        state = self._visitors.get(visitor)
        return state.consent if state is not None and state.expires_at > now else {}

    # -- triggers ----------------------------------------------------------------------------------
    async def schedule(
        self, visitor: str, timers: Sequence[Timer], *, now: float, requires: Requirement | None = None
    ) -> list[bool] | None:
        if requires is not None and not requires.permits(self._consent(visitor, now), now):
            return None
        pending = self._timers.setdefault(visitor, {})
        set_now: list[bool] = []
        for timer in timers:
            if timer.trigger in pending:
                set_now.append(False)
                continue
            self._serial += 1
            pending[timer.trigger] = (timer, self._serial)
            heapq.heappush(self._due, (timer.due, self._serial, visitor, timer.trigger))
            set_now.append(True)
        if not pending:
            del self._timers[visitor]
        return set_now

    async def cancel(self, visitor: str, triggers: Sequence[str]) -> list[str]:
        pending = self._timers.get(visitor)
        if pending is None:
            return []
        removed = [trigger for trigger in triggers if pending.pop(trigger, None) is not None]
        if not pending:
            del self._timers[visitor]
        return removed

    async def claim_due(self, *, now: float, limit: int) -> list[tuple[str, Timer]]:
        claimed: list[tuple[str, Timer]] = []
        due = self._due
        while due and due[0][0] <= now and len(claimed) < limit:
            _, serial, visitor, trigger = heapq.heappop(due)
            pending = self._timers.get(visitor)
            held = pending.get(trigger) if pending is not None else None
            if held is None or held[1] != serial:
                continue  # cancelled, or claimed and set again since
            assert pending is not None
            del pending[trigger]
            if not pending:
                del self._timers[visitor]
            claimed.append((visitor, held[0]))
        return claimed

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
        state = self._visitors.get(visitor)
        if state is not None and state.expires_at <= now:
            state = None
        if requires is not None and not requires.permits(state.consent if state is not None else {}, now):
            return None
        if state is not None and state.fired.get(trigger, 0.0) > now:
            return False
        # The marks and the inbox live with the visitor's state: it is kept at least as long as they are.
        lasts = now + max(period, ttl)
        if state is None:
            state = self._visitors[visitor] = _Visitor(lasts)
        else:
            state.expires_at = max(state.expires_at, lasts)
        self._visitors.move_to_end(visitor)
        state.fired = {name: until for name, until in state.fired.items() if until > now}
        state.fired[trigger] = now + period
        inbox = (*state.inbox, message) if state.inbox_expires_at > now else (message,)
        state.inbox = inbox[-keep:] if len(inbox) > keep else inbox
        state.inbox_expires_at = now + ttl
        self._settle(state, now)
        for listener in self._message_listeners:
            listener(visitor, message)
        return True

    async def trigger_state(self, visitor: str, *, now: float) -> TriggerState:
        timers = sorted((timer for timer, _ in self._timers.get(visitor, {}).values()), key=lambda t: t.due)
        state = self._visitors.get(visitor)
        if state is None or state.expires_at <= now:
            return TriggerState(timers=timers, fired={}, messages=[])
        fired = {trigger: until for trigger, until in state.fired.items() if until > now}
        return TriggerState(
            timers=timers, fired=fired, messages=list(state.inbox) if state.inbox_expires_at > now else []
        )

    def _settle(self, written: _Visitor, now: float) -> None:
        """Weigh the visitor just written (the most recently used), then evict from the least recently
        used end while over either bound; the visitor just written stays, whatever its size."""
        weight = written.weigh()
        self.bytes += weight - written.weight
        written.weight = weight
        visitors = self._visitors
        while len(visitors) > 1 and (len(visitors) > self.max_visitors or self.bytes > self._max_bytes):
            self.bytes -= visitors.popitem(last=False)[1].weight
        # Visitors that expire and are never read again would otherwise wait for LRU eviction; they gather at
        # the least recently used end, so retiring up to two per write keeps up at O(1) cost. The visitor just
        # written sits at the other end and has not expired, so the loop always stops before it.
        for _ in range(2):
            if next(iter(visitors.values())).expires_at > now:
                break
            self.bytes -= visitors.popitem(last=False)[1].weight

    def _drop(self, visitor: str) -> bool:
        state = self._visitors.pop(visitor, None)
        if state is None:
            return False
        self.bytes -= state.weight
        return True

    async def forget(self, visitor: str) -> Forgotten:
        had = self._drop(visitor)
        had = self._timers.pop(visitor, None) is not None or had  # their heap entries are stale now
        removed = await self._log.erase(visitor) if self._log is not None else 0
        return Forgotten(profile=had, log_events=removed)

    async def logged(self, visitor: str) -> list[LogLine]:
        return await self._log.read(visitor) if self._log is not None else []

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        for log in (self._log, self._audit):
            if log is not None:
                await log.close()
        self._visitors.clear()
        self.bytes = 0
        self._listeners.clear()
        self._message_listeners.clear()
        self._erasure_listeners.clear()
        self._timers.clear()
        self._due.clear()
