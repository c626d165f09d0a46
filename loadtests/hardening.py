"""A fault and abuse run against real gateways: what a busy shop and an attacker do, and what comes out.

Each case starts its own `tailor serve` (memory store, or two nodes on a throwaway redis-server) on a
small synthetic shop, does one thing a real client would, and reports counts, not impressions:

    events      one batch of 500 visitors, then 16 concurrent batches of 40, then the first again:
                accepted and stored (memory and Redis), and the retry's duplicates
    timers      400 visitors' abandoned carts whose trigger timers are due at once (Redis): messages fired
    logs        keys and tokens in query strings and headers, HTTP and WebSocket, at log level debug with
                the access log on: how often a key, token, token part or raw visitor id is in the log
    nesting     5,000-level JSON to /v1/events, PUT /admin/rules, /admin/rules/preview: the statuses
    erasure     a visitor's two sockets on node B, the erasure on node A (Redis): the receipt and the closes
    memory      100,000 visitors of 20 events into the default memory store: resident growth, visitors held
    slow        1,000 connections that never finish their request headers: how many are open after the
                header timeout, and whether /healthz still answers meanwhile
    startup     a first start with an empty numba cache, then `tailor warm` and a start after it: time to
                /readyz 200 and what the gateway printed meanwhile

    .venv/bin/python loadtests/hardening.py                # every case
    .venv/bin/python loadtests/hardening.py events nesting # some

Results go to var/bench/hardening.json (`--out`); a summary line per case is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
from redis import Redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from gateway.settings import Settings
from loadtests.harness import ROOT, free_port, running, say, store_url, wait_ready

SECRET = "hardening-run-secret"
PUBLIC_KEY, ADMIN_KEY = "pk_hardening_PUBLIC_0123456789", "ak_hardening_ADMIN_9876543210"
CART = {
    "id": "cart",
    "on": "add_to_cart",
    "unless": "purchase",
    "wait": "1s",
    "message": {"title": "Still thinking it over?"},
}
Case = Callable[["Run"], dict[str, Any]]


class Run:
    """The shared parts of a run: the shop's snapshot, a scratch directory, the redis-server binary."""

    def __init__(self, work: Path, redis_server: str) -> None:
        self.work = work
        self.redis_server = redis_server
        self.snapshots = work / "snapshots"
        if not (self.snapshots / "CURRENT").exists():
            shop = work / "shop"
            tailor = [sys.executable, "-m", "tailor"]
            say("making a small shop and its snapshot")
            synth = [*tailor, "synth", "--out", str(shop), "--users", "300", "--items", "400", "--events", "15000"]
            subprocess.run([*synth, "--seed", "3"], check=True, cwd=ROOT, capture_output=True)
            build = [*tailor, "build", "--events", str(shop / "events.csv"), "--items", str(shop / "items.jsonl")]
            subprocess.run([*build, "--out", str(self.snapshots), "--quiet"], check=True, cwd=ROOT, capture_output=True)
        self.items = [json.loads(line)["item_id"] for line in (work / "shop" / "items.jsonl").open()][:50]

    @contextlib.contextmanager
    def gateway(
        self, name: str, store: str = "memory://", env: dict[str, str] | None = None
    ) -> Iterator[tuple[str, Path]]:
        """`tailor serve` on a free port with `env` on top of the harness's; its base URL and log."""
        port = free_port()
        directory = self.work / f"{name}-{uuid.uuid4().hex[:6]}"
        directory.mkdir()
        log = directory / "serve.log"
        command = [sys.executable, "-m", "tailor", "serve", "--snapshots", str(self.snapshots), "--store", store]
        command += ["--port", str(port)]
        environment = {"TAILOR_SECRET": SECRET, **(env or {})}
        with running(command, log, f"tailor serve ({name})", environment) as server:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as client:
                wait_ready(client, server, log, 180)
            yield base, log

    @contextlib.contextmanager
    def redis(self) -> Iterator[str]:
        with contextlib.ExitStack() as stack:
            yield store_url(stack, "redis", self.work, self.redis_server)


def _events(visitors: list[str], tag: str, items: list[str], event: str = "view") -> dict[str, Any]:
    batch = [
        {"visitor": v, "event": event, "item": items[n % len(items)], "id": f"{tag}-{v}", "ts": time.time() - 600}
        for n, v in enumerate(visitors)
    ]
    return {"events": batch}


