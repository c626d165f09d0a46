"""The push half of bench_stream.py: WebSocket clients on /v1/stream, all in this process (one
asyncio loop on uvloop), a protocol probe (bad and expired tokens, one visitor's connect -> click ->
push), and the timed session (memory per socket, event-to-push latency, missing, late and extra
pushes). bench_stream.py's docstring describes the run; `bench_push` is what it calls per client count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import resource
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from gateway.privacy.tokens import mint
from loadtests.harness import (
    cpu_seconds,
    free_port,
    running,
    say,
    serve_command,
    wait_ready,
)

CAUSES = ("connect", "events", "snapshot")
CLOSE_UNAUTHORIZED = 4401
TOKEN_TTL_S = 3600
MAX_PROBLEMS = 20

Json = dict[str, Any]
T = TypeVar("T")


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
