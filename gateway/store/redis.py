"""The shared store: per-visitor state in Redis, so every gateway process and host sees the same visitor.

Two keys per visitor, both expiring `ttl` after the visitor's latest write:

- `{prefix}v:{visitor}:recent`, a list of msgpack-encoded `Interaction`, oldest first, trimmed to `keep`;
- `{prefix}v:{visitor}:counters`, a hash from `name|window|bucket` to a count, where bucket is
  floor(now / window). Reads keep only the fields of the bucket containing `now`; each write deletes
  the previous bucket's field, and the key's expiry bounds whatever a visitor with gaps leaves behind.

Triggers (see `Store.schedule` and the rest):

- `{prefix}timers`, a sorted set of every pending timer, scored by when it is due; a member is the
  JSON `[visitor, trigger]`. Claiming takes members out of it in a script, so each goes to one process;
- `{prefix}v:{visitor}:timers`, a hash from such a member to its payload (what an erasure follows to
  the sorted set); no expiry: its fields go when they are claimed or cancelled;
- `{prefix}v:{visitor}:fired`, a hash from trigger to the time until which it may not fire again,
  expiring with the longest period;
- `{prefix}v:{visitor}:inbox`, a list of messages, trimmed to `keep`, expiring `ttl` after the last.
  Fired messages are announced on the channel `{prefix}messages` (msgpack `[visitor, message]`).

What the processes announce to each other on their channels, and hear: `gateway.store.announcements`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.store.announcements import Announcements
from gateway.store.base import (
    PURPOSES,
    Consent,
    ConsentChange,
    CounterKey,
    ErasureListener,
    Forgotten,
    Interaction,
    Listener,
    LogLine,
    MessageListener,
    PartlyStoredError,
    Profile,
    Recorded,
    Requirement,
    Retention,
    StoreError,
    StoreTimeoutError,
    Timer,
    TriggerState,
    counter_field,
    counter_of_field,
    decode_consent,
    decode_log,
    encode_consent,
    sliding_count,
    window_label,
)
from gateway.store.catalog import RedisCatalog
from gateway.store.documents import RedisDocuments
from gateway.store.ledger import RedisLedger
from gateway.store.resp import Multiplexed, RespError, RespTimeoutError
from gateway.store.scripts import (
    CANCEL_SCRIPT,
    CLAIM_SCRIPT,
    CONSENT_PREFIX,
    FIRE_SCRIPT,
    FORGET_SCRIPT,
    HEAD_FIELDS,
    PROFILE_SCRIPT,
    PROFILE_SHA,
    RECORD_SCRIPT,
    RECORD_SHA,
    SCHEDULE_SCRIPT,
    TRIGGER_STATE_SCRIPT,
)

log = logging.getLogger("tailor.store")

RECORD_CHUNK = 100  # visitors per pipelined round trip of `record_many`
AUDIT_MAX = 10_000_000  # consent changes kept in the audit stream (approximately)
LOG_PAGE = 1000

# Everything a broken, restarting or misbehaving server can make redis-py or the decoding raise.
_FAILURES = (RedisError, RespError, OSError, ValueError, msgspec.MsgspecError)


def _failure(operation: str, exc: BaseException) -> StoreError:
    return StoreError(f"redis {operation} failed: {type(exc).__name__}: {exc}")


class RedisStore:
    """Implements `Store` on Redis: `profile` and `record` are one pipelined round trip each.

    Timeouts are short because a caller on the hot path would rather degrade than wait. `retries` covers
    a connection that died since its last use (say, the server restarted): the command is retried once on
    a fresh connection, so the same object keeps working without being recreated. After a StoreError from
    `record` the write may or may not have happened (a hung server can still apply it when it wakes); a
    retry finds the events with ids that got through (duplicates), but counts those without ids twice:
    counters are approximate under faults. `record_many` takes a whole batch in one round trip per
    RECORD_CHUNK visitors on one connection, so however large, a batch never empties the pool.
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
        max_connections: int = 50,
        pool_timeout: float = 5.0,
    ) -> None:
        self.prefix = prefix
        # A blocking pool: past `max_connections` a command waits (up to `pool_timeout` seconds) for a
        # connection instead of failing at once, as redis-py's default pool does, which turned a burst
        # (timers firing, a large event batch) into errors for everyone sharing the pool.
        self._redis: Redis = Redis.from_pool(
            BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=pool_timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=timeout,
                health_check_interval=health_check_interval,
                retry=Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), retries),
            )
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
        self.log_key = f"{prefix}events"  # the event log stream: `tailor build --event-log redis://...`
        self.audit_key = f"{prefix}consent-audit"  # every consent change, appended
        self.timers_key = f"{prefix}timers"  # every pending trigger timer, by due time
        self._profile_script = self._redis.register_script(PROFILE_SCRIPT)
        self._schedule = self._redis.register_script(SCHEDULE_SCRIPT)
        self._cancel = self._redis.register_script(CANCEL_SCRIPT)
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._fire = self._redis.register_script(FIRE_SCRIPT)
        self._trigger_state = self._redis.register_script(TRIGGER_STATE_SCRIPT)
        self._forget = self._redis.register_script(FORGET_SCRIPT)
        # Changed visitors, fired messages and erasures, announced to every process and heard from them.
        self._announcements = Announcements(self._redis, prefix)
        self.channel = self._announcements.channel
        self.message_channel = self._announcements.message_channel
        self.erasure_channel = self._announcements.erasure_channel
        self.subscribed = self._announcements.subscribed  # set while the subscription is live (tests wait on it)

    def documents(self, kind: str) -> RedisDocuments:
        """Versioned documents (rule sets, ...) in this Redis, under this store's prefix."""
        return RedisDocuments(kind, self._redis, prefix=self.prefix)

    def catalog(self) -> RedisCatalog:
        """Live catalog changes in this Redis, under this store's prefix."""
        return RedisCatalog(self._redis, prefix=self.prefix)

    def ledger(self) -> RedisLedger:
        """The experiment ledger in this Redis, under this store's prefix, on this store's client (so
        closing the store closes it)."""
        return RedisLedger(self._redis, prefix=self.prefix)

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

    def _ids_key(self, visitor: str) -> str:
        return f"{self.prefix}v:{visitor}:ids"

    def _trigger_keys(self, visitor: str) -> tuple[str, str, str]:
        """The visitor's timers hash, fired hash and inbox list."""
        stem = f"{self.prefix}v:{visitor}:"
        return stem + "timers", stem + "fired", stem + "inbox"

    @staticmethod
    def _member(visitor: str, trigger: str) -> bytes:
        """A timer's member of the timers sorted set (the claim script reads the visitor back out of it)."""
        return msgspec.json.encode((visitor, trigger))

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
        keys = (*self._keys(visitor), self._trigger_keys(visitor)[2])
        chosen = () if isinstance(counters, bool) else tuple(counters)
        need = 0 if requires is None else HEAD_FIELDS.index(CONSENT_PREFIX + requires.purpose) + 1
        args = (
            limit,
            (1 if counters else 0) if isinstance(counters, bool) else 2 if chosen else 0,
            need,
            1 if requires is not None and requires.default else 0,
            repr(now),
            0 if inbox is None else HEAD_FIELDS.index(CONSENT_PREFIX + inbox.purpose) + 1,
            1 if inbox is not None and inbox.default else 0,
            *(counter_field(c.name, c.window) for c in chosen),
        )
        try:
            reply = await self._eval_profile(keys, args)
            permitted, head, messages = reply[0], reply[1], list(reply[2])
            seen, *choices = head
            consent = {p: decode_consent(c) for p, c in zip(PURPOSES, choices, strict=True) if c is not None}
            if not permitted:
                return Profile(recent=[], counters={}, consent=consent, withheld=True, messages=messages)
            recent = [self._decode(raw) for raw in reply[3]]
            counts: dict[str, int] = {}
            if chosen:
                for counter, raw_value in zip(chosen, reply[4], strict=True):
                    if raw_value is not None:
                        bucket, current, previous = (int(part) for part in raw_value.split(b":"))
                        count = sliding_count(bucket, current, previous, counter.window, now)
                        if count:
                            counts[counter.key] = count
            elif counters:
                flat = reply[4]
                for raw_field, raw_value in zip(flat[::2], flat[1::2], strict=True):
                    field = raw_field.decode()
                    if field[0] == "@":  # last seen and consent: read above
                        continue
                    name, window = counter_of_field(field)
                    bucket, current, previous = (int(part) for part in raw_value.split(b":"))
                    count = sliding_count(bucket, current, previous, window, now)
                    if count:
                        counts[f"{name}/{window_label(window)}"] = count
        except RespTimeoutError as exc:
            raise StoreTimeoutError(f"redis profile failed: {exc}") from exc
        except _FAILURES as exc:
            raise _failure("profile", exc) from exc
        last_seen = float(seen) if seen is not None else None
        return Profile(recent=recent, counters=counts, last_seen=last_seen, consent=consent, messages=messages)

    async def _eval_profile(self, keys: tuple[str, ...], args: tuple[int | str, ...]) -> Any:
        """PROFILE_SCRIPT by its digest, loading it when the server does not know it (yet, or
        any more: a restart or SCRIPT FLUSH forgets it)."""
        if self._fast is None:
            return await self._profile_script(keys=list(keys), args=list(args))
        try:
            return (await self._fast.execute(("EVALSHA", PROFILE_SHA, len(keys), *keys, *args)))[0]
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return (await self._fast.execute(("EVAL", PROFILE_SCRIPT, len(keys), *keys, *args)))[0]

    async def record(
        self,
        visitor: str,
        events: Sequence[Recorded],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
    ) -> list[bool] | None:
        (stored,) = await self.record_many([(visitor, events)], retention=retention, now=now, requires=requires)
        return stored

    async def record_many(
        self,
        batch: Sequence[tuple[str, Sequence[Recorded]]],
        *,
        retention: Retention,
        now: float,
        requires: Requirement | None = None,
        timeout: float | None = None,
    ) -> list[list[bool] | None]:
        # One pipeline of RECORD_SCRIPT calls per RECORD_CHUNK visitors, one after the other: a batch
        # holds one pooled connection at a time, so no batch can take the pool from everyone else.
        # Each script is atomic, so a visitor's outcome is all or nothing; a chunk whose connection
        # failed mid-way is unknown (its scripts may have run), which the id de-duplication absorbs.
        outcomes: dict[int, list[bool] | None] = {}
        calls: list[tuple[int, list[str], list[bytes | str | int | float]]] = []
        for position, (visitor, events) in enumerate(batch):
            if not events and requires is None:
                outcomes[position] = []
            else:
                calls.append((position, *self._record_call(visitor, events, retention, now, requires)))
        failures: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                for start in range(0, len(calls), RECORD_CHUNK):
                    chunk = calls[start : start + RECORD_CHUNK]
                    replies = await self._evalsha_all(RECORD_SCRIPT, RECORD_SHA, [(k, a) for _, k, a in chunk])
                    for (position, _, _), reply in zip(chunk, replies, strict=True):
                        if isinstance(reply, Exception):
                            failures.append(f"{type(reply).__name__}: {reply}")
                        else:
                            outcomes[position] = None if reply == -1 else [bool(flag) for flag in reply]
        except TimeoutError as exc:
            raise PartlyStoredError(f"redis record failed: timed out after {timeout} s", outcomes) from exc
        except _FAILURES as exc:
            raise PartlyStoredError(str(_failure("record", exc)), outcomes) from exc
        if failures:
            raise PartlyStoredError(
                f"redis record failed for {len(failures)} of {len(batch)} visitors: {failures[0]}", outcomes
            )
        return [outcomes[position] for position in range(len(batch))]

    def _record_call(
        self,
        visitor: str,
        events: Sequence[Recorded],
        retention: Retention,
        now: float,
        requires: Requirement | None,
    ) -> tuple[list[str], list[bytes | str | int | float]]:
        """RECORD_SCRIPT's KEYS and ARGV for one visitor's events."""
        keys = [*self._keys(visitor), self._ids_key(visitor), self.log_key]
        args: list[bytes | str | int | float] = [
            repr(now),
            retention.keep,
            max(1, math.ceil(retention.ttl * 1000)),
            retention.ids,
            retention.max_counters,
            retention.log,
            self.channel,
            visitor,
            "" if requires is None else CONSENT_PREFIX + requires.purpose,
            1 if requires is not None and requires.default else 0,
            f"{max(0, math.floor((now - retention.log_ttl) * 1000))}-0" if retention.log_ttl > 0 else "",
            len(retention.windows),
            *[repr(float(w)) for w in retention.windows],
            len(events),
        ]
        for event in events:
            interaction = event.interaction()
            names = event.counter_names()
            args += [
                event.id or "",
                self._encode(interaction) if interaction is not None else b"",
                repr(event.ts),
                event.log_line(visitor) if retention.log else b"",
                len(names),
                *names,
            ]
        return keys, args

    async def _evalsha_all(
        self, script: str, sha: str, calls: Sequence[tuple[list[str], list[bytes | str | int | float]]]
    ) -> list[Any]:
        """Run `script` once per (KEYS, ARGV) in one pipelined round trip; the replies in order, an
        exception in place of each call that failed. The script is loaded (and the calls it was
        missing for run again) when the server does not know it: NOSCRIPT means nothing ran."""
        replies = await self._pipelined(sha, calls)
        missing = [at for at, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self._redis.script_load(script)
            for at, reply in zip(missing, await self._pipelined(sha, [calls[at] for at in missing]), strict=True):
                replies[at] = reply
        return replies

    async def _pipelined(
        self, sha: str, calls: Sequence[tuple[list[str], list[bytes | str | int | float]]]
    ) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def forget(self, visitor: str) -> Forgotten:
        keys = [*self._keys(visitor), self._ids_key(visitor), *self._trigger_keys(visitor), self.timers_key]
        try:
            deleted = await self._forget(keys=keys)
            entries = [entry for entry, _ in await self._scan_log(visitor)]
            for start in range(0, len(entries), LOG_PAGE):
                await self._redis.xdel(self.log_key, *entries[start : start + LOG_PAGE])
        except _FAILURES as exc:
            raise _failure("forget", exc) from exc
        return Forgotten(profile=deleted > 0, log_events=len(entries))

    async def logged(self, visitor: str) -> list[LogLine]:
        try:
            return [line for _, line in await self._scan_log(visitor)]
        except _FAILURES as exc:
            raise _failure("logged", exc) from exc

    async def _scan_log(self, visitor: str) -> list[tuple[bytes, LogLine]]:
        """The visitor's entries of the event log stream, read in pages."""
        found: list[tuple[bytes, LogLine]] = []
        start = "-"
        while True:
            page: Any = await self._redis.xrange(self.log_key, min=start, max="+", count=LOG_PAGE)
            for entry, fields in page:
                line = decode_log(fields[b"e"])
                if line.user_id == visitor:
                    found.append((entry, line))
            if len(page) < LOG_PAGE:
                return found
            start = "(" + page[-1][0].decode()

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except _FAILURES as exc:
            raise _failure("ping", exc) from exc

    async def set_consent(self, visitor: str, choices: Mapping[str, Consent], *, ttl: float, now: float) -> None:
        if not choices:
            return
        _, counters_key = self._keys(visitor)
        pipe = self._redis.pipeline(transaction=True)  # the choices and their audit lines, or nothing
        pipe.hset(counters_key, mapping={CONSENT_PREFIX + p: encode_consent(c) for p, c in choices.items()})
        ttl_ms = max(1, math.ceil(ttl * 1000))
        pipe.pexpire(counters_key, ttl_ms, gt=True)  # never shortens what the events set
        pipe.pexpire(counters_key, ttl_ms, nx=True)
        for purpose, choice in choices.items():
            change = ConsentChange(visitor, purpose, choice.state, choice.at, choice.source, choice.expires_at)
            pipe.xadd(self.audit_key, {"e": encode_consent(change)}, maxlen=AUDIT_MAX, approximate=True)
        pipe.publish(self.channel, visitor)  # a live answer may change: see subscribe
        try:
            await pipe.execute()
        except _FAILURES as exc:
            raise _failure("set_consent", exc) from exc

    # -- triggers ----------------------------------------------------------------------------------
    def _consent_args(self, requires: Requirement | None) -> tuple[str, int]:
        if requires is None:
            return "", 0
        return CONSENT_PREFIX + requires.purpose, 1 if requires.default else 0

    async def schedule(
        self, visitor: str, timers: Sequence[Timer], *, now: float, requires: Requirement | None = None
    ) -> list[bool] | None:
        timers_hash = self._trigger_keys(visitor)[0]
        args: list[bytes | str | int] = [repr(now), *self._consent_args(requires)]
        for timer in timers:
            args += [self._member(visitor, timer.trigger), repr(float(timer.due)), timer.payload]
        try:
            reply = await self._schedule(keys=[self._keys(visitor)[1], timers_hash, self.timers_key], args=args)
        except _FAILURES as exc:
            raise _failure("schedule", exc) from exc
        if reply == -1:
            return None
        return [bool(flag) for flag in reply]

    async def cancel(self, visitor: str, triggers: Sequence[str]) -> list[str]:
        if not triggers:
            return []
        members = [self._member(visitor, trigger) for trigger in triggers]
        try:
            removed = await self._cancel(keys=[self._trigger_keys(visitor)[0], self.timers_key], args=members)
        except _FAILURES as exc:
            raise _failure("cancel", exc) from exc
        return [triggers[position - 1] for position in removed]

    async def claim_due(self, *, now: float, limit: int) -> list[tuple[str, Timer]]:
        try:
            flat = await self._claim(keys=[self.timers_key], args=[repr(now), limit, self.prefix])
            claimed: list[tuple[str, Timer]] = []
            for at in range(0, len(flat), 3):
                visitor, trigger = msgspec.json.decode(flat[at], type=tuple[str, str])
                claimed.append((visitor, Timer(trigger, float(flat[at + 1]), flat[at + 2])))
        except _FAILURES as exc:
            raise _failure("claim_due", exc) from exc
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
        _, fired_key, inbox_key = self._trigger_keys(visitor)
        args: list[bytes | str | int] = [
            repr(now),
            *self._consent_args(requires),
            trigger,
            repr(now + period),
            max(1, math.ceil(period * 1000)),
            message,
            keep,
            max(1, math.ceil(ttl * 1000)),
            self.message_channel,
            msgspec.msgpack.encode((visitor, message)),
        ]
        try:
            outcome = await self._fire(keys=[self._keys(visitor)[1], fired_key, inbox_key], args=args)
        except _FAILURES as exc:
            raise _failure("fire", exc) from exc
        return None if outcome == -1 else bool(outcome)

    async def trigger_state(self, visitor: str, *, now: float) -> TriggerState:
        try:
            reply = await self._trigger_state(keys=[*self._trigger_keys(visitor), self.timers_key])
            flat, dues, fired_flat, inbox = reply
            timers = [
                Timer(msgspec.json.decode(member, type=tuple[str, str])[1], float(due), payload)
                for member, payload, due in zip(flat[::2], flat[1::2], dues, strict=True)
                if due  # a field whose member is no longer in the sorted set is on its way out
            ]
            fired = {
                trigger.decode(): float(until)
                for trigger, until in zip(fired_flat[::2], fired_flat[1::2], strict=True)
                if float(until) > now
            }
        except _FAILURES as exc:
            raise _failure("trigger_state", exc) from exc
        return TriggerState(timers=sorted(timers, key=lambda timer: timer.due), fired=fired, messages=list(inbox))

    def subscribe_messages(self, listener: MessageListener) -> None:
        self._announcements.subscribe_messages(listener)

    def subscribe(self, listener: Listener) -> None:
        self._announcements.subscribe(listener)

    def subscribe_erasures(self, listener: ErasureListener) -> None:
        self._announcements.subscribe_erasures(listener)

    async def announce_erasure(self, visitor: str, *, wait: float) -> int:
        try:
            return await self._announcements.announce_erasure(visitor, wait=wait)
        except _FAILURES as exc:
            raise _failure("announce_erasure", exc) from exc

    async def close(self) -> None:
        await self._announcements.close()
        if self._fast is not None:
            self._fast.close()
        await self._redis.aclose()
