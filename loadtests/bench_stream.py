"""Event ingestion throughput and WebSocket push (memory per socket, event-to-push latency), in one run.

Two parts, each against its own `tailor serve --workers 1` on a free loopback port, serving the snapshot
that was current when the run began through a private root (as bench_gateway.py does):

    ingest   For each store (memory, then Redis on its own throwaway redis-server), wrk POSTs
             pre-built batches of 20 events (view/click/add_to_cart of real items) to /v1/events
             (loadtests/wrk/paths.lua with post=/v1/events), for a fixed time: requests/s, events/s
             (= requests/s x 20), latency.
             Each batch is one visitor's; the batches cycle through 50,000 visitors (--visitors).
    push     For each client count (1,000 then 5,000), a fresh gateway (memory store, started with
             TAILOR_SECRET) gets that many WebSocket clients on /v1/stream, all in this process (one
             asyncio loop on uvloop), connected 200 handshakes at a time. The gateway's resident memory
             (VmRSS) before and after, with the clients idle, gives MB per 1,000 sockets. Then 2,000
             events (--events) at a steady 150/s (--event-rate): each a click on the first item of one
             connected visitor's current list (so the list must change), POSTed to /v1/events; the
             latency is from just before the POST until that visitor's next `cause: "events"` message.
             Every POSTed event must bring exactly one push within 5 s (--push-timeout): missing, late
             and extra pushes, and connections the server closed, are counted as failures.

Before each push run a probe checks the protocol on single connections: a bad and an expired token
must be closed with code 4401, and one visitor goes through connect -> click -> push.

    .venv/bin/python loadtests/bench_stream.py                  # reuses var/bench/snapshots if present
    .venv/bin/python loadtests/bench_stream.py --skip-stream --duration 5
    .venv/bin/python loadtests/bench_stream.py --skip-ingest --clients 1000 --events 500

Without a snapshot in var/bench/snapshots it makes a small demo shop (5,000 items) with `tailor synth`
and `tailor build` under var/bench/stream-demo/ first. Results go to var/bench/stream.json; a compact
table is printed at the end. The clients, wrk and the server share the two cores: the table shows the
CPU share of the server and of this client process, and a client near 100% means its own numbers
(latency above all) are partly the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import secrets
import shutil
import signal
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx2 as httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from gateway.tokens import mint
from loadtests.bench_gateway import code_version, ensure_snapshot, new_run_dir, pin_snapshot
from loadtests.exact import Snapshot
from loadtests.harness import (
    ROOT,
    add_gateway_options,
    cpu_seconds,
    footer,
    free_port,
    load_average,
    run_wrk,
    running,
    say,
    serve_command,
    start_gateway,
    wait_ready,
)
from loadtests.traffic import counter_delta, gateway_counters

STORES = ("memory", "redis")
EVENT_TYPES = ("view", "click", "add_to_cart")
CAUSES = ("connect", "events", "snapshot")
SECRET_ENV = "TAILOR_SECRET"
CLOSE_UNAUTHORIZED = 4401
TOKEN_TTL_S = 3600
MAX_PROBLEMS = 20
# the small shop made when no snapshot exists yet (var/bench/stream-demo/)
DEMO_SIZES = {"users": 2_000, "items": 5_000, "events": 100_000}

Json = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- data


def resolve_snapshots(args: argparse.Namespace) -> Json:
    """Point args.snapshots_dir at a snapshot root with a CURRENT pointer, making a small one if needed."""
    if args.snapshots_dir is not None:
        if not (args.snapshots_dir / "CURRENT").is_file():
            raise SystemExit(f"{args.snapshots_dir} has no CURRENT pointer (omit --snapshots-dir to make a demo)")
        return {"made": False, "root": str(args.snapshots_dir)}
    default = args.bench_dir / "snapshots"
    if (default / "CURRENT").is_file():
        args.snapshots_dir = default
        return {"made": False, "root": str(default)}
    demo = args.bench_dir / "stream-demo"
    say(f"no snapshot in {default}: making or reusing a small demo shop in {demo}")
    build_args = argparse.Namespace(
        bench_dir=demo,
        shop_dir=demo / "shop",
        snapshots_dir=demo / "snapshots",
        rebuild=False,
        skip_build=False,
        seed=args.seed,
        max_trials=1,
        **DEMO_SIZES,
    )
    info = ensure_snapshot(build_args)
    args.snapshots_dir = build_args.snapshots_dir
    return {"made": True, "root": str(args.snapshots_dir), "demo": info}


def write_bodies(snap: Snapshot, args: argparse.Namespace, path: Path) -> int:
    """One POST body per line: visitor k's batch of `args.batch` events on real items, mostly popular
    items of one category, for k = 0 .. visitors-1 (wrk goes round the file, so round the visitors)."""
    rng = random.Random(args.seed)
    categories = [c for c in snap.popular if c] or [""]
    with path.open("wb") as out:
        for number in range(args.visitors):
            pool = snap.popular[rng.choice(categories)] or snap.popular[""]
            rows = [
                rng.choice(pool) if rng.random() < 2 / 3 else rng.randrange(len(snap.item_ids))
                for _ in range(args.batch)
            ]
            visitor = f"bench-v{number}"
            events = [
                {"visitor": visitor, "item": snap.item_ids[row], "event": rng.choice(EVENT_TYPES)} for row in rows
            ]
            out.write(orjson.dumps({"events": events}) + b"\n")
    return int(args.visitors)


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(values: Iterable[float]) -> Json:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"count": len(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 2)}


# ------------------------------------------------------------------------------------------ ingest


def run_post_wrk(url: str, bodies: Path, *, duration: float, args: argparse.Namespace, server_pid: int) -> Json:
    """wrk POSTing the bodies to /v1/events for `duration` seconds; its JSON line plus events/s."""
    result = run_wrk(
        url,
        bodies,
        duration=duration,
        connections=args.connections,
        threads=args.threads,
        server_pid=server_pid,
        post="/v1/events",
    )
    result["events_per_s"] = round(result["rate"] * args.batch, 1)
    return result


def events_accepted(counters: dict[str, float]) -> float:
    return sum(v for k, v in counters.items() if k.startswith("tailor_events_accepted_total"))


def bench_ingest(store: str, bodies: Path, args: argparse.Namespace) -> Json:
    work = args.run_dir / f"ingest-{store}"
    work.mkdir(parents=True, exist_ok=True)
    result: Json = {"store": store}
    with contextlib.ExitStack() as stack:
        server, base, client, log, result["ready_seconds"] = start_gateway(stack, store, work, args, trust_env=False)
        # one body by hand first: wrk's numbers are only about accepted batches if this one is accepted
        with bodies.open("rb") as lines:
            first = lines.readline().strip()
        response = client.post("/v1/events", content=first, headers={"content-type": "application/json"})
        accepted = response.json().get("accepted") if response.status_code == 202 else None
        if accepted != args.batch:
            raise RuntimeError(f"{store}: POST /v1/events answered {response.status_code} {response.text[:300]}")

        def wrk(label: str, duration: float) -> Json:
            if server.poll() is not None:
                raise RuntimeError(f"the gateway exited with {server.returncode}; see {log}")
            before = gateway_counters(client)
            run = run_post_wrk(base, bodies, duration=duration, args=args, server_pid=server.pid)
            after = gateway_counters(client)
            delta = counter_delta(before, after)
            run["gateway"] = {
                "events_accepted": events_accepted(after) - events_accepted(before),
                "responses": delta["responses"],
                "store_errors": {k: v - before.get(k, 0.0) for k, v in after.items() if "store_errors" in k},
            }
            (work / f"{label}.json").write_text(json.dumps(run, indent=2) + "\n")
            return run

        if args.warmup > 0:
            say(f"{store}: warming up POST /v1/events for {args.warmup:g}s")
            result["warmup"] = wrk("warmup", args.warmup)
        say(f"{store}: POST /v1/events, {args.batch} events a request, {args.duration:g}s, {args.connections} conns")
        run = result["run"] = wrk("ingest", args.duration)
        lat = run["latency_ms"]
        say(
            f"{store}: {run['rate']:8,.0f} req/s = {run['events_per_s']:9,.0f} events/s  p50 {lat['p50']:.2f} ms  "
            f"p99 {lat['p99']:.2f} ms  errors {run['errors_total']}  server CPU {run['server_cpu']:.0%}"
        )
        # the gateway counts what it stored: at least every completed request's batch, at most the
        # in-flight ones at the end on top
        counted = run["gateway"]["events_accepted"]
        low = (run["requests"] - run["errors_total"]) * args.batch
        result["events_counted_ok"] = low <= counted <= (run["requests"] + args.connections) * args.batch
        result["server_alive_at_end"] = server.poll() is None
    return result


# -------------------------------------------------------------------------------------------- push


class StreamUnavailableError(RuntimeError):
    """The gateway refused the stream handshake itself (for instance 404: no /v1/stream route)."""


@dataclass
class Visitor:
    name: str
    url: str
    ws: ClientConnection | None = None
    listener: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    first_message: float | None = None
    closed: bool = False
    items: list[str] = field(default_factory=list)
    seq: int | None = None
    pending_item: str | None = None  # the click POSTed and not yet answered by a push
    pending_since: float | None = None  # perf_counter() just before that POST


@dataclass
class PushStats:
    push_timeout: float
    handshake_ms: list[float] = field(default_factory=list)
    first_message_ms: list[float] = field(default_factory=list)
    connect_failures: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    late: int = 0
    unexpected_pushes: int = 0
    clicked_still_listed: int = 0
    repeated_connect: int = 0
    seq_errors: int = 0
    causes: Counter[str] = field(default_factory=Counter)
    pings: int = 0
    post_failures: Counter[str] = field(default_factory=Counter)
    closed_unexpectedly: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    closing: bool = False

    def problem(self, text: str) -> None:
        if text in self.problems or len(self.problems) < MAX_PROBLEMS:
            self.problems[text] += 1


def message_problem(message: Any) -> str | None:
    """None if a server message is what the protocol promises, else what is wrong with it."""
    if not isinstance(message, dict):
        return f"not a JSON object: {str(message)[:200]}"
    kind = message.get("type")
    if kind == "ping":
        return None if isinstance(message.get("ts"), int | float) else "ping without a numeric ts"
    if kind != "recommendations":
        return f"unknown message type {kind!r}"
    if message.get("cause") not in CAUSES:
        return f"unknown cause {message.get('cause')!r}"
    if not isinstance(message.get("seq"), int):
        return f"seq is not an integer: {message.get('seq')!r}"
    return recommendations_problem(message.get("recommendations"))


def recommendations_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return f"no recommendations.items list: {body!s:.200}"
    if missing := [key for key in ("request_id", "snapshot", "fallback", "profile") if key not in body]:
        return f"recommendations without {missing}"
    for item in body["items"]:
        if not isinstance(item, dict) or not {"id", "title", "categories", "score", "reasons"} <= set(item):
            return f"malformed item {item!s:.200}"
    return None


def on_message(visitor: Visitor, message: Any, received: float, stats: PushStats) -> None:
    problem = message_problem(message)
    if problem is not None:
        stats.problem(problem)
        return
    if message["type"] == "ping":
        stats.pings += 1
        return
    cause, seq = message["cause"], message["seq"]
    stats.causes[cause] += 1
    if visitor.seq is not None and seq <= visitor.seq:
        stats.seq_errors += 1
    visitor.seq = seq
    visitor.items = [str(item["id"]) for item in message["recommendations"]["items"]]
    if cause == "connect":
        if visitor.first_message is None:
            visitor.first_message = received
            visitor.ready.set()
        else:
            stats.repeated_connect += 1
    elif cause == "events":
        if visitor.pending_item is None or visitor.pending_since is None:
            stats.unexpected_pushes += 1
            return
        latency = received - visitor.pending_since
        stats.latencies_ms.append(latency * 1000)
        if latency > stats.push_timeout:
            stats.late += 1
        if visitor.pending_item in visitor.items:
            stats.clicked_still_listed += 1
        visitor.pending_item = visitor.pending_since = None


async def listen(visitor: Visitor, stats: PushStats) -> None:
    ws = visitor.ws
    assert ws is not None
    try:
        async for raw in ws:
            received = time.perf_counter()
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                stats.problem(f"not JSON: {raw[:200]!r}")
                continue
            on_message(visitor, message, received, stats)
    except ConnectionClosed:
        pass
    visitor.closed = True
    if not stats.closing and visitor.first_message is not None:  # else a connect failure
        stats.closed_unexpectedly[f"{ws.close_code} {ws.close_reason}".strip()] += 1


def ws_options(timeout: float) -> Json:
    """Client settings: no compression (the server should not negotiate it either), no client pings
    (the server sends its own heartbeats), and never a proxy (only 127.0.0.1 is contacted)."""
    options: Json = {
        "compression": None,
        "open_timeout": timeout,
        "ping_interval": None,
        "close_timeout": 5,
        "max_size": 1 << 20,
    }
    if int(websockets.version.version.split(".")[0]) >= 15:
        options["proxy"] = None
    return options


async def open_visitor(visitor: Visitor, stats: PushStats, gate: asyncio.Semaphore, timeout: float) -> None:
    """Handshake, then wait for the `cause: "connect"` message; failures are counted, not raised."""
    async with gate:
        started = time.perf_counter()
        try:
            visitor.ws = await connect(visitor.url, **ws_options(timeout))
        except InvalidStatus as exc:
            stats.connect_failures[f"HTTP {exc.response.status_code}"] += 1
            return
        except (OSError, TimeoutError, WebSocketException) as exc:
            stats.connect_failures[type(exc).__name__] += 1
            return
        stats.handshake_ms.append((time.perf_counter() - started) * 1000)
        visitor.listener = listener = asyncio.create_task(listen(visitor, stats))
        waiter = asyncio.create_task(visitor.ready.wait())
        await asyncio.wait({waiter, listener}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if visitor.first_message is None:
            ws = visitor.ws
            why = f"closed {ws.close_code} {ws.close_reason}".strip() if listener.done() else "no message"
            stats.connect_failures[f"{why} before the connect message"] += 1
            return
        stats.first_message_ms.append((visitor.first_message - started) * 1000)


async def refused_how(url: str, timeout: float = 5.0) -> str:
    """How the server treats a handshake that it must refuse: "closed 4401", "HTTP 403", "accepted"..."""
    try:
        ws = await connect(url, **ws_options(timeout))
    except InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}"
    except (OSError, TimeoutError, WebSocketException) as exc:
        return f"handshake failed: {exc!r}"
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await ws.recv()
                message = orjson.loads(raw)
                if not (isinstance(message, dict) and message.get("type") == "ping"):
                    return f"accepted: got {str(raw)[:120]}"
    except ConnectionClosed:
        return f"closed {ws.close_code}"
    except TimeoutError:
        return f"accepted: nothing in {timeout:g}s"
    finally:
        await ws.close()


async def post_click(http: httpx.AsyncClient, visitor: Visitor, stats: PushStats) -> None:
    item = visitor.pending_item
    body = orjson.dumps({"events": [{"visitor": visitor.name, "item": item, "event": "click"}]})
    failure = None
    visitor.pending_since = time.perf_counter()
    try:
        response = await http.post("/v1/events", content=body, headers={"content-type": "application/json"})
        if response.status_code != 202:
            failure = f"HTTP {response.status_code}"
            stats.problem(f"POST /v1/events: {response.status_code} {response.text[:200]}")
    except httpx.HTTPError as exc:
        failure = type(exc).__name__
    if failure is not None:
        stats.post_failures[failure] += 1
        if visitor.pending_item == item:  # nothing to wait for
            visitor.pending_item = visitor.pending_since = None


async def probe(base: str, ws_base: str, secret: bytes, http: httpx.AsyncClient, push_timeout: float) -> Json:
    """The protocol on single connections: refused tokens, and one visitor's connect -> click -> push."""
    result: Json = {}
    expired = mint(secret, "bench-expired", ttl_s=60, now=time.time() - 3600)
    for name, token in (("bad_token", "v1.not-a-token.0.x"), ("expired_token", expired)):
        result[name] = await refused_how(f"{ws_base}?token={urllib.parse.quote(token)}")
    result["refusals_match_protocol"] = all(
        result[k] == f"closed {CLOSE_UNAUTHORIZED}" for k in ("bad_token", "expired_token")
    )
    stats = PushStats(push_timeout)
    visitor = Visitor("bench-probe-" + secrets.token_hex(4), "")
    visitor.url = f"{ws_base}?token={urllib.parse.quote(mint(secret, visitor.name, ttl_s=TOKEN_TTL_S))}"
    await open_visitor(visitor, stats, asyncio.Semaphore(1), push_timeout)
    if visitor.ws is None:
        failures = ", ".join(stats.connect_failures)
        raise StreamUnavailableError(f"{base}: /v1/stream handshake failed ({failures})")
    try:
        result["first_message_ms"] = round(stats.first_message_ms[0], 2) if stats.first_message_ms else None
        if visitor.first_message is None:
            result["problem"] = "no cause=connect message"
        elif not visitor.items:
            result["problem"] = "the connect message listed no items"
        else:
            visitor.pending_item = visitor.items[0]
            await post_click(http, visitor, stats)
            deadline = time.perf_counter() + push_timeout
            while visitor.pending_item is not None and time.perf_counter() < deadline and not visitor.closed:
                await asyncio.sleep(0.01)
            result["push_ms"] = round(stats.latencies_ms[0], 2) if stats.latencies_ms else None
            if stats.post_failures:
                result["problem"] = f"POST /v1/events failed: {dict(stats.post_failures)}"
            elif not stats.latencies_ms:
                result["problem"] = f"no cause=events push within {push_timeout:g}s of a click on the first item"
            elif stats.clicked_still_listed:
                result["problem"] = "the pushed list still holds the clicked item"
    finally:
        stats.closing = True
        await visitor.ws.close()
        if visitor.listener is not None:
            await visitor.listener
    if stats.problems:
        result["message_problems"] = dict(stats.problems)
    return result


