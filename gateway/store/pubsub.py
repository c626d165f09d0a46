"""Following Redis channels for as long as the gateway runs (one loop for every subscriber)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from gateway.tasks import stop as stop_task

log = logging.getLogger("tailor.store")


class Subscription:
    """Hands every message on `channels` to `heard` (channel, data), subscribing again with back-off
    when Redis goes; `resubscribed` runs after every (re)subscription, for what changed while the
    subscription was down. `subscribed` is set while it is live (tests wait on it).

    `close` sets a flag the loop checks as well as cancelling it: redis-py can swallow a cancellation
    that lands inside its own read timeout (redis/redis-py#2028, #2551), and a loop that relied on
    the cancellation alone would then run, and resubscribe, after its store was closed."""

    def __init__(
        self,
        redis: Redis,
        channels: Sequence[str],
        heard: Callable[[bytes, bytes], None],
        *,
        name: str,
        resubscribed: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self.channels = tuple(channels)
        self._heard = heard
        self._resubscribed = resubscribed
        self.name = name
        self.subscribed = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name=self.name)

    async def close(self) -> None:
        self._closing = True
        await stop_task(self._task)
        self._task = None

    async def _listen(self) -> None:
        delay = 0.05
        while not self._closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.channels)
                self.subscribed.set()
                delay = 0.05
                if self._resubscribed is not None:
                    self._resubscribed()
                while not self._closing:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._heard(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection trouble; a listener's bug must not end the subscription
                self.subscribed.clear()
                channels = ", ".join(self.channels)
                log.warning("subscription to %s lost (%s); retrying in %.2fs", channels, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8
