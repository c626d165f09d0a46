"""The shared store: per-visitor state in Redis, so every gateway process and host sees the same visitor.

Two keys per visitor, both expiring `ttl` after the visitor's latest write:

- `{prefix}v:{visitor}:recent`, a list of msgpack-encoded `Interaction`, oldest first, trimmed to `keep`;
- `{prefix}v:{visitor}:counters`, a hash from `name|window|bucket` to a count, where bucket is
  floor(now / window). Reads keep only the fields of the bucket containing `now`; each write deletes
  the previous bucket's field, and the key's expiry bounds whatever a visitor with gaps leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence

import msgspec
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from gateway.store.base import Interaction, Listener, Profile, StoreError, StoreTimeoutError, check_record
from gateway.store.resp import Multiplexed, RespError, RespTimeoutError

log = logging.getLogger("tailor.store")

# Everything a broken, restarting or misbehaving server can make redis-py or the decoding raise.
_FAILURES = (RedisError, RespError, OSError, ValueError, msgspec.MsgspecError)


def _failure(operation: str, exc: BaseException) -> StoreError:
    return StoreError(f"redis {operation} failed: {type(exc).__name__}: {exc}")


class RedisStore:
    """Implements `Store` on Redis: `profile` and `record` are one pipelined round trip each.

    Timeouts are short because a caller on the hot path would rather degrade than wait. `retries` covers
    a connection that died since its last use (say, the server restarted): the command is retried once on
    a fresh connection, so the same object keeps working without being recreated. After a StoreError from
    `record` the write may or may not have happened (a hung server can still apply it when it wakes), and a
    retried `record` whose first attempt got through counts twice: counters are approximate under faults.
    A connection idle for `health_check_interval` seconds is PINGed before reuse, an extra round trip
    that a busy gateway never pays.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tailor:",
        connect_timeout: float = 1.0,
        timeout: float = 1.0,
        health_check_interval: int = 30,
        retries: int = 1,
    ) -> None:
        self.prefix = prefix
        self._redis: Redis = Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            health_check_interval=health_check_interval,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), retries),
        )
        # redis-py hands URL query options to each new connection, so a misspelt one would only surface as a
        # TypeError on the first command; building one unconnected connection surfaces it here instead.
        pool = self._redis.connection_pool
        try:
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as exc:
            raise ValueError(f"redis URL has an option redis-py does not know: {exc}") from None
        # The hot-path read goes through one multiplexed connection of our own (see resp.py); TLS
        # connections, which it does not speak, stay with redis-py.
        self._fast: Multiplexed | None = None
        options = pool.connection_kwargs
        if pool.connection_class in (Connection, UnixDomainSocketConnection):
            self._fast = Multiplexed(
                host=options.get("host", "127.0.0.1"),
                port=int(options.get("port", 6379)),
                path=options.get("path"),
                db=int(options.get("db", 0) or 0),
                username=options.get("username"),
                password=options.get("password"),
                connect_timeout=connect_timeout,
                timeout=timeout,
            )
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Interaction).decode
        self.channel = f"{prefix}changed"
        self._listeners: list[Listener] = []
        self._subscriber: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set while the subscription is live (tests wait on it)

    def bound_reads(self, timeout: float) -> bool:
        """Make `profile` give up after `timeout` seconds by itself (one timer per connection, see
        resp.py), so the caller needs no timer per call; False when it cannot (TLS: redis-py)."""
        if self._fast is None:
            return False
        self._fast.timeout = timeout
        return True

    def _keys(self, visitor: str) -> tuple[str, str]:
        stem = f"{self.prefix}v:{visitor}:"
        return stem + "recent", stem + "counters"

    async def profile(self, visitor: str, *, limit: int, now: float) -> Profile:
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        recent_key, counters_key = self._keys(visitor)
        try:
            if self._fast is not None:
                commands = [("LRANGE", recent_key, -limit, -1)] if limit else []
                replies = await self._fast.execute(*commands, ("HGETALL", counters_key))
                flat = replies[-1]
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
            else:
                pipe = self._redis.pipeline(transaction=False)
                if limit:
                    # LRANGE with a start of -0 would mean the whole list, hence no LRANGE at all for limit 0.
                    pipe.lrange(recent_key, -limit, -1)
                pipe.hgetall(counters_key)
                replies = await pipe.execute()
                fields = replies[-1]
            recent = [self._decode(raw) for raw in replies[0]] if limit else []
            counters: dict[str, int] = {}
            for field, value in fields.items():
                name, window, bucket = field.decode().rsplit("|", 2)
                if int(bucket) == math.floor(now / float(window)):
                    counters[name] = counters.get(name, 0) + int(value)
        except RespTimeoutError as exc:
            raise StoreTimeoutError(f"redis profile failed: {exc}") from exc
        except _FAILURES as exc:
            raise _failure("profile", exc) from exc
        return Profile(recent=recent, counters=counters)

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
        recent_key, counters_key = self._keys(visitor)
        pipe = self._redis.pipeline(transaction=False)
        if interactions:
            pipe.rpush(recent_key, *[self._encode(interaction) for interaction in interactions])
            pipe.ltrim(recent_key, -keep, -1)
        if counters:
            # float() so that a window given as 3600 and as 3600.0 names the same field.
            window_text = repr(float(window))
            bucket = math.floor(now / window)
            for name, amount in counters.items():
                pipe.hincrby(counters_key, f"{name}|{window_text}|{bucket}", amount)
            pipe.hdel(counters_key, *[f"{name}|{window_text}|{bucket - 1}" for name in counters])
        # Both keys, so the list and the counters of one visitor always expire together.
        ttl_ms = max(1, math.ceil(ttl * 1000))
        pipe.pexpire(recent_key, ttl_ms)
        pipe.pexpire(counters_key, ttl_ms)
        pipe.publish(self.channel, visitor)  # every subscribed gateway process hears of it
        try:
            await pipe.execute()
        except _FAILURES as exc:
            raise _failure("record", exc) from exc

    async def forget(self, visitor: str) -> None:
        try:
            await self._redis.delete(*self._keys(visitor))
        except _FAILURES as exc:
            raise _failure("forget", exc) from exc

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except _FAILURES as exc:
            raise _failure("ping", exc) from exc

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self._subscriber is None:
            self._subscriber = asyncio.get_running_loop().create_task(self._listen(), name="redis-changes")

    async def _listen(self) -> None:
        """Hand every announced visitor to the listeners; reconnect with back-off when Redis goes."""
        delay = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay = 0.05
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        visitor = message["data"].decode()
                        for listener in self._listeners:
                            listener(visitor)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection trouble; a listener's bug must not end the subscription
                self.subscribed.clear()
                log.warning("change subscription to %s lost (%s); retrying in %.2fs", self.channel, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
            self._subscriber = None
        if self._fast is not None:
            self._fast.close()
        await self._redis.aclose()
