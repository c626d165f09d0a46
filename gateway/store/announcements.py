"""What the gateway processes sharing one Redis tell each other on its channels (`RedisStore` makes
the announcements in its writes and scripts, and hears them here):

- `{prefix}changed`: a visitor whose live answer may have changed (the visitor id);
- `{prefix}messages`: a fired trigger's message (msgpack `[visitor, message]`);
- `{prefix}erased`: an erasure (msgpack `[visitor, reply key]`). Every process closes what it holds
  of the visitor and pushes how many sockets that was onto the reply key, a list the announcing
  process pops until each receiver answered or its wait ran out.

One subscription serves all three, started by the first listener.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.store.base import ErasureListener, Listener, MessageListener
from gateway.store.pubsub import Subscription

log = logging.getLogger("tailor.store")

ERASURE_REPLY_TTL_S = 60  # an erasure's reply list outlives any announcer's wait
BLOCKING_POP_MAX_S = 0.5  # each blocking pop of the replies, well inside the client's socket timeout


class Announcements:
    """The channels of one store's prefix, their listeners, and the erasure round (see above)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self.channel = f"{prefix}changed"
        self.message_channel = f"{prefix}messages"
        self.erasure_channel = f"{prefix}erased"
        self._prefix = prefix
        self._message_channel_bytes = self.message_channel.encode()
        self._erasure_channel_bytes = self.erasure_channel.encode()
        self._listeners: list[Listener] = []
        self._message_listeners: list[MessageListener] = []
        self._erasure_listeners: list[ErasureListener] = []
        self._answering: set[asyncio.Task[None]] = set()  # erasures heard, being closed and answered
        self._subscription = Subscription(
            redis, (self.channel, self.message_channel, self.erasure_channel), self._heard, name="redis-changes"
        )
        self.subscribed = self._subscription.subscribed  # set while the subscription is live (tests wait on it)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        self._subscription.start()

    def subscribe_messages(self, listener: MessageListener) -> None:
        self._message_listeners.append(listener)
        self._subscription.start()

    def subscribe_erasures(self, listener: ErasureListener) -> None:
        self._erasure_listeners.append(listener)
        self._subscription.start()

    async def announce_erasure(self, visitor: str, *, wait: float) -> int:
        """How many sockets the processes that heard the erasure closed, counting those that
        answered within `wait` seconds. Redis's and the connection's errors reach the caller."""
        reply_key = f"{self._prefix}erased:{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        closed = 0
        receivers = await self._redis.publish(self.erasure_channel, msgspec.msgpack.encode((visitor, reply_key)))
        while receivers > 0 and (remaining := deadline - loop.time()) > 0:
            reply: Any = await self._redis.blpop([reply_key], timeout=min(remaining, BLOCKING_POP_MAX_S))
            if reply is not None:
                closed += int(reply[1])
                receivers -= 1
        if receivers > 0:
            log.warning("erasure announced: %d process(es) did not answer within %.1f s", receivers, wait)
        await self._redis.delete(reply_key)
        return closed

    async def _answer_erasure(self, visitor: str, reply_key: str) -> None:
        closed = 0
        for listener in self._erasure_listeners:
            try:
                closed += await listener(visitor)
            except Exception:
                log.exception("closing an erased visitor's sockets")
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.rpush(reply_key, closed)
            pipe.expire(reply_key, ERASURE_REPLY_TTL_S)
            await pipe.execute()
        except (RedisError, OSError, ValueError) as exc:
            log.warning("could not answer an erasure announcement: %s", type(exc).__name__)

    def _heard(self, channel: bytes, data: bytes) -> None:
        if channel == self._erasure_channel_bytes:
            visitor, reply_key = msgspec.msgpack.decode(data, type=tuple[str, str])
            task = asyncio.get_running_loop().create_task(self._answer_erasure(visitor, reply_key))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
            return
        if channel == self._message_channel_bytes:
            visitor, message = msgspec.msgpack.decode(data, type=tuple[str, bytes])
            for message_listener in self._message_listeners:
                message_listener(visitor, message)
            return
        visitor = data.decode()
        for listener in self._listeners:
            listener(visitor)

    async def close(self) -> None:
        await self._subscription.close()
        for task in list(self._answering):
            task.cancel()
