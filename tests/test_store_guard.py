"""The hot path's view of the store: a timeout per read, and a breaker that opens only on failures in a row."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import pytest

from gateway.store import EMPTY_PROFILE, Consent, CounterKey, Profile, Recorded, Requirement, Retention, StoreError
from gateway.store.base import Forgotten, LogLine, Timer, TriggerState
from gateway.store.guard import TRIP_AFTER, GuardedStore


class Scripted:
    """A store whose reads fail, hang or answer as the test says; counts the reads that reached it."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []  # "ok", "error", "hang"; empty means "ok"
        self.reads = 0
        self.bounded_to: float | None = None

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
        self.reads += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "error":
            raise StoreError("scripted failure")
        if outcome == "hang":
            await asyncio.sleep(10)
        return EMPTY_PROFILE

    async def record(
        self,
        visitor: str,
        events: Sequence[Recorded],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
    ) -> list[bool] | None:
        return [True] * len(events)

    async def record_many(
        self,
        batch: Sequence[tuple[str, Sequence[Recorded]]],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
        timeout: float | None = None,
    ) -> list[list[bool] | None]:
        return [[True] * len(events) for _, events in batch]

    async def forget(self, visitor: str) -> Forgotten:
        return Forgotten(profile=False, log_events=0)

    async def logged(self, visitor: str) -> list[LogLine]:
        return []

    async def set_consent(self, visitor: str, choices: Mapping[str, Consent], *, ttl: float, now: float) -> None: ...

    async def schedule(
        self, visitor: str, timers: Sequence[Timer], *, now: float, requires: Requirement | None = None
    ) -> list[bool] | None:
        return [True] * len(timers)

    async def cancel(self, visitor: str, triggers: Sequence[str]) -> list[str]:
        return []

    async def claim_due(self, *, now: float, limit: int) -> list[tuple[str, Timer]]:
        return []

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
        return True

    async def trigger_state(self, visitor: str, *, now: float) -> TriggerState:
        return TriggerState(timers=[], fired={}, messages=[])

    def subscribe_messages(self, listener: Callable[[str, bytes], None]) -> None: ...

    def subscribe(self, listener: Callable[[str], None]) -> None: ...

    def subscribe_erasures(self, listener: Callable[[str], Awaitable[int]]) -> None: ...

    async def announce_erasure(self, visitor: str, *, wait: float) -> int:
        return 0

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def guard(store: Scripted, clock: Clock, errors: list[str] | None = None) -> GuardedStore:
    return GuardedStore(
        store, timeout_s=0.02, retry_after_s=1.0, clock=clock, on_error=errors.append if errors is not None else None
    )


async def read(g: GuardedStore) -> Profile | str:
    return await g.profile("v", limit=5, now=0.0)


@pytest.mark.anyio
async def test_a_single_failure_degrades_only_its_own_request(clock: Clock) -> None:
    store = Scripted()
    store.outcomes = ["error", "ok", "hang", "ok"]
    errors: list[str] = []
    g = guard(store, clock, errors)
    assert [await read(g) for _ in range(4)] == ["store-unavailable", EMPTY_PROFILE, "store-timeout", EMPTY_PROFILE]
    assert store.reads == 4
    assert errors == ["store-unavailable", "store-timeout"]
    assert g.healthy


@pytest.mark.anyio
async def test_failures_in_a_row_open_the_breaker_until_retry_after(clock: Clock) -> None:
    store = Scripted()
    store.outcomes = ["error"] * TRIP_AFTER
    g = guard(store, clock)
    assert [await read(g) for _ in range(TRIP_AFTER)] == ["store-unavailable"] * TRIP_AFTER
    assert not g.healthy
    # Open: answered at once without touching the store.
    assert [await read(g) for _ in range(5)] == ["store-unavailable"] * 5
    assert store.reads == TRIP_AFTER
    # After retry_after_s a probe goes through; its success closes the breaker.
    clock.now += 1.01
    assert await read(g) == EMPTY_PROFILE
    assert g.healthy
    assert store.reads == TRIP_AFTER + 1


@pytest.mark.anyio
async def test_a_failed_probe_keeps_the_breaker_open(clock: Clock) -> None:
    store = Scripted()
    store.outcomes = ["error"] * (TRIP_AFTER + 1)
    g = guard(store, clock)
    for _ in range(TRIP_AFTER):
        await read(g)
    clock.now += 1.01
    assert await read(g) == "store-unavailable"  # the probe failed
    assert await read(g) == "store-unavailable"
    assert store.reads == TRIP_AFTER + 1


class SelfTimed(Scripted):
    def bound_reads(self, timeout: float) -> bool:
        self.bounded_to = timeout
        return True


class CannotTimeItself(Scripted):
    def bound_reads(self, timeout: float) -> bool:
        return False


@pytest.mark.anyio
async def test_the_timeout_is_handed_to_a_store_that_can_enforce_it(clock: Clock) -> None:
    self_timed = SelfTimed()
    assert not guard(self_timed, clock).bounded
    assert self_timed.bounded_to == 0.02
    other = CannotTimeItself()
    g = guard(other, clock)
    assert g.bounded
    other.outcomes = ["hang"]
    assert await read(g) == "store-timeout"  # the guard's own timer
