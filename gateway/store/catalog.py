"""Live catalog changes every node follows (gateway.catalog): the latest record of each item, each
with a sequence number, so a node asks for what changed after the last number it applied.

Records are opaque bytes here (the store knows nothing of items). Two backends, chosen like the
store: in a file (the memory store's companion, beside the rules: one process, kept across
restarts) or in Redis (shared by every node; each change is announced on a pub/sub channel, and
nodes also poll, so a lost announcement only delays them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.store.base import StoreError
from gateway.store.pubsub import Subscription

Changed = Callable[[], None]
# A change as read back: (sequence number, item id, record).
Change = tuple[int, str, bytes]
# Records read per round trip when a node catches up (a restarted node replays the whole catalog).
READ_CHUNK = 5_000


class CatalogChanges(Protocol):
    async def put(self, records: Sequence[tuple[str, bytes]]) -> int:
        """Store each (item id, record), all or none, numbered in order (the next numbers of the
        sequence); the last number given."""
        ...

    async def since(self, seq: int, limit: int = READ_CHUNK) -> list[Change]:
        """The latest record of each item changed after `seq`, oldest change first, at most `limit`."""
        ...

    async def size(self) -> int:
        """How many items have a record."""
        ...

    def watch(self, changed: Changed) -> None:
        """Call `changed()` on the event loop after any node stores a change."""
        ...

    async def close(self) -> None: ...


class _Line(msgspec.Struct, array_like=True):
    seq: int
    item: str
    record: msgspec.Raw


class LocalCatalog:
    """In this process, and in `path` (if given, beside the rules) so changes survive a restart:
    an append-only JSON-lines file, compacted to the latest record of each item when it is opened."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._latest: dict[str, tuple[int, bytes]] = {}
        self._order: list[tuple[int, str]] = []  # (seq, item) of every put, ascending
        self._seq = 0
        self._watchers: list[Changed] = []
        self._loaded = path is None
        self._lock = asyncio.Lock()

    async def _load(self) -> None:
        if not self._loaded:
            await asyncio.to_thread(self._read)
            self._loaded = True

    def _read(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            decoder = msgspec.json.Decoder(_Line)
            for raw in self.path.read_bytes().splitlines():
                try:
                    line = decoder.decode(raw)
                except msgspec.DecodeError:
                    continue  # a line cut short by a crash mid-write
                self._latest[line.item] = (line.seq, bytes(line.record))
                self._seq = max(self._seq, line.seq)
        self._order = sorted((seq, item) for item, (seq, _) in self._latest.items())
        # Compact: the latest record of each item, written beside and renamed over the file.
        encoder = msgspec.json.Encoder()
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with temporary.open("wb") as handle:
            for seq, item in self._order:
                handle.write(encoder.encode(_Line(seq, item, msgspec.Raw(self._latest[item][1]))) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    async def put(self, records: Sequence[tuple[str, bytes]]) -> int:
        async with self._lock:
            await self._load()
            first = self._seq + 1
            lines = [_Line(first + n, item, msgspec.Raw(record)) for n, (item, record) in enumerate(records)]
            if self.path is not None:
                encoder = msgspec.json.Encoder()
                data = b"".join(encoder.encode(line) + b"\n" for line in lines)
                await asyncio.to_thread(self._append, data)
            for line in lines:
                self._latest[line.item] = (line.seq, bytes(line.record))
                self._order.append((line.seq, line.item))
            self._seq += len(lines)
        for changed in self._watchers:
            changed()
        return self._seq

    def _append(self, data: bytes) -> None:
        assert self.path is not None
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    async def since(self, seq: int, limit: int = READ_CHUNK) -> list[Change]:
        await self._load()
        found: list[Change] = []
        start = _first_after(self._order, seq)
        for at_seq, item in self._order[start:]:
            latest_seq, record = self._latest[item]
            if latest_seq == at_seq:  # else a later put replaced it: that one comes in its turn
                found.append((at_seq, item, record))
                if len(found) == limit:
                    break
        return found

    async def size(self) -> int:
        await self._load()
        return len(self._latest)

    def watch(self, changed: Changed) -> None:
        self._watchers.append(changed)

    async def close(self) -> None:
        self._watchers.clear()


def _first_after(order: list[tuple[int, str]], seq: int) -> int:
    low, high = 0, len(order)
    while low < high:
        middle = (low + high) // 2
        if order[middle][0] <= seq:
            low = middle + 1
        else:
            high = middle
    return low


# KEYS: the sequence counter, the records hash, the order sorted set (item -> seq), the channel.
# ARGV: item, record, item, record, ...; returns the last sequence number given.
PUT_SCRIPT = """
local count = #ARGV / 2
local last = redis.call('INCRBY', KEYS[1], count)
local seq = last - count
for i = 1, #ARGV, 2 do
  seq = seq + 1
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], seq, ARGV[i])
end
redis.call('PUBLISH', KEYS[4], last)
return last
"""

# KEYS: the order sorted set, the records hash. ARGV: after this seq, at most this many.
# Returns seq, item, record, seq, item, record, ... (read in one step, so a record is never newer
# than its number; a later change of it comes again with its own).
SINCE_SCRIPT = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
for i = 1, #found, 2 do
  out[#out + 1] = found[i + 1]
  out[#out + 1] = found[i]
  out[#out + 1] = redis.call('HGET', KEYS[2], found[i])
end
return out
"""

_FAILURES = (RedisError, OSError, ValueError)


class RedisCatalog:
    """In Redis, under `{prefix}catalog:`: `seq`, `items` (item -> record), `order` (item -> the
    seq of its last change), and the channel `{prefix}catalog` that announces every change."""

    def __init__(self, redis: Redis, *, prefix: str = "tailor:") -> None:
        self._redis = redis
        stem = f"{prefix}catalog:"
        self.keys = (stem + "seq", stem + "items", stem + "order")
        self.channel = f"{prefix}catalog"
        self._put = redis.register_script(PUT_SCRIPT)
        self._since = redis.register_script(SINCE_SCRIPT)
        self._watchers: list[Changed] = []
        self._subscription = Subscription(
            redis, (self.channel,), self._heard, name="redis-catalog", resubscribed=self._heard
        )
        self.subscribed = self._subscription.subscribed

    async def put(self, records: Sequence[tuple[str, bytes]]) -> int:
        if not records:
            return 0
        arguments: list[Any] = [part for pair in records for part in pair]
        try:
            return int(await self._put(keys=[*self.keys, self.channel], args=arguments))
        except _FAILURES as exc:
            raise StoreError(f"redis catalog put failed: {type(exc).__name__}: {exc}") from exc

    async def since(self, seq: int, limit: int = READ_CHUNK) -> list[Change]:
        try:
            flat: list[Any] = await self._since(keys=[self.keys[2], self.keys[1]], args=[seq, limit])
        except _FAILURES as exc:
            raise StoreError(f"redis catalog read failed: {type(exc).__name__}: {exc}") from exc
        return [
            (int(float(flat[i])), bytes(flat[i + 1]).decode(), bytes(flat[i + 2]))
            for i in range(0, len(flat), 3)
            if flat[i + 2] is not None
        ]

    async def size(self) -> int:
        try:
            return int(await self._redis.hlen(self.keys[1]))  # type: ignore[misc,unused-ignore]
        except _FAILURES as exc:
            raise StoreError(f"redis catalog size failed: {type(exc).__name__}: {exc}") from exc

    def watch(self, changed: Changed) -> None:
        self._watchers.append(changed)
        self._subscription.start()

    def _heard(self, channel: bytes = b"", data: bytes = b"") -> None:
        for changed in self._watchers:
            changed()

    async def close(self) -> None:
        await self._subscription.close()
        self._watchers.clear()