def _metric(base: str, name: str, headers: dict[str, str] | None = None) -> float:
    total = 0.0
    for line in httpx.get(f"{base}/metrics", headers=headers).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def events(run: Run) -> dict[str, Any]:
    result: dict[str, Any] = {}
    one = [f"solo-{n:03d}" for n in range(500)]
    groups = [[f"group{g:02d}-{n:02d}" for n in range(40)] for g in range(16)]
    for store in ("memory", "redis"):
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(run.redis()) if store == "redis" else "memory://"
            base, _ = stack.enter_context(run.gateway(f"events-{store}", url))
            first = httpx.post(f"{base}/v1/events", json=_events(one, "a", run.items), timeout=60)

            async def concurrent(base: str) -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                    posts = (client.post("/v1/events", json=_events(g, "b", run.items)) for g in groups)
                    return await asyncio.gather(*posts)

            batches = asyncio.run(concurrent(base))
            retry = httpx.post(f"{base}/v1/events", json=_events(one, "a", run.items), timeout=60)
            if store == "redis":
                redis = Redis.from_url(url)
                stored = sum(1 for _ in redis.scan_iter("tailor:v:*:recent", count=1000))
                redis.close()
            else:
                stored = int(_metric(base, "tailor_store_visitors"))
            result[store] = {
                "batch_500": {"status": first.status_code, "accepted": first.json().get("accepted")},
                "batches_16x40": {
                    "statuses": sorted({r.status_code for r in batches}),
                    "accepted": sum(r.json().get("accepted", 0) for r in batches),
                },
                "visitors_stored": stored,
                "retry_500": {"status": retry.status_code, "duplicates": retry.json().get("duplicates")},
            }
    memory, redis_ = result["memory"], result["redis"]
    result["summary"] = (
        f"memory: 500 -> {memory['batch_500']['accepted']}, 16x40 -> {memory['batches_16x40']['accepted']}, "
        f"stored {memory['visitors_stored']}/1140; redis: 500 -> {redis_['batch_500']['accepted']} "
        f"({redis_['batch_500']['status']}), 16x40 -> {redis_['batches_16x40']['accepted']} "
        f"{redis_['batches_16x40']['statuses']}, stored {redis_['visitors_stored']}/1140, "
        f"retry duplicates {redis_['retry_500']['duplicates']}/500"
    )
    return result


def timers(run: Run) -> dict[str, Any]:
    carts = [f"cart-{n:03d}" for n in range(400)]
    with run.redis() as url, run.gateway("timers", url, {"TAILOR_TRIGGER_POLL_S": "0.2"}) as (base, _):
        stored = httpx.put(f"{base}/admin/rules", json={"rules": [], "triggers": [CART]})
        version = stored.json()["version"]
        httpx.post(f"{base}/admin/rules/{version}/activate").raise_for_status()
        posted = httpx.post(f"{base}/v1/events", json=_events(carts, "c", run.items, "add_to_cart"), timeout=60)
        deadline = time.monotonic() + 60
        fired = 0.0
        while time.monotonic() < deadline:
            fired = _metric(base, 'tailor_trigger_fired_total{trigger="cart"}')
            if fired >= len(carts):
                break
            time.sleep(0.2)
        redis = Redis.from_url(url)
        pending = redis.zcard("tailor:timers")
        redis.close()
    return {
        "events": posted.json().get("accepted"),
        "fired": int(fired),
        "pending": pending,
        "summary": f"{int(fired)} of {len(carts)} due timers fired, {pending} pending",
    }


