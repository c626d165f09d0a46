"""One Redis connection shared by every concurrent caller, for the read on the hot path.

redis-py's asyncio client spends about as much CPU on one pipelined round trip (130-150 µs) as the
rest of a recommendation costs. Here each call packs its commands with
hiredis and queues them; the commands of every call made in one turn of the event loop go out in
one write at the end of that turn (automatic pipelining: under load, one system call on each side
for many requests instead of one each). hiredis parses replies as they arrive; Redis answers in
order, so a FIFO of futures pairs replies with callers.

Timeouts: one timer per connection, not one per call (deadlines are in FIFO order, so only the
oldest matters). When the oldest call is past its deadline the connection is dropped, which fails
every waiting call (the next call connects again): Redis answers in order, so nothing behind an
unanswered command can arrive sooner. Because the event loop runs expired timers before it reads
sockets, a loop that was busy past a deadline would otherwise see a timeout for a reply already
waiting in the socket; so an expired deadline is judged only at the next timer run, one socket
read later (`GRACE_S`), and a loaded gateway does not mistake its own lag for a slow store.

A caller that gives up (its task is cancelled) leaves its place in the FIFO, so the replies that
follow still reach the right callers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import hiredis

# A server that stopped answering would otherwise collect waiting callers without bound.
MAX_WAITING = 10_000
# At least one millisecond after uvloop truncates it, so the timer cannot come due again in the
# same run of timers, before the loop has read its sockets once.
GRACE_S = 0.002


class RespError(Exception):
    """The connection failed, or Redis answered a command with an error."""


class RespTimeoutError(RespError, TimeoutError):
    """Redis did not answer within the timeout."""


class _Link(asyncio.Protocol):
    """One TCP or Unix connection and the calls waiting on it. A new connection is a new _Link, so
    a late `connection_lost` of an old one can never touch the calls of its successor."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (caller, deadline)
        self._unsent: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._judged_at = 0.0  # when the timer last found the oldest call past its deadline

    def set_timeout(self, seconds: float) -> None:
        """For calls sent from now on; the timer moves to the oldest waiting call's deadline."""
        self.timeout = seconds
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting:
            self._timer = asyncio.get_running_loop().call_at(self._waiting[0][1], self._expire)

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:
                continue  # a reply nobody asked for cannot happen unless the stream is broken
            future, _ = self._waiting.popleft()
            if future.done():
                continue  # its caller gave up; the reply is dropped, the order is kept
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RespError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RespError(f"connection lost: {exc or 'closed by the server'}"))

    def fail(self, error: RespError) -> None:
        """Close for good and fail every waiting call with `error`."""
        self.closed = True
        self._unsent.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()  # no-op if already closed

    # -- writes and deadlines ---------------------------------------------------------------------
    def send(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        if not self.usable():
            raise RespError("not connected")
        if len(self._waiting) > MAX_WAITING:
            self.fail(RespError(f"more than {MAX_WAITING} calls waiting: the server is not answering"))
            raise RespError(f"more than {MAX_WAITING} calls waiting: the server is not answering")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend((future, deadline) for future in futures)
        if not self._unsent:
            loop.call_soon(self._flush)
        # None arguments are left out (optional ones); most commands have none, and then a tuple
        # goes to hiredis as it is (a generator per command cost 3-4 µs of every profile read).
        self._unsent.extend(
            hiredis.pack_command(command if None not in command else tuple(c for c in command if c is not None))
            for command in commands
        )
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return futures

    def _flush(self) -> None:
        if self._unsent and self.usable():
            assert self.transport is not None
            self.transport.write(b"".join(self._unsent))
        self._unsent.clear()

    def _expire(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        # The oldest command decides, even if its caller gave up: its reply still comes first.
        deadline = self._waiting[0][1]
        if deadline <= self._judged_at:
            # Past its deadline at the previous timer run, and unanswered after a socket read since.
            self.fail(RespTimeoutError(f"no answer within {self.timeout}s"))
        elif deadline <= now:
            self._judged_at = now
            self._timer = loop.call_later(GRACE_S, self._expire)
        else:
            self._timer = loop.call_at(deadline, self._expire)


class Multiplexed:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        self._address = (host, port)
        self._path = path
        self._handshake: list[tuple[Any, ...]] = []
        if password is not None:
            self._handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._handshake.append(("SELECT", db))
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = _Link(self._timeout)
        async with asyncio.timeout(self._connect_timeout):
            try:
                if self._path is not None:
                    await loop.create_unix_connection(lambda: link, self._path)
                else:
                    await loop.create_connection(lambda: link, *self._address)
            except OSError as exc:
                raise RespError(f"cannot connect: {exc}") from exc
        try:
            for command in self._handshake:
                await link.send([command])[0]
        except RespError as exc:
            link.fail(exc)
            raise
        return link

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = seconds
        if self._link is not None:
            self._link.set_timeout(seconds)

    async def execute(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send the commands in one write and return their replies, in order; RespTimeoutError
        when Redis does not answer within the timeout."""
        link = self._link
        if link is None or not link.usable():
            async with self._connecting:
                link = self._link
                if link is None or not link.usable():
                    link = self._link = await self._connect()
        futures = link.send(list(commands))
        try:
            return [await future for future in futures]
        finally:
            for future in futures:
                future.cancel()  # no-op for answered ones; keeps the FIFO order for the rest

    def close(self) -> None:
        if self._link is not None and self._link.transport is not None:
            self._link.transport.close()
