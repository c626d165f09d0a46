"""Where a served gateway's request time goes, under paced wrk traffic: which kind of request is slow,
and whether it waits for the event loop, for a worker thread or for the garbage collector.

The harness starts `tailor serve` (one worker, memory store) through this module's `serve` role, which
adds probes before the server starts:

    loop lag      how late a 2 ms timer fires on the event loop (time other work held the loop)
    per request   the time from the ASGI call to the last body byte, by the answer's profile kind
                  ("snapshot": a known user, "live": a new visitor, "none/cold-start": unknown)
    offloaded     each computation handed to the compute threads (Gateway.offload): its wait for a
                  thread, its wall and CPU time there, and the wait until the event loop took the result
    gc            every collection's generation and pause

then seeds new visitors, measures the recommend mix at full speed, and runs each of `--runs` paced at
a share of half that rate (the same traffic as bench_gateway.py), summarising the probes' samples
of each run's window.

    .venv/bin/python -m loadtests.serve_probe --snapshots-dir var/1m/snapshots \\
        --runs recommend,recommend_new:0.3,recommend_known:0.7

`--inline` runs what would be offloaded on the event loop instead; `--graph-ef N` makes every
single-query graph search use efSearch N and return at most N rows: both are experiments (what
would the latency be if ...), not settings of the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import json
import os
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.exact import Snapshot
from loadtests.harness import add_gateway_options, run_wrk, say, start_gateway
from loadtests.traffic import make_traffic, seed_visitors

PROBE_OUT = "TAILOR_PROBE_OUT"
PROBE_INLINE = "TAILOR_PROBE_INLINE"
PROBE_GRAPH_EF = "TAILOR_PROBE_GRAPH_EF"
LAG_INTERVAL_S = 0.002
Samples = dict[str, list[list[Any]]]


# --------------------------------------------------------------------------------- the server side


def install_probes(out: Path) -> None:
    """Patch the gateway's modules (before uvicorn imports the app factory) to record samples; they
    are written to `out` whenever `out`.want appears (not on a timer: dumping holds the GIL)."""
    from gateway import runtime  # noqa: PLC0415 - only in the probed server
    from gateway import serve as serving  # noqa: PLC0415
    from gateway.recommend import pipeline  # noqa: PLC0415
    from index_builder import ann  # noqa: PLC0415

    samples: Samples = {"lag": [], "offload": [], "req": [], "gc": []}
    kind: contextvars.ContextVar[str] = contextvars.ContextVar("kind", default="?")

    def dump() -> None:
        want = out.with_name(out.name + ".want")
        while True:
            time.sleep(0.2)
            if want.exists():
                out.with_name(out.name + ".tmp").write_text(json.dumps(samples))
                out.with_name(out.name + ".tmp").replace(out)
                want.unlink()

    threading.Thread(target=dump, daemon=True).start()
    started: dict[int, float] = {}

    def collected(phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            started[generation] = time.perf_counter()
        elif generation in started:
            began = started.pop(generation)
            samples["gc"].append([began, generation, time.perf_counter() - began])

    gc.callbacks.append(collected)

    async def lag() -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL_S)
            samples["lag"].append([began, time.perf_counter() - began - LAG_INTERVAL_S])

    inline = os.environ.get(PROBE_INLINE) == "1"

    def offload(self: runtime.Gateway, compute: Callable[[], Any]) -> Awaitable[Any]:
        submitted = time.perf_counter()
        phases: dict[str, float] = {}

        def run() -> Any:
            phases["start"], cpu = time.perf_counter(), time.thread_time()
            try:
                return compute()
            finally:
                phases["cpu"], phases["end"] = time.thread_time() - cpu, time.perf_counter()

        async def done() -> Any:
            if inline:
                result = run()
            else:
                result = await asyncio.get_running_loop().run_in_executor(self.executor, run)
            waited = time.perf_counter() - phases["end"]
            ran = phases["end"] - phases["start"]
            samples["offload"].append([submitted, phases["start"] - submitted, ran, phases["cpu"], waited])
            return result

        return done()

    runtime.Gateway.offload = offload  # type: ignore[method-assign]

    recommend = pipeline.Recommender.recommend

    async def recommend_probed(self: pipeline.Recommender, **options: Any) -> pipeline.Answer:
        answer = await recommend(self, **options)
        kind.set(answer.profile + (f"/{answer.fallback}" if answer.fallback else ""))
        return answer

    pipeline.Recommender.recommend = recommend_probed  # type: ignore[method-assign]

    if os.environ.get(PROBE_GRAPH_EF):
        ef = int(os.environ[PROBE_GRAPH_EF])
        search = ann._graph_search

        def graph_search(graph: Any, queries: Any, k: int, ef_search: int) -> Any:
            if len(queries) == 1:
                return search(graph, queries, min(k, ef), ef)
            return search(graph, queries, k, ef_search)

        ann._graph_search = graph_search  # type: ignore[assignment]

    factory = serving.app_from_environment
    lagging: list[asyncio.Task[None]] = []

    def probed_app() -> Any:
        app = factory()

        async def timed(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if not lagging:
                lagging.append(asyncio.get_running_loop().create_task(lag()))
            began = time.perf_counter()
            ended: list[float] = []

            async def sent(message: Any) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    ended.append(time.perf_counter())
                await send(message)

            await app(scope, receive, sent)
            samples["req"].append([began, scope["path"], kind.get(), (ended or [time.perf_counter()])[0] - began])

        timed.state = app.state  # type: ignore[attr-defined]
        return timed

    serving.app_from_environment = probed_app


def serve(argv: Sequence[str]) -> int:
    """`tailor ARGV` (`serve ...`) with the probes installed."""
    install_probes(Path(os.environ[PROBE_OUT]))
    from tailor.cli import main  # noqa: PLC0415

    return main(list(argv))


# ----------------------------------------------------------------------------------- the summary


def _ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if len(values) else None


def summarise(samples: Samples, began: float, ended: float) -> dict[str, Any]:
    """The probes' samples whose start lies in [began, ended] (perf_counter seconds of the server)."""

    def window(name: str) -> list[list[Any]]:
        return [row for row in samples[name] if began <= row[0] <= ended]

    out: dict[str, Any] = {}
    lag = [row[1] for row in window("lag")]
    out["loop_lag_ms"] = {"n": len(lag), "p50": _ms(lag, 50), "p99": _ms(lag, 99), "max": _ms(lag, 100)}
    requests = window("req")
    kinds = sorted({row[2] for row in requests})
    by_kind = {kind: [row[3] for row in requests if row[2] == kind] for kind in kinds}
    out["request_ms_by_kind"] = {
        kind: {"n": len(times), "p50": _ms(times, 50), "p99": _ms(times, 99), "max": _ms(times, 100)}
        for kind, times in by_kind.items()
    }
    if requests:
        slowest = np.percentile([row[3] for row in requests], 99)
        slow = [row[2] for row in requests if row[3] >= slowest]
        out["slowest_1pct_by_kind"] = {kind: slow.count(kind) for kind in sorted(set(slow))}
    offloaded = window("offload")
    if offloaded:
        phases = {"wait_for_thread": 1, "run_wall": 2, "run_cpu": 3, "wait_for_loop": 4}
        out["offloaded_ms"] = {
            name: {"p50": _ms([row[at] for row in offloaded], 50), "p99": _ms([row[at] for row in offloaded], 99)}
            for name, at in phases.items()
        }
        out["offloaded_ms"]["n"] = len(offloaded)
    pauses = window("gc")
    out["gc"] = {
        "collections": len(pauses),
        "over_5ms": sum(1 for row in pauses if row[2] > 0.005),
        "max_ms": _ms([row[2] for row in pauses], 100),
    }
    return out