def logs(run: Run) -> dict[str, Any]:
    env = {
        "TAILOR_PUBLIC_KEYS": PUBLIC_KEY,
        "TAILOR_ADMIN_KEYS": ADMIN_KEY,
        "TAILOR_LOG_LEVEL": "debug",
        "TAILOR_ACCESS_LOG": "true",
    }
    visitor = "alice@shop.example"
    with run.gateway("logs", env=env) as (base, log):
        port = base.rsplit(":", 1)[1]
        grant = httpx.post(f"{base}/v1/token", params={"key": ADMIN_KEY}, json={"visitor": visitor}).json()
        token = grant["token"]
        for query in (f"token={token}&key={PUBLIC_KEY}", f"token={token}"):
            with ws_connect(
                f"ws://127.0.0.1:{port}/v1/stream?{query}", additional_headers={"X-Tailor-Key": PUBLIC_KEY}
            ) as ws:
                ws.recv(timeout=10)
        anon = httpx.post(f"{base}/v1/token", params={"key": PUBLIC_KEY}).json()
        httpx.post(f"{base}/v1/token", headers={"X-Tailor-Key": PUBLIC_KEY}, json={"token": anon["token"]})
        httpx.get(f"{base}/v1/recommend", params={"user": visitor, "key": ADMIN_KEY})
        httpx.get(f"{base}/v1/recommend", headers={"X-Tailor-Token": token, "X-Tailor-Key": PUBLIC_KEY})
        httpx.get(f"{base}/v1/visitors/{visitor}/export", headers={"X-Tailor-Key": ADMIN_KEY})
        httpx.get(f"{base}/metrics", params={"key": ADMIN_KEY})
    text = log.read_text(errors="replace")
    needles = {
        "public key": PUBLIC_KEY,
        "admin key": ADMIN_KEY,
        "secret": SECRET,
        "token": token,
        "anonymous token": anon["token"],
        "visitor id": visitor,
        "visitor id, url-encoded": visitor.replace("@", "%40"),
        "anonymous visitor id": anon["visitor"],
        **{f"token part {n}": part for n, part in enumerate(token.split(".")) if len(part) > 6},
    }
    found = {name: text.count(needle) for name, needle in needles.items()}
    total = sum(found.values())
    return {
        "log_lines": len(text.splitlines()),
        "found": found,
        "summary": f"{total} secrets or raw ids in {len(text.splitlines())} log lines",
    }


