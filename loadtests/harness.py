"""Processes and wrk for the benchmarks: start and stop servers on free loopback ports, wait until
they answer, read their CPU time, and run wrk with loadtests/wrk/paths.lua, parsing its JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "loadtests" / "wrk" / "paths.lua"
MARKER = "WRK_JSON "
_started = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM the process group (the server may have workers), then SIGKILL after 15 s."""
    if proc.poll() is None:
        say(f"stopping {name} (pid {proc.pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            say(f"{name} ignored SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def running(
    command: Sequence[str], log: Path, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` in its own session, logging to `log`, with `env` over the environment; stopped on exit."""
    say(f"starting {name}: {shlex.join(command)}  (log: {log})")
    with log.open("wb") as out:
        # own session: a Ctrl-C reaches only this harness, which then stops the children in order
        # A gateway's event log (memory store) and secret go beside its log, not into the repository's var/.
        # Every simulated visitor counts as consenting (opt-out with no choice made): the store checks
        # the consent field on every read and write either way, so the work measured is the same as
        # for visitors who granted it under the default opt-in.
        environment = {
            "TAILOR_SECRET_FILE": str(log.parent / "secret"),
            "TAILOR_CONSENT_MODE": "opt-out",
            **os.environ,
            "TAILOR_EVENT_LOG": str(log.parent / "events"),
            "TAILOR_RULES_DIR": str(log.parent / "rules"),
            "TAILOR_EXPERIMENTS_DIR": str(log.parent / "experiments"),
            "TAILOR_CATALOG_FILE": str(log.parent / "catalog.jsonl"),
            **(env or {}),
        }
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=environment
        )
    try:
        yield proc
    finally:
        stop(proc, name)


MEMORY_STORE_MB = 2048


def store_url(stack: contextlib.ExitStack, store: str, work: Path, redis_server: str) -> str:
    """ "memory://" sized for the benchmarks' visitors, or for "redis" the URL of a throwaway
    redis-server (no persistence) started on a free port and stopped when `stack` closes."""
    if store != "redis":
        # The default 512 MB keeps about 100,000 visitors; the benchmarks seed up to 200,000, and a
        # seeded visitor the store let go would be answered as an unknown one, at a fraction of the
        # work, flattering the memory store against Redis (which keeps them all).
        return f"memory://?max_mb={MEMORY_STORE_MB}"
    port = free_port()
    command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--daemonize", "no"]
    redis = stack.enter_context(running(command, work / "redis.log", "redis-server"))
    wait_redis(port, redis)
    return f"redis://127.0.0.1:{port}/0"


def serve_command(args: argparse.Namespace, url: str, port: int, workers: int = 1) -> list[str]:
    """`tailor serve` (args.serve_command) with `workers` processes on the pinned snapshots, the store
    `url` and loopback `port`; with args.serve_config (where the benchmark has that option) as --config."""
    serve = [*shlex.split(args.serve_command), "--snapshots", str(args.pinned_root), "--store", url]
    serve += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    config = getattr(args, "serve_config", None)
    return [*serve, "--config", str(config)] if config else serve


class Gateway(NamedTuple):
    server: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:<port>
    client: httpx.Client
    log: Path
    ready_seconds: float


def start_gateway(
    stack: contextlib.ExitStack,
    store: str,
    work: Path,
    args: argparse.Namespace,
    *,
    trust_env: bool = True,
    workers: int = 1,
) -> Gateway:
    """`tailor serve` with `workers` processes on `store` ("memory", "redis": its own redis-server,
    or a store URL to share one between gateways) and a free loopback port, logging into `work`,
    with a client; both stop when `stack` closes. Returns once /readyz says ready."""
    url = store if "://" in store else store_url(stack, store, work, args.redis_server)
    port = free_port()
    log = work / "serve.log"
    command = serve_command(args, url, port, workers)
    server = stack.enter_context(running(command, log, f"tailor serve ({store}, {workers} workers)"))
    base = f"http://127.0.0.1:{port}"
    client = stack.enter_context(httpx.Client(base_url=base, timeout=30, trust_env=trust_env))
    ready = wait_ready(client, server, log, args.ready_timeout)
    return Gateway(server, base, client, log, round(ready, 2))


def add_wrk_options(p: argparse.ArgumentParser, *, duration: float, warmup: float, scope: str = "") -> None:
    """How long and how hard wrk drives the gateway; `scope` prefixes the help where the benchmark has
    other parts (e.g. "ingestion: ")."""
    p.add_argument(
        "--duration", type=float, default=duration, help=f"{scope}seconds per wrk run (default {duration:g})"
    )
    p.add_argument(
        "--warmup", type=float, default=warmup, help=f"{scope}unrecorded seconds before measuring (default {warmup:g})"
    )
    p.add_argument("--connections", type=int, default=64, help=f"{scope}wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=1, help=f"{scope}wrk threads (default 1: wrk shares the cores)")


def add_gateway_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark that starts gateways has."""
    p.add_argument(
        "--serve-command",
        default=f"{shlex.quote(sys.executable)} -m tailor serve",
        help="how to start the gateway; --snapshots/--store/--host/--port/--workers are appended",
    )
    p.add_argument("--redis-server", default="redis-server", help="redis-server binary (default from PATH)")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz (default 180)")


def wait_redis(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"redis-server on port {port} did not answer PING in {timeout:.0f}s")


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the gateway exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            response = client.get("/readyz", timeout=2)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"/readyz not 200 after {timeout:.0f}s; last: {last}")


def session_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU time of each process in the session `pid` leads (a server and its workers:
    `running` starts each command in its own session), reaped children included, from /proc."""
    found: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == pid:  # fields[3] is the session id
            found[int(stat.parent.name)] = sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server `pid` and its workers (session_cpu_seconds), summed."""
    return sum(session_cpu_seconds(pid).values())


# ---------------------------------------------------------------------------------------------- wrk


def run_wrk(
    url: str,
    paths: Path,
    *,
    duration: float,
    connections: int,
    threads: int,
    server_pid: int,
    rate: float | None = None,
    post: str | None = None,
) -> dict[str, Any]:
    """wrk with paths.lua: GETs of the paths in `paths`, or with `post`, POSTs of the bodies in it to
    that path; its JSON line plus the server's CPU share over the run."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "-s", str(LUA), url]
    command += ["--", f"file={paths}", f"threads={threads}"]
    if post:
        command.append(f"post={post}")
    if rate:
        command += [f"rate={rate:.3f}", f"connections={connections}"]
    cpu_before, load_before = cpu_seconds(server_pid), load_average()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    server_cpu = (cpu_seconds(server_pid) - cpu_before) / duration
    lines = [line for line in completed.stdout.splitlines() if line.startswith(MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()} {completed.stdout[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    result["errors_total"] = sum(result["errors"].values())
    result["server_cpu"] = round(server_cpu, 2)
    result["load_before"] = load_before
    if rate:
        result["requested_rate"] = round(rate, 1)
    return result


def footer(report: dict[str, Any], snapshot: str) -> str:
    """The last lines of a benchmark's table: which code and snapshot, and how busy the machine was."""
    code = report["code"]
    dirty = f", {len(code['uncommitted_changes'])} uncommitted changes" if code["uncommitted_changes"] else ""
    machine = report["machine"]
    return (
        f"code {code['commit']}{dirty}; snapshot {snapshot}\n"
        f"load average at start {machine['load_average_at_start']}, "
        f"at end {machine['load_average_at_end']} ({os.cpu_count()} CPUs)"
    )


def describe(result: dict[str, Any]) -> str:
    lat = result["latency_ms"]
    text = (
        f"{result['rate']:9,.0f} req/s  p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms  "
        f"errors {result['errors_total']}  server CPU {result['server_cpu']:.0%}"
    )
    cache = result.get("gateway", {}).get("candidate_cache", {})
    if sum(cache.values()):
        text += f"  cache hits {cache.get('hit', 0) / sum(cache.values()):.0%}"
    return text


def check_shape(response: httpx.Response) -> str | None:
    """None if the response is what the API promises, else what is wrong with it."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:300]}"
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return f"no items list: {response.text[:300]}"
    for key in ("request_id", "snapshot", "fallback"):
        if key not in body:
            return f"no {key!r}: {response.text[:300]}"
    for item in body["items"]:
        if not isinstance(item, dict) or not {"id", "score", "reasons", "title", "categories"} <= set(item):
            return f"malformed item {item!r}"
    return None


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so the gateways and redis-servers a benchmark started are
    stopped by their context managers when someone ends the run."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
