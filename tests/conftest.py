"""Shared fixtures: a real redis-server for the session, and asyncio as the anyio test backend."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from gateway.store import MemoryStore, RedisStore, Store
from tests.snapshots import build_small
from tests.stores import Elapse


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of our own on a free port, which tests may stop, pause and start again."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Make sure the server runs and answers, on the same port as before; resumes a paused one."""
        if self.process is not None and self.process.poll() is None:
            self.resume()
            return
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                self.executable,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(log)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
                pytest.fail(f"redis-server did not come up on port {self.port}:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers, as with a hung host."""
        assert self.process is not None, "redis-server is not running"
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not on PATH; install redis-server: apt-get install redis-server; .ci/run does it")
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def small_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small synthetic shop (items.jsonl, events.csv, users.csv) the session's snapshot is built from."""
    return tmp_path_factory.mktemp("shop")


@pytest.fixture(scope="session")
def small_snapshots(small_shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shop's snapshot root, built once for the session; treat it as read-only."""
    return build_small(small_shop, tmp_path_factory.mktemp("snapshots"))


@pytest.fixture
def root(small_snapshots: Path, tmp_path: Path) -> Path:
    """A private copy of the small snapshots, so a test may publish or corrupt freely."""
    copy = tmp_path / "snapshots"
    shutil.copytree(small_snapshots, copy)
    return copy


# The stores: both backends (each test that takes `store` runs on each), and the Redis one on its own,
# on the session's redis-server.


@pytest.fixture(params=["memory", "redis", "redis-py"])
async def store(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()  # a fault test that failed half-way must not take the next tests down with it
        backend = RedisStore(server.url, prefix=f"test:{uuid.uuid4().hex}:")
        if request.param == "redis-py":
            backend._fast = None  # the profile read through redis-py, as over TLS (resp.py speaks no TLS)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
def elapse(store: Store) -> Elapse:
    """Let time pass for expiry: Redis expires keys by its own clock, the memory store by the `now` it is given."""

    async def wait(seconds: float) -> None:
        if isinstance(store, RedisStore):
            await anyio.sleep(seconds)

    return wait


@pytest.fixture
async def redis_store(redis_server: RedisServer, anyio_backend: str) -> AsyncIterator[RedisStore]:
    redis_server.start()
    backend = RedisStore(redis_server.url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def raw(redis_server: RedisServer, anyio_backend: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