def nesting(run: Run) -> dict[str, Any]:
    deep = b"[" * 5000 + b"]" * 5000
    deep_event = b'{"events": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    deep_rule = b'{"rules": [{"id": "r", "when": ' + b'{"not": ' * 5000 + b'{"device": "mobile"}' + b"}" * 5000 + b"}]}"
    with run.gateway("nesting") as (base, _):
        cases = {
            "POST /v1/events (array)": ("POST", "/v1/events", deep),
            "POST /v1/events (inside events)": ("POST", "/v1/events", deep_event),
            "PUT /admin/rules (array)": ("PUT", "/admin/rules", deep),
            "PUT /admin/rules (a condition)": ("PUT", "/admin/rules", deep_rule),
            "POST /admin/rules/preview (array)": ("POST", "/admin/rules/preview", deep),
        }
        statuses = {}
        for name, (method, path, body) in cases.items():
            answer = httpx.request(method, f"{base}{path}", content=body, headers={"content-type": "application/json"})
            statuses[name] = (answer.status_code, answer.json()["error"]["code"])
    codes = sorted({status for status, _ in statuses.values()})
    return {"statuses": statuses, "summary": f"statuses {codes} over {len(statuses)} bodies"}


def erasure(run: Run) -> dict[str, Any]:
    with run.redis() as url, run.gateway("node-a", url) as (node_a, _), run.gateway("node-b", url) as (node_b, _):
        token = httpx.post(f"{node_a}/v1/token", json={"visitor": "leaving"}).json()["token"]
        socket_url = node_b.replace("http", "ws") + f"/v1/stream?token={token}"
        with ws_connect(socket_url) as first, ws_connect(socket_url) as second:
            for ws in (first, second):
                ws.recv(timeout=10)
            receipt = httpx.delete(f"{node_a}/v1/visitors/leaving").json()
            codes: list[int | str | None] = []
            for ws in (first, second):
                try:
                    ws.recv(timeout=10)
                    codes.append("a message, not a close")
                except TimeoutError:
                    codes.append("still open after 10 s")
                except ConnectionClosed as closed:
                    codes.append(closed.rcvd.code if closed.rcvd is not None else None)
    return {
        "streams_closed": receipt["streams_closed"],
        "close_codes": codes,
        "summary": f"receipt on A says {receipt['streams_closed']} closed; B's sockets closed with {codes}",
    }


def _fill(results: multiprocessing.Queue[dict[str, Any]]) -> None:
    from gateway.store import MemoryStore, Recorded, Retention  # noqa: PLC0415 - in the child only

    def resident_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    store, retention = MemoryStore(), Retention()
    events = [
        Recorded("view", 1.7e9 + n * 60, item=f"item-{n % 12}", categories=(f"category-{n % 3}",)) for n in range(20)
    ]
    before = resident_mb()

    async def fill() -> None:
        for v in range(100_000):
            batch = [Recorded(e.event, e.ts, e.item, f"{v}-{n}", e.categories) for n, e in enumerate(events)]
            await store.record(f"visitor-{v:08d}", batch, retention=retention, now=1.7e9 + 3600)

    asyncio.run(fill())
    results.put(
        {
            "written": 100_000,
            "held": len(store),
            "estimate_mb": round(store.bytes / 2**20),
            "resident_growth_mb": round(resident_mb() - before),
            "budget_mb": store.max_mb,
        }
    )


def memory(run: Run) -> dict[str, Any]:
    results: multiprocessing.Queue[dict[str, Any]] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_fill, args=(results,))
    child.start()
    figures = results.get()
    child.join()
    figures["summary"] = (
        f"{figures['written']:,} visitors written, {figures['held']:,} held, resident growth "
        f"{figures['resident_growth_mb']} MB (budget {figures['budget_mb']:g} MB)"
    )
    return figures


def slow(run: Run) -> dict[str, Any]:
    count, timeout = 1000, Settings().header_timeout_s
    with run.gateway("slow") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        watch = selectors.DefaultSelector()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /v1/popular HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
            watch.register(sock, selectors.EVENT_READ)
        started = time.monotonic()
        open_ = count
        healthy = 0
        while time.monotonic() - started < timeout + 2:
            healthy += httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            for key, _ in watch.select(0.5):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    if conn.recv(4096):
                        continue  # an answer before the close: the end of the stream comes next
                except BlockingIOError:
                    continue
                except ConnectionError:
                    pass
                watch.unregister(conn)
                conn.close()
                open_ -= 1
        for key in list(watch.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        watch.close()
    return {
        "connections": count,
        "open_after_s": round(timeout + 2, 1),
        "still_open": open_,
        "healthz_ok_meanwhile": healthy,
        "summary": f"{open_} of {count} slow connections open after {timeout + 2:.0f} s; /healthz 200 x{healthy}",
    }


def _start(run: Run, cache: Path) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "TAILOR_SECRET": SECRET, "TAILOR_EVENT_LOG": ""}
    command = [sys.executable, "-m", "tailor", "serve", "--snapshots", str(run.snapshots), "--port", str(port)]
    started = time.monotonic()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    selector = selectors.DefaultSelector()
    assert server.stdout is not None
    os.set_blocking(server.stdout.fileno(), False)
    selector.register(server.stdout, selectors.EVENT_READ)
    ready = None
    while time.monotonic() - started < 300 and server.poll() is None:
        for _ in selector.select(0.1):
            for line in server.stdout.read().splitlines():
                lines.append((round(time.monotonic() - started, 1), line[:160]))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                ready = round(time.monotonic() - started, 1)
                break
        except httpx.TransportError:
            pass
    server.terminate()
    server.wait(30)
    silent = max((b - a for (a, _), (b, _) in itertools.pairwise(lines)), default=0.0)
    return {"ready_s": ready, "longest_silence_s": round(silent, 1), "output": lines}


def startup(run: Run) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tailor-numba-") as empty:
        cold = _start(run, Path(empty))
    with tempfile.TemporaryDirectory(prefix="tailor-numba-") as warmed:
        env = {**os.environ, "NUMBA_CACHE_DIR": warmed}
        began = time.monotonic()
        command = [sys.executable, "-m", "tailor", "warm", "--snapshots", str(run.snapshots)]
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        warm_s = round(time.monotonic() - began, 1)
        warm = _start(run, Path(warmed))
    return {
        "cold": cold,
        "tailor_warm_s": warm_s,
        "after_warm": warm,
        "summary": f"cold start ready in {cold['ready_s']} s (longest silence {cold['longest_silence_s']} s); "
        f"`tailor warm` {warm_s} s, then ready in {warm['ready_s']} s",
    }


CASES: dict[str, Case] = {
    "events": events,
    "timers": timers,
    "logs": logs,
    "nesting": nesting,
    "erasure": erasure,
    "memory": memory,
    "slow": slow,
    "startup": startup,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"cases to run, of {', '.join(CASES)} (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench" / "hardening.json")
    parser.add_argument("--redis-server", default="redis-server")
    args = parser.parse_args()
    chosen = args.cases or list(CASES)
    unknown = [name for name in chosen if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tailor-hardening-") as scratch:
        run = Run(Path(scratch), args.redis_server)
        for name in chosen:
            say(f"case {name}")
            results[name] = CASES[name](run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name in chosen:
        print(f"{name:8s} {results[name]['summary']}")


if __name__ == "__main__":
    main()
