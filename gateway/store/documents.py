"""Versioned documents every gateway node follows: rule sets now, experiment plans later.

Each kind of document has numbered, immutable versions, one active version (or none), runtime flags
(name -> enabled, overriding what the document says) and a log of activations, so that a rollback
knows what was active before. Two backends, chosen like the store: in a directory (the memory
store's companion: one process, kept across restarts) or in Redis (shared by every node; a change is
announced on a pub/sub channel, and nodes also poll, so a missed announcement only delays them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.store.base import StoreError
from gateway.store.pubsub import Subscription
from gateway.tasks import stop as stop_task

log = logging.getLogger("tailor.store")

Changed = Callable[[], None]


class Revision(msgspec.Struct, frozen=True, omit_defaults=True):
    version: int
    created_at: float
    sha256: str
    size: int
    note: str = ""


class Activation(msgspec.Struct, frozen=True):
    version: int | None  # None: deactivated
    at: float


class State(msgspec.Struct, frozen=True):
    """What every node serves: the active version and the flags."""

    active: int | None = None
    flags: dict[str, bool] = {}


class UnknownVersionError(LookupError):
    pass


class Documents(Protocol):
    kind: str

    async def put(self, body: bytes, *, now: float, note: str = "") -> Revision: ...
    async def get(self, version: int) -> bytes | None: ...
    async def revisions(self) -> list[Revision]: ...
    async def activations(self) -> list[Activation]: ...
    async def state(self) -> State: ...
    async def activate(self, version: int | None, *, now: float) -> State:
        """Make `version` active (None: none), on every node; UnknownVersionError if never put."""
        ...

    async def set_flag(self, name: str, enabled: bool | None) -> State:
        """Override a document's own `enabled` for `name` (None: stop overriding)."""
        ...

    def watch(self, changed: Changed) -> None:
        """Call `changed()` on the event loop after any node activates or flags something."""
        ...

    async def close(self) -> None: ...


def _revision(version: int, body: bytes, now: float, note: str) -> Revision:
    return Revision(version, now, hashlib.sha256(body).hexdigest(), len(body), note)


_encode = msgspec.json.Encoder().encode


class LocalDocuments:
    """In this process, and in `directory` (if given) so versions survive a restart: one file per
    version, an append-only log of revisions and activations, and the state written atomically."""

    def __init__(self, kind: str, directory: Path | None = None) -> None:
        self.kind = kind
        self.directory = directory
        self._bodies: dict[int, bytes] = {}
        self._revisions: list[Revision] = []
        self._activations: list[Activation] = []
        self._state = State()
        self._watchers: list[Changed] = []
        self._loaded = directory is None
        self._lock = asyncio.Lock()

    async def _load(self) -> None:
        if not self._loaded:
            await asyncio.to_thread(self._read)
            self._loaded = True

    def _read(self) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        revisions = self.directory / "revisions.jsonl"
        if revisions.exists():
            for line in revisions.read_bytes().splitlines():
                if line.strip():
                    revision = msgspec.json.decode(line, type=Revision)
                    path = self.directory / f"v{revision.version:06d}.json"
                    if path.exists():
                        self._bodies[revision.version] = path.read_bytes()
                        self._revisions.append(revision)
        activations = self.directory / "activations.jsonl"
        if activations.exists():
            self._activations = [
                msgspec.json.decode(line, type=Activation) for line in activations.read_bytes().splitlines() if line
            ]
        state = self.directory / "state.json"
        if state.exists():
            self._state = msgspec.json.decode(state.read_bytes(), type=State)

    def _append(self, name: str, line: bytes) -> None:
        if self.directory is not None:
            with (self.directory / name).open("ab") as handle:
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _write(self, name: str, body: bytes) -> None:
        if self.directory is not None:
            temporary = self.directory / f".{name}.tmp"
            temporary.write_bytes(body)
            os.replace(temporary, self.directory / name)

    async def put(self, body: bytes, *, now: float, note: str = "") -> Revision:
        async with self._lock:
            await self._load()
            version = max(self._bodies, default=0) + 1
            revision = _revision(version, body, now, note)

            def write() -> None:
                self._write(f"v{version:06d}.json", body)
                self._append("revisions.jsonl", _encode(revision))

            await asyncio.to_thread(write)
            self._bodies[version] = body
            self._revisions.append(revision)
            return revision

    async def get(self, version: int) -> bytes | None:
        await self._load()
        return self._bodies.get(version)

    async def revisions(self) -> list[Revision]:
        await self._load()
        return list(self._revisions)

    async def activations(self) -> list[Activation]:
        await self._load()
        return list(self._activations)

    async def state(self) -> State:
        await self._load()
        return self._state

    async def activate(self, version: int | None, *, now: float) -> State:
        async with self._lock:
            await self._load()
            if version is not None and version not in self._bodies:
                raise UnknownVersionError(version)
            state = State(version, self._state.flags)
            activation = Activation(version, now)

            def write() -> None:
                self._write("state.json", _encode(state))
                self._append("activations.jsonl", _encode(activation))

            await asyncio.to_thread(write)
            self._state = state
            self._activations.append(activation)
        self._announce()
        return state

    async def set_flag(self, name: str, enabled: bool | None) -> State:
        async with self._lock:
            await self._load()
            flags = dict(self._state.flags)
            if enabled is None:
                flags.pop(name, None)
            else:
                flags[name] = enabled
            state = State(self._state.active, flags)
            await asyncio.to_thread(self._write, "state.json", _encode(state))
            self._state = state
        self._announce()
        return state

    def _announce(self) -> None:
        for changed in self._watchers:
            changed()

    def watch(self, changed: Changed) -> None:
        self._watchers.append(changed)

    async def close(self) -> None:
        self._watchers.clear()


