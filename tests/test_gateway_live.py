"""The gateway as users run it: `tailor serve` in its own process, on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from gateway.privacy import tokens
from index_builder import snapshot
from tests.conftest import RedisServer, free_port
from tests.snapshots import corrupt, republish
from tests.waiting import wait_until, wait_until_async

REPO = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, root: Path, log: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tailor", "serve", "--snapshots", str(root), "--port", str(self.port), *extra],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    "TAILOR_SECRET_FILE": str(log.parent / "secret"),
                    **os.environ,
                    "TAILOR_WATCH_INTERVAL_S": "0.1",
                    "TAILOR_EVENT_LOG": str(log.parent / "events"),
                },
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"gateway did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server(root: Path, tmp_path: Path) -> Iterator[Server]:
    running = Server(root, tmp_path / "gateway.log")
    yield running
    running.stop()


async def _hammer(url: str, stop: asyncio.Event, outcomes: Counter[str], versions: list[str]) -> None:
    paths = ["/v1/recommend?user=u0001", "/v1/recommend?visitor=nobody", "/v1/items/i00001/similar", "/v1/popular"]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        i = 0
        while not stop.is_set():
            try:
                response = await client.get(paths[i % len(paths)])
                outcomes[str(response.status_code)] += 1
                if response.status_code == 200:
                    versions.append(response.json()["snapshot"])
            except httpx.TransportError as exc:
                outcomes[type(exc).__name__] += 1
            i += 1


def test_snapshot_swaps_under_continuous_load_fail_no_request(server: Server, root: Path) -> None:
    async def scenario() -> tuple[Counter[str], list[str], list[str]]:
        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()
        versions: list[str] = []
        workers = [asyncio.create_task(_hammer(server.url, stop, outcomes, versions)) for _ in range(8)]
        published: list[str] = []
        async with httpx.AsyncClient(base_url=server.url) as admin:

            async def served(version: str, more: int = 50) -> None:
                """Until `version` is served, and then `more` requests have been answered."""
                await wait_until_async(lambda: versions and versions[-1] == version, what=f"{version} served")
                done = sum(outcomes.values())
                await wait_until_async(lambda: sum(outcomes.values()) >= done + more, what=f"{more} requests")

            await wait_until_async(lambda: sum(outcomes.values()) >= 50, what="the load to start")
            published.append(await asyncio.to_thread(republish, root))  # picked up by the watcher
            await served(published[-1])
            published.append(await asyncio.to_thread(republish, root, make_current=False))
            await asyncio.to_thread(snapshot.set_current, root, published[-1])
            assert (await admin.post("/admin/reload")).json()["changed"] in (True, False)
            await served(published[-1])
            # Corrupted before the pointer names it, so the watcher cannot load it while still intact.
            bad = await asyncio.to_thread(republish, root, make_current=False)
            await asyncio.to_thread(corrupt, root / bad)
            await asyncio.to_thread(snapshot.set_current, root, bad)

            async def refused() -> bool:
                return any(bad in p for p in (await admin.get("/readyz")).json()["problems"])

            await wait_until_async(refused, what=f"{bad} refused")
            await served(published[-1])
        stop.set()
        await asyncio.gather(*workers)
        return outcomes, versions, published

    outcomes, versions, published = asyncio.run(scenario())
    assert set(outcomes) == {"200"}, outcomes
    assert sum(outcomes.values()) > 200
    assert published[0] in versions
    assert versions[-1] == published[-1]  # the corrupt one was refused; the last good one serves
    assert "refused" in server.log.read_text()


def documented_curl_lines() -> list[str]:
    """The curl examples of docs/api.md ("Try it"), run as written against a live gateway."""
    text = (REPO / "docs" / "api.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("curl ") and "localhost:8000" in line]
    assert len(lines) >= 8
    return lines


def test_the_documented_curl_examples_work_as_written(server: Server) -> None:
    answers: dict[str, tuple[int, str]] = {}
    for line in documented_curl_lines():
        command = line.replace("localhost:8000", f"127.0.0.1:{server.port}") + " -w '\\n%{http_code}'"
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True)
        body, _, code = result.stdout.rpartition("\n")
        answers[line] = (int(code), body)
    for line, (status, body) in answers.items():
        expected = 400 if "n=0" in line else 202 if "/v1/events" in line else 200
        assert status == expected, (line, status, body)
        if "/metrics" not in line:
            assert body.startswith("{"), (line, body)
    live = next(body for line, (_, body) in answers.items() if "category=fashion,beauty" in line)
    assert '"profile":"live"' in live


def grant_consent(url: str, visitor: str) -> httpx.Response:
    choices = {"analytics": "granted", "personalization": "granted"}
    return httpx.put(f"{url}/v1/consent", json={"visitor": visitor, "choices": choices})


def test_serve_refuses_memory_store_with_several_workers(root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tailor", "serve", "--snapshots", str(root), "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "use a redis:// store" in result.stderr


def test_two_workers_share_one_redis_store(root: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    url = redis_server.url
    running = Server(root, tmp_path / "workers.log", "--workers", "2", "--store", url)
    try:
        assert grant_consent(running.url, "shared").status_code == 200  # stored in Redis: both workers see it
        event = {"events": [{"visitor": "shared", "item": "i00011", "event": "purchase"}]}
        assert httpx.post(f"{running.url}/v1/events", json=event).status_code == 202
        # New connections land on either worker; every answer must know the event.
        kinds = {
            httpx.get(
                f"{running.url}/v1/recommend", params={"visitor": "shared"}, headers={"connection": "close"}
            ).json()["profile"]
            for _ in range(20)
        }
        metrics = httpx.get(f"{running.url}/metrics").text
    finally:
        running.stop()
    assert kinds == {"live"}
    assert 'tailor_request_seconds_count{route="recommend"} 20.0' in metrics


def _listening(port: int) -> int:
    """How many TCP sockets listen on `port` (the kernel's tables, IPv4 and IPv6)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                count += 1
    return count


def _workers_of(pid: int) -> list[int]:
    """The worker processes a `tailor serve --workers N` supervisor started (not multiprocessing's
    resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == pid and b"resource_tracker" not in command:
            found.append(int(entry.name))
    return found


def test_each_worker_listens_on_its_own_socket_and_a_lost_worker_is_replaced(
    root: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A socket per worker (SO_REUSEPORT): the kernel spreads connections across workers, where
    one shared socket let the first worker to wake take them all. A worker that dies is started
    again, and the port keeps answering meanwhile."""
    running = Server(root, tmp_path / "workers.log", "--workers", "2", "--store", redis_server.url)
    try:
        wait_until(lambda: _listening(running.port) == 2, timeout=60, what="two listening sockets")
        first = _workers_of(running.process.pid)
        assert len(first) == 2
        os.kill(first[0], 9)
        wait_until(
            lambda: len(set(_workers_of(running.process.pid)) - set(first)) == 1 and _listening(running.port) == 2,
            timeout=60,
            what="a new worker listening",
        )
        assert httpx.get(f"{running.url}/healthz").status_code == 200
    finally:
        running.stop()
    assert running.process.returncode == 0
    assert "exited with -9; starting another" in running.log.read_text()


def test_an_event_taken_by_one_gateway_is_pushed_by_another(
    root: Path, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `tailor serve` processes on one real Redis: the visitor's socket is on B, the event goes to A."""
    secret = "live-test-secret"
    monkeypatch.setenv("TAILOR_SECRET", secret)  # both nodes, as a deployment would configure them
    node_a = Server(root, tmp_path / "a.log", "--store", redis_server.url)
    node_b = Server(root, tmp_path / "b.log", "--store", redis_server.url)
    try:
        token = tokens.mint(secret.encode(), "roamer", 60)
        assert grant_consent(node_a.url, "roamer").status_code == 200
        with ws_connect(f"ws://127.0.0.1:{node_b.port}/v1/stream?token={token}&n=5", open_timeout=10) as ws:
            hello = json.loads(ws.recv(timeout=10))
            assert hello["cause"] == "connect"
            clicked = hello["recommendations"]["items"][0]["id"]
            event = {"events": [{"visitor": "roamer", "item": clicked, "event": "click"}]}
            assert httpx.post(f"{node_a.url}/v1/events", json=event).status_code == 202
            pushed = json.loads(ws.recv(timeout=10))
            assert (pushed["cause"], pushed["seq"]) == ("events", 2)
            assert clicked not in [item["id"] for item in pushed["recommendations"]["items"]]
            # A token node A minted works on node B: they share the secret.
            grant = httpx.post(f"{node_a.url}/v1/token").json()
            with ws_connect(f"ws://127.0.0.1:{node_b.port}/v1/stream?token={grant['token']}", open_timeout=10) as other:
                assert json.loads(other.recv(timeout=10))["cause"] == "connect"
    finally:
        node_a.stop()
        node_b.stop()


def test_a_dead_client_is_dropped_by_the_heartbeat(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that completed the handshake and then went silent (no pongs, nothing read) is closed
    after the ping timeout, and its stream leaves the gateway's books."""
    monkeypatch.setenv("TAILOR_SECRET", "dead-client-secret")
    monkeypatch.setenv("TAILOR_HEARTBEAT_S", "0.3")
    server = Server(root, tmp_path / "dead.log")
    try:
        token = tokens.mint(b"dead-client-secret", "ghost", 60)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            handshake = [
                f"GET /v1/stream?token={token} HTTP/1.1",
                f"Host: 127.0.0.1:{server.port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ]
            raw.sendall(("\r\n".join(handshake) + "\r\n\r\n").encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 101")
            assert _streams_open(server) == 1.0
            # ping timeout 0.3 s after the first unanswered ping at 0.3 s
            wait_until(lambda: _streams_open(server) == 0.0, interval=0.1, what="the silent stream to be dropped")
    finally:
        server.stop()


def _streams_open(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("tailor_streams_open "):
            return float(line.split()[1])
    raise AssertionError("no tailor_streams_open in /metrics")


def test_an_erasure_on_one_gateway_closes_the_visitors_sockets_on_another(
    root: Path, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `tailor serve` processes on one real Redis: the visitor's sockets are on B, the erasure goes to A."""
    secret = "erasure-test-secret"
    monkeypatch.setenv("TAILOR_SECRET", secret)
    node_a = Server(root, tmp_path / "a.log", "--store", redis_server.url)
    node_b = Server(root, tmp_path / "b.log", "--store", redis_server.url)
    try:
        token = tokens.mint(secret.encode(), "leaving", 60)
        url = f"ws://127.0.0.1:{node_b.port}/v1/stream?token={token}"
        with ws_connect(url, open_timeout=10) as first, ws_connect(url, open_timeout=10) as second:
            for ws in (first, second):
                assert json.loads(ws.recv(timeout=10))["cause"] == "connect"
            receipt = httpx.delete(f"{node_a.url}/v1/visitors/leaving", timeout=10).json()
            assert receipt["streams_closed"] == 2
            for ws in (first, second):
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
    finally:
        node_a.stop()
        node_b.stop()