async def close_all(visitors: Sequence[Visitor], stats: PushStats, limit_s: float = 30.0) -> None:
    stats.closing = True
    gate = asyncio.Semaphore(500)

    async def close(ws: ClientConnection) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                await ws.close()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            await asyncio.gather(*(close(v.ws) for v in visitors if v.ws is not None))
    tasks = [v.listener for v in visitors if v.listener is not None and not v.listener.done()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def push_session(clients: int, port: int, server_pid: int, secret: bytes, args: argparse.Namespace) -> Json:
    base = f"http://127.0.0.1:{port}"
    ws_base = f"ws://127.0.0.1:{port}/v1/stream"
    result: Json = {"clients": clients}
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False, limits=limits) as http:
        result["probe"] = await probe(base, ws_base, secret, http, args.push_timeout)
        say(f"push {clients}: probe {result['probe']}")
        await asyncio.sleep(1.0)
        result["rss_mb_before"] = before = round(rss_mb(server_pid), 1)

        stats = PushStats(args.push_timeout)
        tag = secrets.token_hex(3)
        visitors = []
        for number in range(clients):
            name = f"bench-s{tag}-{number:05d}"
            token = urllib.parse.quote(mint(secret, name, ttl_s=TOKEN_TTL_S))
            visitors.append(Visitor(name, f"{ws_base}?token={token}&n={args.n}"))
        say(f"push {clients}: server RSS {before:.1f} MB; connecting {clients} clients, {args.handshakes} at a time")
        gate = asyncio.Semaphore(args.handshakes)
        connect_limit = 60 + clients / 50
        started = time.perf_counter()
        opening = [asyncio.create_task(open_visitor(v, stats, gate, args.open_timeout)) for v in visitors]
        _, late = await asyncio.wait(opening, timeout=connect_limit)
        for task in late:
            task.cancel()
        if late:
            stats.connect_failures["connect phase time limit"] += len(late)
        connected = [v for v in visitors if v.first_message is not None and not v.closed]
        result["connect"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "connected": len(connected),
            "failures": dict(stats.connect_failures),
            "handshake_ms": percentiles(stats.handshake_ms),
            "first_message_ms": percentiles(stats.first_message_ms),
        }
        say(
            f"push {clients}: {len(connected)} connected in {result['connect']['seconds']:.1f}s; "
            f"failures {dict(stats.connect_failures) or 'none'}; idle {args.idle:g}s"
        )
        try:
            cpu_before = cpu_seconds(server_pid)
            await asyncio.sleep(args.idle)
            result["idle_server_cpu"] = round((cpu_seconds(server_pid) - cpu_before) / args.idle, 3)
            result["rss_mb_idle"] = idle = round(rss_mb(server_pid), 1)
            growth = idle - before
            result["mb_per_1000_idle"] = round(growth / len(connected) * 1000, 1) if connected else None
            result["pings_while_idle"] = stats.pings
            say(f"push {clients}: server RSS {idle:.1f} MB idle = {result['mb_per_1000_idle']} MB per 1,000 sockets")
            if connected and args.events > 0:
                result["events"] = await send_events(connected, http, stats, server_pid, args)
        finally:
            result["closed_unexpectedly"] = dict(stats.closed_unexpectedly)
            await close_all(visitors, stats)
        result["causes"] = dict(stats.causes)
        result["pings"] = stats.pings
        result["seq_errors"] = stats.seq_errors
        result["repeated_connect"] = stats.repeated_connect
        result["message_problems"] = dict(stats.problems)
    return result


