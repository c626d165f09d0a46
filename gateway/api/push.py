"""WS /v1/stream: live recommendations pushed to the visitor's open sockets.

Each socket belongs to one visitor (its token says which) and has a bounded queue of messages and a
task of its own that sends them, so a slow or dead client only ever fills its own queue: when that
is full the socket is closed (4429 too-slow) and the others never wait for it.

A visitor's events (taken by this process, or by another one sharing the Redis store, which
announces them on a channel) call `changed(visitor)`. The first call arms a timer of
`debounce_s`; when it fires the visitor's answer is computed once per socket and pushed if the
list (items and reasons, in order) differs from what that socket last received, so a burst of
events gives one push and an event that changes nothing gives none. A snapshot swap recomputes every
connected visitor, a few at a time. On connect (and so on every reconnect) the socket first gets the
current list.

Messages (JSON text frames, server to client):

    {"type": "recommendations", "cause": "connect" | "events" | "snapshot" | "catalog", "seq": 1,
     "recommendations": {...}}
    {"type": "message", "trigger": "cart-abandon", "version": 3, "message": {...}, "id": "...", "at": 1763800000.0}
    {"type": "ping", "ts": 1763800000.0}

`recommendations` is the body of GET /v1/recommend; `seq` counts the socket's pushes. A `message` is
a trigger's (gateway.rules.triggers.Delivered), sent as the store announces it (`deliver`), on every open
socket of its visitor. A ping goes out after 3/4 to all of `heartbeat_s` without other messages
(jittered), so a browser can tell a quiet socket from a dead one. A catalog change that stops
serving items (gateway.catalog) recomputes the sockets whose last list held one (cause "catalog").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Literal

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gateway.tasks import stop as stop_task

log = logging.getLogger("tailor.stream")

Cause = Literal["connect", "events", "snapshot", "catalog"]
# A socket's answer, from (visitor, user, n, categories): a key that changes when the list does,
# the encoded answer and the ids of its items. `visitor` is what the hub knows the socket by (the store's name for the
# visitor, which `changed` announces); `user`, the id the socket's token names.
Answer = Callable[[str, str, int | None, list[str]], Awaitable[tuple[Hashable, bytes, frozenset[str]]]]

TOO_SLOW = 4429
ERASED = 4410
GOING_AWAY = 1001
OVERLOADED = 1013
SEND_TIMEOUT_S = 10.0
SWAP_BATCH = 50  # sockets recomputed between yields to the event loop after a snapshot swap


class RecommendationsMessage(msgspec.Struct, frozen=True, tag_field="type", tag="recommendations"):
    cause: Cause
    seq: int
    recommendations: msgspec.Raw


class PingMessage(msgspec.Struct, frozen=True, tag_field="type", tag="ping"):
    ts: float


_encode = msgspec.json.Encoder().encode


class Subscriber:
    """One open socket."""

    __slots__ = ("categories", "closing", "items", "last_key", "n", "queue", "seq", "user", "visitor", "websocket")

    def __init__(
        self, websocket: WebSocket, visitor: str, *, user: str, n: int | None, categories: list[str], size: int
    ) -> None:
        self.websocket = websocket
        self.visitor = visitor
        self.user = user
        self.n = n
        self.categories = categories
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(size)
        self.last_key: Hashable = None
        self.items: frozenset[str] = frozenset()  # the ids in the last list sent
        self.seq = 0
        self.closing = False


class Hub:
    def __init__(
        self,
        answer: Answer,
        *,
        debounce_s: float,
        queue_size: int,
        heartbeat_s: float,
        max_streams: int,
        on_push: Callable[[Cause], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self._answer = answer
        self.debounce_s = debounce_s
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.max_streams = max_streams
        self._on_push = on_push
        self._on_drop = on_drop
        self._on_count = on_count
        self._by_visitor: dict[str, set[Subscriber]] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.open = 0

    def __contains__(self, visitor: str) -> bool:
        return visitor in self._by_visitor

    # -- one socket ------------------------------------------------------------------------------
    async def serve(
        self, websocket: WebSocket, visitor: str, *, n: int | None, categories: list[str], user: str | None = None
    ) -> None:
        """Run one accepted socket until either side closes it. `user` defaults to `visitor`."""
        if self.open >= self.max_streams:
            await websocket.close(OVERLOADED, "too many open streams; retry later")
            return
        sub = Subscriber(
            websocket, visitor, user=visitor if user is None else user, n=n, categories=categories, size=self.queue_size
        )
        self.open += 1
        if self._on_count is not None:
            self._on_count(self.open)
        self._by_visitor.setdefault(visitor, set()).add(sub)
        sender = asyncio.create_task(self._send_loop(sub), name=f"stream-send-{visitor}")
        try:
            await self._refresh(sub, "connect")
            while True:  # the client has nothing to say; reading notices when it goes
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except WebSocketDisconnect:
            pass
        finally:
            self._remove(sub)
            await stop_task(sender)

    def _remove(self, sub: Subscriber) -> None:
        subs = self._by_visitor.get(sub.visitor)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self.open -= 1
            if self._on_count is not None:
                self._on_count(self.open)
            if not subs:
                del self._by_visitor[sub.visitor]

    async def _send_loop(self, sub: Subscriber) -> None:
        websocket = sub.websocket
        try:
            while True:
                try:
                    # Jittered, so sockets opened together (say, every page after a deploy) do not
                    # all ping at once ever after: thousands of pings in one burst delay real pushes.
                    quiet = self.heartbeat_s * (0.75 + 0.25 * random.random())
                    message = await asyncio.wait_for(sub.queue.get(), quiet)
                except TimeoutError:
                    message = _encode(PingMessage(round(time.time(), 3)))
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await websocket.send_text(message.decode())
        except (WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            # gone, or not taking data: closing makes its reader loop (and so serve()) end
            await self._close(sub, TOO_SLOW, "too-slow")

    async def _close(self, sub: Subscriber, code: int, reason: str) -> None:
        if sub.closing:
            return
        sub.closing = True
        self._remove(sub)
        if self._on_drop is not None:
            self._on_drop(reason)
        if sub.websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await sub.websocket.close(code, reason)

    def _enqueue(self, sub: Subscriber, message: bytes) -> None:
        try:
            sub.queue.put_nowait(message)
        except asyncio.QueueFull:
            log.info("dropping a stream of %s: %d messages waiting", sub.visitor, sub.queue.qsize())
            self._spawn(self._close(sub, TOO_SLOW, "too-slow"))

    async def _refresh(self, sub: Subscriber, cause: Cause) -> None:
        key, body, items = await self._answer(sub.visitor, sub.user, sub.n, sub.categories)
        if sub.closing or (cause != "connect" and key == sub.last_key):
            return
        sub.last_key, sub.items = key, items
        sub.seq += 1
        self._enqueue(sub, _encode(RecommendationsMessage(cause, sub.seq, msgspec.Raw(body))))
        if self._on_push is not None:
            self._on_push(cause)

    # -- changes ---------------------------------------------------------------------------------
    def changed(self, visitor: str) -> None:
        """The visitor's profile changed: push them a new list soon, if they are connected here."""
        if visitor not in self._by_visitor or visitor in self._pending:
            return
        self._pending.add(visitor)
        self._spawn(self._push_later(visitor))

    async def _push_later(self, visitor: str) -> None:
        await asyncio.sleep(self.debounce_s)
        self._pending.discard(visitor)
        for sub in list(self._by_visitor.get(visitor, ())):
            try:
                await self._refresh(sub, "events")
            except Exception:
                log.exception("stream push to %s", visitor)

    def deliver(self, visitor: str, frame: bytes) -> None:
        """Send an encoded message frame to every socket of the visitor connected here (if any)."""
        for sub in list(self._by_visitor.get(visitor, ())):
            if not sub.closing:
                self._enqueue(sub, frame)

    async def disconnect(self, visitor: str, *, code: int = ERASED, reason: str = "erased") -> int:
        """Close every socket of the visitor (say, after an erasure); how many there were."""
        subs = list(self._by_visitor.get(visitor, ()))
        for sub in subs:
            await self._close(sub, code, reason)
        return len(subs)

    def snapshot_swapped(self) -> None:
        """Recompute every connected visitor on the new snapshot, a batch at a time."""
        if self._by_visitor:
            self._spawn(self._push_all("snapshot"))

    def withdrawn(self, items: frozenset[str]) -> None:
        """Items stopped being served (retired, unavailable, out of stock): recompute the sockets
        whose last list held one of them, a batch at a time."""
        held = [sub for subs in self._by_visitor.values() for sub in subs if not sub.items.isdisjoint(items)]
        if held:
            self._spawn(self._push_all("catalog", held))

    async def _push_all(self, cause: Cause, subs: list[Subscriber] | None = None) -> None:
        every = [sub for subs in self._by_visitor.values() for sub in subs] if subs is None else subs
        for number, sub in enumerate(every):
            if number and number % SWAP_BATCH == 0:
                await asyncio.sleep(0)
            try:
                await self._refresh(sub, cause)
            except Exception:
                log.exception("stream push to %s", sub.visitor)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every socket (the server is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        for sub in [sub for subs in self._by_visitor.values() for sub in subs]:
            await self._close(sub, GOING_AWAY, "server stopping")
