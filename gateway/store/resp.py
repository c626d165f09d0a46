"""One Redis connection shared by every concurrent caller, for the read on the hot path.

redis-py's asyncio client spends 130-150 µs of CPU per pipelined round trip on the machines this
was measured on, as much as the rest of a recommendation. Here each call packs its commands with
hiredis, writes them to one socket, and waits for as many replies, which hiredis parses as they
arrive; Redis answers in order, so a FIFO of futures pairs replies with callers. Calls from many
requests interleave on the one socket (pipelining for free) and nobody waits for a pool.

A caller that gives up (a timeout cancels its future) leaves its place in the FIFO, so the replies
that follow still reach the right callers. A lost connection fails every waiting caller; the next
call connects again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import hiredis

# A server that stopped answering would otherwise collect waiting callers without bound.
MAX_WAITING = 10_000


class RespError(Exception):
    """The connection failed, or Redis answered a command with an error."""


class Multiplexed(asyncio.Protocol):
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
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._connecting = asyncio.Lock()

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:
                continue  # a reply nobody asked for cannot happen unless the stream is broken
            future = self._waiting.popleft()
            if future.done():
                continue  # its caller gave up; the reply is dropped, the order is kept
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RespError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = RespError(f"connection lost: {exc or 'closed by the server'}")
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    # -- calls --------------------------------------------------------------------------------------
    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            try:
                if self._path is not None:
                    await loop.create_unix_connection(lambda: self, self._path)
                else:
                    await loop.create_connection(lambda: self, *self._address)
            except OSError as exc:
                raise RespError(f"cannot connect: {exc}") from exc
        for command in self._handshake:
            await self._send([command])[0]

    def _send(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise RespError("not connected")
        if len(self._waiting) > MAX_WAITING:
            transport.abort()  # fails everyone waiting; the next call reconnects
            raise RespError(f"more than {MAX_WAITING} calls waiting: the server is not answering")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        transport.write(
            b"".join(hiredis.pack_command(tuple(c for c in command if c is not None)) for command in commands)
        )
        return futures

    async def execute(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send the commands in one write and return their replies, in order."""
        if self._transport is None or self._transport.is_closing():
            async with self._connecting:
                if self._transport is None or self._transport.is_closing():
                    await self._connect()
        futures = self._send(list(commands))
        try:
            async with asyncio.timeout(self._timeout):
                return [await future for future in futures]
        except TimeoutError:
            raise RespError(f"no answer within {self._timeout}s") from None
        finally:
            for future in futures:
                future.cancel()  # no-op for answered ones; keeps the FIFO order for the rest

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
