"""The store as the hot path sees it: bounded in time, and skipped for a while after it fails.

A store that is down must not cost every request its full timeout, so after `TRIP_AFTER` failures
in a row the guard answers "unavailable" at once for `retry_after_s`, then lets requests through to
probe; the first success closes it again. A single failure only degrades its own request: under
overload a few calls can time out while the store is fine, and one of them must not switch every
visitor to popular items for a second. The caller turns the cause into a popular-items fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Literal

from gateway.store import CounterKey, Profile, Requirement, Store, StoreError

log = logging.getLogger("tailor.store")

Cause = Literal["store-timeout", "store-unavailable"]
TIMEOUT: Final = "store-timeout"
TRIP_AFTER: Final = 3
UNAVAILABLE: Final = "store-unavailable"


class GuardedStore:
    def __init__(
        self,
        store: Store,
        *,
        timeout_s: float,
        retry_after_s: float,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._on_error = on_error
        self._clock = clock
        self._open_until = 0.0
        self._failures = 0  # in a row
        self.healthy = True
        # An in-process store answers without yielding, so a timer around it would only cost time;
        # a store that can bound its reads itself does it more cheaply than a timer per call here.
        bound_reads = getattr(store, "bound_reads", None)
        self.bounded = not getattr(store, "in_process", False) and not (
            bound_reads is not None and bound_reads(timeout_s)
        )

    def _failed(self, cause: Cause, exc: BaseException | None) -> Cause:
        self._failures += 1
        if self._failures >= TRIP_AFTER:
            if self.healthy:
                log.warning(
                    "store %s (%s), %d times in a row; answering from popular items for %.1fs",
                    cause,
                    exc,
                    self._failures,
                    self.retry_after_s,
                )
            self.healthy = False
            self._open_until = self._clock() + self.retry_after_s
        if self._on_error is not None:
            self._on_error(cause)
        return cause

    def _succeeded(self) -> None:
        if not self.healthy:
            log.info("store reachable again")
        self.healthy = True
        self._failures = 0

    async def profile(
        self,
        visitor: str,
        *,
        limit: int,
        now: float,
        counters: bool | Sequence[CounterKey] = True,
        requires: Requirement | None = None,
        inbox: Requirement | None = None,
    ) -> Profile | Cause:
        """The visitor's profile, or the fallback cause when the store cannot give it in time."""
        if not self.healthy and self._clock() < self._open_until:
            return UNAVAILABLE
        try:
            if self.bounded:
                async with asyncio.timeout(self.timeout_s):
                    profile = await self.store.profile(
                        visitor, limit=limit, now=now, counters=counters, requires=requires, inbox=inbox
                    )
            else:
                profile = await self.store.profile(
                    visitor, limit=limit, now=now, counters=counters, requires=requires, inbox=inbox
                )
        except TimeoutError as exc:
            return self._failed(TIMEOUT, exc)
        except StoreError as exc:
            return self._failed(UNAVAILABLE, exc)
        self._succeeded()
        return profile

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                await self.store.ping()
        except (TimeoutError, StoreError):
            return False
        return True
