"""The in-process store: per-visitor state in a bounded LRU map, for a single gateway process."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import ClassVar

from gateway.store.base import EMPTY_PROFILE, Interaction, Listener, Profile, check_record

DEFAULT_MAX_VISITORS = 1_000_000


class _Visitor:
    __slots__ = ("counters", "expires_at", "recent")

    def __init__(self, expires_at: float) -> None:
        self.recent: list[Interaction] = []
        # (name, window) -> (bucket, count): only the newest bucket matters, so older ones are overwritten.
        self.counters: dict[tuple[str, float], tuple[int, int]] = {}
        self.expires_at = expires_at


class MemoryStore:
    """Implements `Store` with plain dict work and no awaits, so a call never yields to the event loop.

    At most `max_visitors` visitors are kept; past that the least recently used (read or written) one goes.
    Expiry is judged against the `now` each call passes in, never the wall clock.
    """

    # Tells the hot path it needs no timeout around this store: a call cannot wait on anything.
    in_process: ClassVar[bool] = True

    def __init__(self, *, max_visitors: int = DEFAULT_MAX_VISITORS) -> None:
        if max_visitors < 1:
            raise ValueError(f"max_visitors must be at least 1, not {max_visitors}")
        self._max_visitors = max_visitors
        self._visitors: OrderedDict[str, _Visitor] = OrderedDict()
        self._listeners: list[Listener] = []

    def __len__(self) -> int:
        """Visitors held right now, including expired ones not yet retired."""
        return len(self._visitors)

    async def profile(self, visitor: str, *, limit: int, now: float) -> Profile:
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        state = self._visitors.get(visitor)
        if state is None:
            return EMPTY_PROFILE
        if state.expires_at <= now:
            del self._visitors[visitor]
            return EMPTY_PROFILE
        self._visitors.move_to_end(visitor)
        counters: dict[str, int] = {}
        stale: list[tuple[str, float]] = []
        for key, (bucket, count) in state.counters.items():
            name, window = key
            current = math.floor(now / window)
            if bucket == current:
                counters[name] = counters.get(name, 0) + count
            elif bucket < current:
                stale.append(key)
        for key in stale:
            del state.counters[key]
        return Profile(recent=state.recent[-limit:] if limit else [], counters=counters)

    async def record(
        self,
        visitor: str,
        interactions: Sequence[Interaction],
        *,
        keep: int,
        ttl: float,
        counters: Mapping[str, int] | None = None,
        window: float = 3600.0,
        now: float,
    ) -> None:
        check_record(keep=keep, ttl=ttl, window=window)
        if not interactions and not counters:
            return
        state = self._visitors.get(visitor)
        if state is None or state.expires_at <= now:
            state = self._visitors[visitor] = _Visitor(now + ttl)
        else:
            state.expires_at = now + ttl
        self._visitors.move_to_end(visitor)

        recent = state.recent
        recent.extend(interactions)
        if len(recent) > keep:
            del recent[:-keep]

        if counters:
            window = float(window)
            bucket = math.floor(now / window)
            for name, amount in counters.items():
                key = (name, window)
                held = state.counters.get(key)
                if held is None or held[0] < bucket:
                    state.counters[key] = (bucket, amount)
                elif held[0] == bucket:
                    state.counters[key] = (bucket, held[1] + amount)
                # else: a lagging clock wrote into a window that has already closed; it would never be read.

        self._retire(now)
        for listener in self._listeners:
            listener(visitor)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _retire(self, now: float) -> None:
        visitors = self._visitors
        while len(visitors) > self._max_visitors:
            visitors.popitem(last=False)
        # Visitors that expire and are never read again would otherwise wait for LRU eviction; they gather at
        # the least recently used end, so retiring up to two per write keeps up at O(1) cost. The visitor just
        # written sits at the other end and has not expired, so the loop always stops before it.
        for _ in range(2):
            if next(iter(visitors.values())).expires_at > now:
                break
            visitors.popitem(last=False)

    async def forget(self, visitor: str) -> None:
        self._visitors.pop(visitor, None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._visitors.clear()
        self._listeners.clear()
