"""The store contract on triggers: timers, fired marks and the inbox (gateway.rules.triggers). For both
backends (the `store` fixture), and Redis on its own where processes share it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.store import (
    Consent,
    RedisStore,
    Requirement,
    Store,
    Timer,
    TriggerState,
)
from tests.conftest import RedisServer
from tests.stores import DAY, HOUR, T0, Elapse, unique_prefix
from tests.waiting import wait_until_async

pytestmark = pytest.mark.anyio


# Triggers: timers, fired marks and the inbox (gateway.rules.triggers).

MARKETING = Requirement("marketing", default=False)
ANYONE = Requirement("marketing", default=True)  # the opt-out model: no choice made allows


async def fire(store: Store, visitor: str, trigger: str, message: bytes, **changes: Any) -> bool | None:
    """Fire with a period of an hour, an inbox of 10 kept a day, at T0, unless `changes` say otherwise."""
    options: dict[str, Any] = {"period": HOUR, "keep": 10, "ttl": DAY, "now": T0, **changes}
    return await store.fire(visitor, trigger, message, **options)


async def test_due_timers_are_claimed_soonest_first_and_only_once(store: Store) -> None:
    assert await store.schedule("v", [Timer("b", T0 + 20, b"pb"), Timer("a", T0 + 10, b"pa")], now=T0) == [True, True]
    assert await store.schedule("w", [Timer("a", T0 + 30)], now=T0) == [True]
    assert await store.claim_due(now=T0 + 5, limit=10) == []
    assert await store.claim_due(now=T0 + 20, limit=10) == [
        ("v", Timer("a", T0 + 10, b"pa")),
        ("v", Timer("b", T0 + 20, b"pb")),
    ]
    assert await store.claim_due(now=T0 + 20, limit=10) == []
    assert await store.claim_due(now=T0 + 99, limit=10) == [("w", Timer("a", T0 + 30))]


async def test_a_claim_takes_at_most_limit_timers(store: Store) -> None:
    await store.schedule("v", [Timer(f"t{n}", T0 + n) for n in range(5)], now=T0)
    first = await store.claim_due(now=T0 + 10, limit=3)
    rest = await store.claim_due(now=T0 + 10, limit=3)
    assert [timer.trigger for _, timer in first] == ["t0", "t1", "t2"]
    assert [timer.trigger for _, timer in rest] == ["t3", "t4"]


async def test_a_pending_timer_keeps_its_time(store: Store) -> None:
    assert await store.schedule("v", [Timer("a", T0 + 10, b"first")], now=T0) == [True]
    again = [Timer("a", T0 + 50, b"second"), Timer("b", T0 + 60)]
    assert await store.schedule("v", again, now=T0 + 1) == [False, True]
    state = await store.trigger_state("v", now=T0 + 1)
    assert state.timers == [Timer("a", T0 + 10, b"first"), Timer("b", T0 + 60)]
    assert [timer.trigger for _, timer in await store.claim_due(now=T0 + 10, limit=10)] == ["a"]
    assert await store.schedule("v", [Timer("a", T0 + 70)], now=T0 + 10) == [True]  # claimed: a new one may start


async def test_cancel_removes_that_visitors_timers_of_those_triggers_only(store: Store) -> None:
    await store.schedule("v", [Timer("a", T0 + 10), Timer("b", T0 + 10)], now=T0)
    await store.schedule("w", [Timer("a", T0 + 10)], now=T0)
    assert await store.cancel("v", ["a", "c"]) == ["a"]
    assert await store.cancel("v", ["a"]) == []
    assert await store.cancel("nobody", ["a"]) == []
    claimed = await store.claim_due(now=T0 + 10, limit=10)
    assert sorted((visitor, timer.trigger) for visitor, timer in claimed) == [("v", "b"), ("w", "a")]


async def test_a_timer_is_set_only_with_the_consent_it_needs(store: Store) -> None:
    assert await store.schedule("v", [Timer("a", T0 + 10)], now=T0, requires=MARKETING) is None
    assert await store.claim_due(now=T0 + 10, limit=10) == []
    await store.set_consent("v", {"marketing": Consent("granted", T0, "banner")}, ttl=DAY, now=T0)
    assert await store.schedule("v", [Timer("a", T0 + 10)], now=T0, requires=MARKETING) == [True]
    assert await store.schedule("w", [Timer("a", T0 + 10)], now=T0, requires=ANYONE) == [True]
    await store.set_consent("x", {"marketing": Consent("denied", T0, "banner")}, ttl=DAY, now=T0)
    assert await store.schedule("x", [Timer("a", T0 + 10)], now=T0, requires=ANYONE) is None


async def test_timers_of_odd_visitor_ids_come_back_to_them(store: Store) -> None:
    visitors = ["a|b", "🙂", "a\nb", '{"v": 1}', '["x", "y"]', "", "\\", "v:a:timers", "x" * 1000]
    for number, visitor in enumerate(visitors):
        await store.schedule(visitor, [Timer("t", T0 + number, visitor.encode())], now=T0)
    claimed = await store.claim_due(now=T0 + 100, limit=100)
    assert [(visitor, timer.payload) for visitor, timer in claimed] == [(v, v.encode()) for v in visitors]
    for visitor in visitors:
        assert (await store.trigger_state(visitor, now=T0)).timers == []


async def test_a_trigger_fires_once_per_visitor_per_period(store: Store) -> None:
    assert await fire(store, "v", "t", b"m1") is True
    assert await fire(store, "v", "t", b"m2", now=T0 + HOUR - 1) is False
    assert await fire(store, "v", "u", b"m3", now=T0 + 1) is True  # another trigger
    assert await fire(store, "w", "t", b"m4") is True  # another visitor
    assert (await store.trigger_state("v", now=T0 + 2)).fired == {"t": T0 + HOUR, "u": T0 + 1 + HOUR}
    assert await fire(store, "v", "t", b"m5", now=T0 + HOUR) is True  # the period is over
    profile = await store.profile("v", limit=0, now=T0 + HOUR, inbox=ANYONE)
    assert profile.messages == [b"m1", b"m3", b"m5"]


async def test_the_inbox_keeps_the_newest_and_a_read_that_asks_for_it_takes_them(store: Store) -> None:
    for number in range(5):
        await fire(store, "v", f"t{number}", b"m%d" % number, keep=3)
    assert (await store.profile("v", limit=10, now=T0)).messages == []  # not asked for: left in the inbox
    assert (await store.trigger_state("v", now=T0)).messages == [b"m2", b"m3", b"m4"]
    assert (await store.profile("v", limit=10, now=T0, counters=False, inbox=ANYONE)).messages == [b"m2", b"m3", b"m4"]
    assert (await store.profile("v", limit=10, now=T0, inbox=ANYONE)).messages == []  # shown once


async def test_the_inbox_needs_its_own_consent_and_not_personalization(store: Store) -> None:
    await store.set_consent("v", {"marketing": Consent("granted", T0, "banner")}, ttl=DAY, now=T0)
    assert await fire(store, "v", "t", b"m", requires=MARKETING) is True
    personal = Requirement("personalization", default=False)
    withheld = await store.profile("v", limit=10, now=T0, requires=personal, inbox=MARKETING)
    assert (withheld.withheld, withheld.recent, withheld.messages) == (True, [], [b"m"])
    assert await fire(store, "v", "u", b"n", requires=MARKETING) is True
    await store.set_consent("v", {"marketing": Consent("revoked", T0 + 1, "settings")}, ttl=DAY, now=T0 + 1)
    assert await fire(store, "v", "w", b"x", now=T0 + 1, requires=MARKETING) is None  # nothing done
    assert (await store.trigger_state("v", now=T0 + 1)).fired == {"t": T0 + HOUR, "u": T0 + HOUR}
    assert (await store.profile("v", limit=10, now=T0 + 1, inbox=MARKETING)).messages == []
    assert (await store.trigger_state("v", now=T0 + 1)).messages == []  # dropped unshown, not kept for later


async def test_the_inbox_expires_ttl_after_its_last_message(store: Store, elapse: Elapse) -> None:
    await fire(store, "v", "t", b"m", ttl=0.3)
    await elapse(0.4)
    assert (await store.profile("v", limit=0, now=T0 + 0.4, inbox=ANYONE)).messages == []


async def test_a_fired_message_is_announced_to_message_subscribers(store: Store) -> None:
    heard: list[tuple[str, bytes]] = []
    store.subscribe_messages(lambda visitor, message: heard.append((visitor, message)))
    if isinstance(store, RedisStore):
        await asyncio.wait_for(store.subscribed.wait(), 5)
    await fire(store, "v\n1", "t", b'{"m": 1}')
    await fire(store, "v\n1", "t", b'{"m": 2}')  # within the period: neither fired nor announced
    await fire(store, "w\n1", "t", b'{"m": 3}')  # a barrier: announcements arrive in order, so once it is
    await wait_until_async(lambda: len(heard) >= 2, what="two announcements")  # heard, m 2 would have been
    assert heard == [("v\n1", b'{"m": 1}'), ("w\n1", b'{"m": 3}')]


async def test_forget_takes_the_timers_fired_marks_and_inbox_too(store: Store) -> None:
    await store.schedule("v", [Timer("a", T0 + 10), Timer("b", T0 + 20)], now=T0)
    await store.schedule("w", [Timer("a", T0 + 10)], now=T0)
    await fire(store, "v", "t", b"m")
    assert (await store.forget("v")).profile
    assert await store.trigger_state("v", now=T0) == TriggerState(timers=[], fired={}, messages=[])
    assert [visitor for visitor, _ in await store.claim_due(now=T0 + 99, limit=10)] == ["w"]
    assert await fire(store, "v", "t", b"m") is True  # no mark left to hold it back


async def test_redis_concurrent_claims_never_share_a_timer(redis_server: RedisServer) -> None:
    """Two store objects on one Redis stand for two gateway processes claiming at the same time."""
    redis_server.start()
    prefix = unique_prefix()
    first, second = RedisStore(redis_server.url, prefix=prefix), RedisStore(redis_server.url, prefix=prefix)
    try:
        for number in range(50):
            await first.schedule(f"v{number}", [Timer(f"t{k}", T0 + k) for k in range(4)], now=T0)
        rounds = await asyncio.gather(*(s.claim_due(now=T0 + 10, limit=7) for s in (first, second) * 20))
        claimed = [(visitor, timer.trigger) for taken in rounds for visitor, timer in taken]
        assert len(claimed) == len(set(claimed)) == 200
        # Each claim ran whole, one after the other: full ones, then the rest, then nothing.
        assert sorted(len(taken) for taken in rounds) == [0] * 11 + [4] + [7] * 28
    finally:
        await first.close()
        await second.close()
