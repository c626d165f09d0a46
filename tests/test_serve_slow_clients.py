"""`tailor serve` on a real socket against clients that never finish their request headers."""

from __future__ import annotations

import json
import selectors
import socket
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from websockets.sync.client import connect as ws_connect

from gateway.privacy import tokens
from tests.test_gateway_live import Server

SLOW = 50
DEADLINE_S = 30.0  # generous: the server is told to close them after 1 s


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_connections_that_never_finish_their_headers_are_closed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAILOR_HEADER_TIMEOUT_S", "1")
    monkeypatch.setenv("TAILOR_SECRET", "slow-client-secret")
    server = Server(root, tmp_path / "gateway.log")
    address = ("127.0.0.1", server.port)
    slow: list[socket.socket] = []
    try:
        token = tokens.mint(b"slow-client-secret", "patient", 60)
        with ws_connect(f"ws://127.0.0.1:{server.port}/v1/stream?token={token}", open_timeout=10) as stream:
            assert json.loads(stream.recv(timeout=10))["cause"] == "connect"
            for i in range(SLOW):
                sock = socket.create_connection(address, timeout=5)
                if i % 10:  # and every tenth sends nothing at all
                    sock.sendall(b"GET /v1/popular HTTP/1.1\r\nHost: x\r\n")
                slow.append(sock)
            # A kept-alive connection whose second request stops half-way.
            kept = socket.create_connection(address, timeout=5)
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow.append(kept)
            for sock in slow:
                sock.setblocking(False)

            open_ = set(slow)
            # epoll, not select(): a test process deep into the suite holds descriptors past select's 1024.
            watch = selectors.DefaultSelector()
            for sock in slow:
                watch.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + DEADLINE_S
            while open_ and time.monotonic() < deadline:
                assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # others are served
                for ready, _ in watch.select(0.2):
                    conn = ready.fileobj
                    assert isinstance(conn, socket.socket)
                    if _closed(conn):
                        open_.discard(conn)
                        watch.unregister(conn)
            watch.close()
            assert not open_, f"{len(open_)} of {len(slow)} slow connections still open after {DEADLINE_S} s"

            # The deadline is on headers only: a socket that finished its handshake stays.
            assert stream.ping().wait(timeout=10)
            assert httpx.get(f"{server.url}/v1/popular", timeout=5).status_code == 200
    finally:
        for sock in slow:
            sock.close()
        server.stop()