async def send_events(
    connected: list[Visitor], http: httpx.AsyncClient, stats: PushStats, server_pid: int, args: argparse.Namespace
) -> Json:
    """Clicks at a steady rate, each on the first item of a connected visitor with nothing pending;
    then wait for the pushes, at most --push-timeout after the last POST."""
    order = list(connected)
    random.Random(args.seed).shuffle(order)
    cursor = 0

    def pick() -> Visitor | None:
        nonlocal cursor
        for _ in range(len(order)):
            visitor = order[cursor % len(order)]
            cursor += 1
            if visitor.pending_item is None and visitor.items and not visitor.closed:
                return visitor
        return None

    say(f"push {len(connected)}: {args.events} clicks at {args.event_rate:g}/s, one push expected for each")
    tasks: set[asyncio.Task[None]] = set()
    skipped = 0
    limit = args.events / args.event_rate + 10
    gc.collect()
    gc.freeze()
    gc.disable()  # the client's collector, not the server, made the p99 spikes before (PERF_NOTES)
    cpu_server, cpu_client = cpu_seconds(server_pid), own_cpu_seconds()
    started = time.perf_counter()
    try:
        for index in range(args.events):
            wait = started + index / args.event_rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if time.perf_counter() - started > limit:
                skipped += args.events - index
                break
            visitor = pick()
            if visitor is None:
                skipped += 1
                continue
            visitor.pending_item = visitor.items[0]
            task = asyncio.create_task(post_click(http, visitor, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sending = time.perf_counter() - started
        if tasks:
            await asyncio.wait(set(tasks), timeout=args.push_timeout + 10)
        deadline = time.perf_counter() + args.push_timeout
        while time.perf_counter() < deadline and any(v.pending_item is not None for v in order):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a duplicate push would come within the debounce: count it as extra
        elapsed = time.perf_counter() - started
        server_cpu = (cpu_seconds(server_pid) - cpu_server) / elapsed
        client_cpu = (own_cpu_seconds() - cpu_client) / elapsed
    finally:
        gc.enable()
        gc.unfreeze()
    posted = args.events - skipped
    failed_posts = sum(stats.post_failures.values())
    missing = sum(1 for v in order if v.pending_item is not None)
    delivered = len(stats.latencies_ms) - stats.late
    result: Json = {
        "requested": args.events,
        "rate_requested": args.event_rate,
        "rate_achieved": round(posted / sending, 1) if sending > 0 else None,
        "posted": posted,
        "skipped_no_idle_visitor": skipped,
        "post_failures": dict(stats.post_failures),
        "expected_pushes": posted - failed_posts,
        "delivered": delivered,
        "late": stats.late,
        "missing": missing,
        "extra_pushes": stats.unexpected_pushes,
        "failures": failed_posts + stats.late + missing + stats.unexpected_pushes,
        "clicked_item_still_listed": stats.clicked_still_listed,
        "latency_ms": percentiles(stats.latencies_ms),
        "server_cpu": round(server_cpu, 2),
        "client_cpu": round(client_cpu, 2),
    }
    lat = result["latency_ms"]
    say(
        f"push {len(connected)}: delivered {delivered}/{result['expected_pushes']}, late {stats.late}, missing "
        f"{missing}, extra {stats.unexpected_pushes}; p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms "
        f"max {lat.get('max')} ms"
    )
    return result


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine function on uvloop when it is installed (as the gateway does), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def bench_push(clients: int, secret: str, args: argparse.Namespace) -> Json:
    work = args.run_dir / f"push-{clients}"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = work / "serve.log"
    with (
        running(serve_command(args, "memory://", port), log, f"tailor serve (push, {clients} clients)") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as client,
    ):
        ready = round(wait_ready(client, server, log, args.ready_timeout), 2)
        try:
            result: Json = run_async(lambda: push_session(clients, port, server.pid, secret.encode(), args))
        except StreamUnavailableError as exc:
            say(f"push {clients}: {exc}")
            result = {"clients": clients, "error": str(exc)}
        result["ready_seconds"] = ready
        result["server_alive_at_end"] = server.poll() is None
        with contextlib.suppress(httpx.HTTPError):
            (work / "metrics.txt").write_text(client.get("/metrics").text)
    return result


# ------------------------------------------------------------------------------------------- report


def table(report: Json, args: argparse.Namespace) -> str:
    lines: list[str] = []
    if report.get("ingest"):
        lines.append(
            f"ingest: POST /v1/events, {args.batch} events a request, wrk {args.connections} connections, "
            f"{args.duration:g}s"
        )
        lines.append(
            f"{'store':7} {'req/s':>8} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'errors':>6} "
            f"{'srvCPU':>6} {'counted':>7}"
        )
        for result in report["ingest"]:
            run = result["run"]
            lat = run["latency_ms"]
            lines.append(
                f"{result['store']:7} {run['rate']:8,.0f} {run['events_per_s']:9,.0f} {lat['p50']:7.2f} "
                f"{lat['p99']:7.2f} {lat['p99_9']:7.2f} {run['errors_total']:6} {run['server_cpu']:6.0%} "
                f"{'ok' if result['events_counted_ok'] else 'WRONG':>7}"
            )
    if report.get("push"):
        if lines:
            lines.append("")
        lines.append(
            f"push: one server process, memory store; {args.events} clicks at {args.event_rate:g}/s, "
            f"each must bring one cause=events push within {args.push_timeout:g}s"
        )
        lines.append(
            f"{'clients':>7} {'conn':>6} {'MB/1k':>6} {'conn p99':>8} {'push p50':>8} {'p99':>7} {'max':>7} "
            f"{'expect':>6} {'deliv':>6} {'late':>4} {'miss':>4} {'extra':>5} {'closed':>6} {'srvCPU':>6} "
            f"{'cliCPU':>6}"
        )
        for result in report["push"]:
            if "error" in result:
                lines.append(f"{result['clients']:7} {result['error']}")
                continue
            conn = result["connect"]
            ev = result.get("events", {})
            lat = ev.get("latency_ms", {})

            def num(value: Any, spec: str = ".1f") -> str:
                return "-" if value is None else format(value, spec)

            lines.append(
                f"{result['clients']:7} {conn['connected']:6} {num(result['mb_per_1000_idle']):>6} "
                f"{num(conn['first_message_ms'].get('p99')):>8} {num(lat.get('p50')):>8} {num(lat.get('p99')):>7} "
                f"{num(lat.get('max')):>7} {num(ev.get('expected_pushes'), 'd'):>6} {num(ev.get('delivered'), 'd'):>6} "
                f"{num(ev.get('late'), 'd'):>4} {num(ev.get('missing'), 'd'):>4} {num(ev.get('extra_pushes'), 'd'):>5} "
                f"{sum(result['closed_unexpectedly'].values()):6} {num(ev.get('server_cpu'), '.0%'):>6} "
                f"{num(ev.get('client_cpu'), '.0%'):>6}"
            )
            notes = []
            probe = result["probe"]
            if not probe.get("refusals_match_protocol"):
                notes.append(f"refused tokens: bad {probe['bad_token']!r}, expired {probe['expired_token']!r}")
            if probe.get("problem"):
                notes.append(f"probe: {probe['problem']}")
            if failures := conn["failures"]:
                notes.append(f"connect failures {failures}")
            if result["closed_unexpectedly"]:
                notes.append(f"closed by server {result['closed_unexpectedly']}")
            for key in ("seq_errors", "repeated_connect"):
                if result[key]:
                    notes.append(f"{key} {result[key]}")
            if ev.get("clicked_item_still_listed"):
                notes.append(f"pushes still listing the clicked item {ev['clicked_item_still_listed']}")
            if ev.get("post_failures"):
                notes.append(f"POST failures {ev['post_failures']}")
            if result["message_problems"]:
                notes.append(f"message problems {result['message_problems']}")
            lines.extend(f"{'':7} {note}" for note in notes)
            lines.append(
                f"{'':7} RSS {result['rss_mb_before']:.0f} -> {result['rss_mb_idle']:.0f} MB idle, idle server CPU "
                f"{result['idle_server_cpu']:.0%}, pings {result['pings']}, causes {result['causes']}"
            )
    return "\n".join(lines)


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated client counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be >= 1: {text!r}")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="bench_stream.py"
    )
    p.add_argument("--bench-dir", type=Path, default=Path("var/bench"), help="working directory (default var/bench)")
    p.add_argument(
        "--snapshots-dir",
        type=Path,
        help="snapshot root (default BENCH_DIR/snapshots if it has a CURRENT pointer, else a small demo shop "
        "made under BENCH_DIR/stream-demo)",
    )
    p.add_argument("--out", type=Path, help="results JSON (default BENCH_DIR/stream.json)")
    p.add_argument("--skip-ingest", action="store_true", help="leave out the ingestion part")
    p.add_argument("--skip-stream", action="store_true", help="leave out the WebSocket push part")
    p.add_argument("--stores", default="memory,redis", help="ingestion: comma-separated stores (default memory,redis)")
    p.add_argument("--duration", type=float, default=15.0, help="ingestion: seconds of wrk per store (default 15)")
    p.add_argument("--warmup", type=float, default=2.0, help="ingestion: unrecorded seconds first (default 2)")
    p.add_argument("--connections", type=int, default=64, help="ingestion: wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=1, help="ingestion: wrk threads (default 1: wrk shares 2 cores)")
    p.add_argument("--batch", type=int, default=20, help="ingestion: events per POST (default 20)")
    p.add_argument("--visitors", type=int, default=50_000, help="ingestion: visitors, one batch each (50000)")
    p.add_argument("--clients", type=parse_counts, default=[1000, 5000], help="push: client counts (1000,5000)")
    p.add_argument("--events", type=int, default=2000, help="push: clicks POSTed, one per visitor (default 2000)")
    p.add_argument("--event-rate", type=float, default=150.0, help="push: clicks per second (default 150)")
    p.add_argument("--push-timeout", type=float, default=5.0, help="push: seconds a push may take (default 5)")
    p.add_argument("--handshakes", type=int, default=200, help="push: concurrent handshakes (default 200)")
    p.add_argument("--open-timeout", type=float, default=30.0, help="push: seconds per handshake (default 30)")
    p.add_argument("--idle", type=float, default=5.0, help="push: seconds idle before reading RSS (default 5)")
    p.add_argument("--n", type=int, default=10, help="push: recommendations per message (default 10)")
    p.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    add_gateway_options(p)
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def raise_open_files(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; the gateway started from here inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target < needed:
        raise SystemExit(f"{needed} sockets need RLIMIT_NOFILE >= {needed}, but the hard limit is {hard}")
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return int(target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out = args.out or args.bench_dir / "stream.json"
    stores = [s.strip() for s in args.stores.split(",") if s.strip()] if not args.skip_ingest else []
    if unknown := set(stores) - set(STORES):
        raise SystemExit(f"unknown store(s) {sorted(unknown)}; choose from {STORES}")
    for binary in (["wrk"] if stores else []) + ([args.redis_server] if "redis" in stores else []):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} not found on PATH")
    clients = [] if args.skip_stream else args.clients
    if args.event_rate <= 0 or args.push_timeout <= 0 or args.handshakes < 1:
        raise SystemExit("--event-rate, --push-timeout and --handshakes must be positive")
    nofile = raise_open_files(max(clients, default=0) + 1024)
    signal.signal(signal.SIGTERM, _terminate)
    os.chdir(ROOT)
    # the gateway signs and checks stream tokens with this; it is made up for this run only
    secret = secrets.token_urlsafe(32)
    os.environ[SECRET_ENV] = secret

    report: Json = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_average(), "open_files_limit": nofile},
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "batch": args.batch,
            "visitors": args.visitors,
            "clients": clients,
            "events": args.events,
            "event_rate": args.event_rate,
            "push_timeout_s": args.push_timeout,
            "handshakes": args.handshakes,
            "idle_s": args.idle,
            "n": args.n,
            "server_workers": 1,
            "serve_command": args.serve_command,
            "websockets": websockets.version.version,
        },
        "snapshots": resolve_snapshots(args),
    }
    snap = Snapshot.load(args.snapshots_dir)
    args.run_dir = new_run_dir(args.bench_dir / "stream-run")
    say(f"working files (bodies, server logs, wrk results, /metrics) in {args.run_dir}")
    args.pinned_root = pin_snapshot(snap, args.run_dir / "snapshots")
    report["code"] = code_version()
    report["snapshot"] = {"version": snap.version, "counts": snap.manifest["counts"]}
    say(f"serving snapshot {snap.version} ({len(snap.item_ids):,} items) from {args.pinned_root}")

    if stores:
        bodies = args.run_dir / "bodies.jsonl"
        write_bodies(snap, args, bodies)
        say(f"wrote {args.visitors:,} bodies of {args.batch} events ({bodies.stat().st_size / 1e6:.1f} MB) to {bodies}")
        try:
            report["ingest"] = [bench_ingest(store, bodies, args) for store in stores]
        finally:
            bodies.unlink()  # tens of MB, and quick to make again
    if clients:
        del snap  # the client loop below is timed: keep its heap small
        gc.collect()
        report["push"] = [bench_push(count, secret, args) for count in clients]
    report["machine"]["load_average_at_end"] = load_average()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["peak_rss_mb_harness"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.out}")
    print(table(report, args))
    print(footer(report, report["snapshot"]["version"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