# ---------------------------------------------------------------------------------- the harness


def _read(out: Path) -> Samples:
    want = out.with_name(out.name + ".want")
    want.touch()
    deadline = time.monotonic() + 30
    while want.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the probed server did not write {out}")
        time.sleep(0.1)
    samples: Samples = json.loads(out.read_text())
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots-dir", type=Path, required=True, help="snapshot root")
    p.add_argument("--visitors", type=int, default=100_000, help="new visitors seeded with 1-3 clicks")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--rate", type=float, default=0.0, help="half rate (default: half the measured mix maximum)")
    p.add_argument(
        "--runs",
        default="recommend",
        help="paced runs: traffic names (recommend, recommend_known, recommend_new, recommend_unknown), "
        "each with :SHARE of the half rate (default 1)",
    )
    p.add_argument("--inline", action="store_true", help="run offloaded computations on the event loop")
    p.add_argument("--graph-ef", type=int, default=0, help="single-query graph searches at this efSearch and k")
    p.add_argument("--work", type=Path, default=Path("var/probe"), help="working directory")
    p.add_argument("--out", type=Path, help="results JSON (default WORK/probe-summary.json)")
    add_gateway_options(p)
    args = p.parse_args(argv)
    args.mix, args.seed, args.workers = (0.5, 0.3, 0.2), 11, 1
    args.pinned_root = args.snapshots_dir
    args.work.mkdir(parents=True, exist_ok=True)
    samples_file = (args.work / "samples.json").resolve()
    os.environ[PROBE_OUT] = str(samples_file)
    os.environ[PROBE_INLINE] = "1" if args.inline else "0"
    if args.graph_ef:
        os.environ[PROBE_GRAPH_EF] = str(args.graph_ef)
    args.serve_command = f"{sys.executable} -m loadtests.serve_probe serve"
    snap = Snapshot.load(args.snapshots_dir)
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    with contextlib.ExitStack() as stack:
        gateway = start_gateway(stack, "memory", args.work, args)
        report["ready_seconds"] = gateway.ready_seconds
        traffic = make_traffic(snap, seed_visitors(gateway.client, snap, args.visitors, random.Random(11)), args)

        def wrk(name: str, rate: float | None, duration: float) -> tuple[dict[str, Any], float, float]:
            path = args.work / f"{name}.txt"
            size = max(50_000, int(duration * (rate or 15_000) * 1.25) + 64)
            kinds = traffic[name].window(size, path)
            began = time.perf_counter()
            run = run_wrk(
                gateway.base,
                path,
                duration=duration,
                connections=64,
                threads=1,
                server_pid=gateway.server.pid,
                rate=rate,
            )
            traffic[name].consume(kinds, min(run["requests"] + 64, size))
            return run, began, time.perf_counter()

        wrk("recommend", None, 3.0)
        half = args.rate
        if not half:
            full, _, _ = wrk("recommend", None, args.duration)
            report["full_speed"] = full
            half = full["rate"] / 2
            say(f"recommend mix at full speed: {full['rate']:,.0f} req/s")
        calibration, _, _ = wrk("recommend", half, 5.0)
        factor = min(2.0, half / max(calibration["rate"], 1.0))
        for spec in args.runs.split(","):
            name, _, share = spec.partition(":")
            rate = half * float(share or 1)
            run, began, ended = wrk(name, rate * factor, args.duration)
            # the server's perf_counter is the same clock (CLOCK_MONOTONIC) as this process's
            summary = summarise(_read(samples_file), began, ended)
            report["runs"].append({"run": spec, "target_rate": round(rate, 1), "wrk": run, "probes": summary})
            say(f"{spec}: {run['rate']:,.0f} req/s, p99 {run['latency_ms']['p99']:.2f} ms; {json.dumps(summary)}")
    out = args.out or args.work / "probe-summary.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(sys.argv[1:]))
    sys.exit(main())
