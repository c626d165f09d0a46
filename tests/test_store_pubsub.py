"""Following Redis channels: the subscription loop every Redis-backed part shares."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, cast

from redis.asyncio import Redis

from gateway.store.pubsub import Subscription
from tests.waiting import wait_until_async


class SwallowingPubSub:
    """A pub/sub that hands out one message, then behaves like redis-py at its worst: a cancellation
    that lands inside its read timeout is swallowed (redis/redis-py#2028, #2551)."""

    def __init__(self) -> None:
        self.messages = [{"type": "message", "channel": b"c", "data": b"hello"}]
        self.closed = 0

    async def subscribe(self, *channels: str) -> None:
        pass

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if self.messages:
            return self.messages.pop()
        with contextlib.suppress(asyncio.CancelledError):  # the bug: the caller never learns it was cancelled
            await asyncio.sleep(timeout)
        return None

    async def aclose(self) -> None:
        self.closed += 1


class FakeRedis:
    def __init__(self) -> None:
        self.pubsubs: list[SwallowingPubSub] = []

    def pubsub(self, ignore_subscribe_messages: bool = False) -> SwallowingPubSub:
        self.pubsubs.append(SwallowingPubSub())
        return self.pubsubs[-1]


async def test_a_subscription_ends_on_close_even_when_its_cancellation_is_swallowed(anyio_backend: str) -> None:
    redis = FakeRedis()
    heard: list[tuple[bytes, bytes]] = []
    resubscribed: list[bool] = []
    subscription = Subscription(
        cast(Redis, redis),
        ["c"],
        lambda c, d: heard.append((c, d)),
        name="t",
        resubscribed=lambda: resubscribed.append(True),
    )
    subscription.start()
    await asyncio.wait_for(subscription.subscribed.wait(), 1)
    await wait_until_async(lambda: heard, what="the message")  # and now it reads again, into the swallowing timeout
    started = time.monotonic()
    await subscription.close()
    assert time.monotonic() - started < 3  # the next read timeout (1 s), not the 5 s give-up of tasks.stop
    assert heard == [(b"c", b"hello")] and resubscribed == [True]
    assert len(redis.pubsubs) == 1 and redis.pubsubs[0].closed == 1  # it did not subscribe again