_FAILURES = (RedisError, OSError, ValueError, msgspec.MsgspecError)


class RedisDocuments:
    """In Redis, under `{prefix}docs:{kind}:`: `seq` (the last version), `body` (version -> body),
    `revisions` and `activations` (lists of JSON), `active` and `flags` (the state), and the channel
    `{prefix}docs:{kind}` on which every change is announced."""

    def __init__(self, kind: str, redis: Redis, *, prefix: str = "tailor:") -> None:
        self.kind = kind
        self._redis = redis
        self.stem = f"{prefix}docs:{kind}:"
        self.channel = f"{prefix}docs:{kind}"
        self._watchers: list[Changed] = []
        # Every announcement, and every (re)subscription (what changed while it was down), is a change.
        self._subscription = Subscription(
            redis, (self.channel,), self._changed, name=f"redis-{kind}", resubscribed=self._changed
        )
        self.subscribed = self._subscription.subscribed

    async def _run(self, operation: str, pipe: Any) -> list[Any]:
        try:
            result: list[Any] = await pipe.execute()
        except _FAILURES as exc:
            raise StoreError(f"redis {operation} failed: {type(exc).__name__}: {exc}") from exc
        return result

    async def put(self, body: bytes, *, now: float, note: str = "") -> Revision:
        try:
            version = int(await self._redis.incr(self.stem + "seq"))
        except _FAILURES as exc:
            raise StoreError(f"redis put failed: {type(exc).__name__}: {exc}") from exc
        revision = _revision(version, body, now, note)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.stem + "body", str(version), body)
        pipe.rpush(self.stem + "revisions", _encode(revision))
        await self._run("put", pipe)
        return revision

    async def get(self, version: int) -> bytes | None:
        try:
            body: Any = await self._redis.hget(self.stem + "body", str(version))
        except _FAILURES as exc:
            raise StoreError(f"redis get failed: {type(exc).__name__}: {exc}") from exc
        return None if body is None else bytes(body)

    async def revisions(self) -> list[Revision]:
        return [msgspec.json.decode(raw, type=Revision) for raw in await self._list("revisions")]

    async def activations(self) -> list[Activation]:
        return [msgspec.json.decode(raw, type=Activation) for raw in await self._list("activations")]

    async def _list(self, name: str) -> list[bytes]:
        try:
            found: Any = await self._redis.lrange(self.stem + name, 0, -1)
        except _FAILURES as exc:
            raise StoreError(f"redis {name} failed: {type(exc).__name__}: {exc}") from exc
        return [bytes(raw) for raw in found]

    async def state(self) -> State:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self.stem + "active")
        pipe.hgetall(self.stem + "flags")
        active, flags = await self._run("state", pipe)
        return State(None if not active else int(active), {k.decode(): v == b"1" for k, v in sorted(flags.items())})

    async def activate(self, version: int | None, *, now: float) -> State:
        if version is not None and await self.get(version) is None:
            raise UnknownVersionError(version)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self.stem + "active", "" if version is None else str(version))
        pipe.rpush(self.stem + "activations", _encode(Activation(version, now)))
        pipe.publish(self.channel, b"activate")
        await self._run("activate", pipe)
        return await self.state()

    async def set_flag(self, name: str, enabled: bool | None) -> State:
        pipe = self._redis.pipeline(transaction=True)
        if enabled is None:
            pipe.hdel(self.stem + "flags", name)
        else:
            pipe.hset(self.stem + "flags", name, "1" if enabled else "0")
        pipe.publish(self.channel, b"flag")
        await self._run("set_flag", pipe)
        return await self.state()

    def watch(self, changed: Changed) -> None:
        self._watchers.append(changed)
        self._subscription.start()

    def _changed(self, channel: bytes = b"", data: bytes = b"") -> None:
        for changed in self._watchers:
            changed()

    async def close(self) -> None:
        await self._subscription.close()
        self._watchers.clear()


class Follower:
    """What every node does with one kind of documents: refresh on each announcement (one refresh
    at a time; announcements meanwhile fold into the next) and every `poll_s`, which catches what a
    lost announcement missed. Subclasses say what a refresh is."""

    def __init__(self, documents: Documents, *, poll_s: float) -> None:
        self.documents = documents
        self.poll_s = poll_s
        self._poller: asyncio.Task[None] | None = None
        self._pending: asyncio.Task[None] | None = None
        self._again = False  # an announcement came while a refresh ran

    async def refresh(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self.documents.watch(self.changed)
        await self.refresh()
        if self.poll_s > 0:
            self._poller = asyncio.create_task(self._poll(), name=f"{self.documents.kind}-poller")

    async def stop(self) -> None:
        for task in (self._poller, self._pending):
            await stop_task(task)
        await self.documents.close()

    def changed(self) -> None:
        """An announcement: refresh soon. One made while a refresh runs gets a refresh after it
        (that one may have read the state before the change)."""
        if self._pending is not None and not self._pending.done():
            self._again = True
            return
        self._pending = asyncio.get_running_loop().create_task(
            self._refresh_logged(), name=f"{self.documents.kind}-refresh"
        )

    async def _refresh_logged(self) -> None:
        while True:
            self._again = False
            try:
                await self.refresh()
            except Exception:
                log.exception("%s refresh", self.documents.kind)
            if not self._again:
                return

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._refresh_logged()
