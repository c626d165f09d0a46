"""Recommend throughput of `tailor serve --workers 2` against one worker, in ABBA order, in one run.

Several workers need a shared store, so one throwaway redis-server serves the whole run; the new
visitors (1-3 recent clicks each) are seeded once, through the first gateway. Then, for each worker
count of --order (default 1,2,2,1: ABBA, so a drift of the shared machine weighs on both sides
alike), a fresh `tailor serve --workers N` on that store and a free loopback port: an unrecorded
warm-up, then wrk drives the recommend mix of bench_gateway.py (known users, seeded visitors,
unknown visitors; no request repeated within the run) at full speed for --duration seconds.

Reported: each run's rate, latency and the CPU share of the server (all its workers), and the mean
rate with N workers over the mean with one, against the bar (BAR_TWO_WORKERS). wrk (one thread)
shares the machine's cores with the workers: on 2 cores, the more the workers answer, the more
CPU wrk itself takes from them.

    .venv/bin/python loadtests/bench_workers.py                     # the benchmark shop in var/bench
    .venv/bin/python loadtests/bench_workers.py --snapshots-dir var/bench-hnsw/snapshots --duration 10

Results go to var/bench/workers.json; a compact table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.bench_gateway import code_version, new_run_dir, pin_snapshot
from loadtests.exact import Snapshot
from loadtests.harness import (
    ROOT,
    Gateway,
    add_gateway_options,
    add_wrk_options,
    describe,
    footer,
    load_average,
    run_wrk,
    say,
    session_cpu_seconds,
    start_gateway,
    stop_on_sigterm,
    store_url,
)
from loadtests.traffic import (
    Traffic,
    add_mix_option,
    counter_delta,
    gateway_counters,
    make_traffic,
    preflight,
    seed_visitors,
)

BAR_TWO_WORKERS = 1.7  # recommend throughput of 2 workers over 1 (issue 28)
Json = dict[str, Any]


def parse_order(text: str) -> list[int]:
    try:
        order = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts, got {text!r}") from None
    if len(set(order)) < 2 or min(order) < 1 or 1 not in order:
        raise argparse.ArgumentTypeError(f"the order needs 1 worker and at least one other count: {text!r}")
    return order


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="bench_workers.py"
    )
    p.add_argument("--bench-dir", type=Path, default=Path("var/bench"), help="working directory (default var/bench)")
    p.add_argument("--snapshots-dir", type=Path, help="snapshot root (default BENCH_DIR/snapshots)")
    p.add_argument("--out", type=Path, help="results JSON (default BENCH_DIR/workers.json)")
    p.add_argument("--order", type=parse_order, default=[1, 2, 2, 1], help="worker counts, one run each (1,2,2,1)")
    add_wrk_options(p, duration=15.0, warmup=3.0)
    p.add_argument("--visitors", type=int, default=100_000, help="new visitors seeded with 1-3 clicks (100000)")
    add_mix_option(p)
    p.add_argument("--list-size", type=int, default=50_000, help="least paths per wrk run (50000)")
    p.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    add_gateway_options(p)
    return p


def measure(gateway: Gateway, mix: Traffic, path: Path, *, duration: float, args: argparse.Namespace) -> Json:
    """wrk on the recommend mix (its paths written to `path`) at full speed for `duration` seconds."""
    size = max(args.list_size, int(duration * 20_000) + args.connections)  # wrk never wraps around
    kinds = mix.window(size, path)
    pid = gateway.server.pid
    before, cpu_before = gateway_counters(gateway.client), session_cpu_seconds(pid)
    run = run_wrk(
        gateway.base, path, duration=duration, connections=args.connections, threads=args.threads, server_pid=pid
    )
    # how the connections fell to the workers: each process's CPU share over the run (with several
    # workers the supervisor's own is near 0 and left out)
    cpu_after = session_cpu_seconds(pid)
    shares = [(cpu_after[each] - cpu_before.get(each, 0.0)) / duration for each in cpu_after]
    run["worker_cpu"] = sorted((round(share, 2) for share in shares if share >= 0.01), reverse=True)
    run["gateway"] = counter_delta(before, gateway_counters(gateway.client))  # summed over the workers
    mix.consume(kinds, min(run["requests"] + args.connections, size))
    return run


def bench_order(snap: Snapshot, args: argparse.Namespace) -> list[Json]:
    runs: list[Json] = []
    with contextlib.ExitStack() as shared:
        url = store_url(shared, "redis", args.run_dir, args.redis_server)
        mix: Traffic | None = None
        for number, workers in enumerate(args.order):
            work = args.run_dir / f"{number}-{workers}-workers"
            work.mkdir()
            with contextlib.ExitStack() as stack:
                gateway = start_gateway(stack, url, work, args, workers=workers)
                if mix is None:
                    say(f"seeding {args.visitors:,} new visitors with 1-3 clicks")
                    visitors = seed_visitors(gateway.client, snap, args.visitors, random.Random(args.seed))
                    traffic = make_traffic(snap, visitors, args)
                    if problems := preflight(gateway.client, traffic, work):
                        raise RuntimeError(f"preflight: {problems[:3]}")
                    mix = traffic["recommend"]
                if args.warmup > 0:
                    measure(gateway, mix, work / "warmup.txt", duration=args.warmup, args=args)
                say(f"{workers} worker(s): recommend mix at full speed for {args.duration:g}s")
                run = measure(gateway, mix, work / "recommend.txt", duration=args.duration, args=args)
                run["workers"] = workers
                run["ready_seconds"] = gateway.ready_seconds
                say(f"{workers} worker(s): {describe(run)}; CPU per process {run['worker_cpu']}")
                runs.append(run)
    return runs


def summary(runs: list[Json]) -> Json:
    rates: dict[int, list[float]] = {}
    for run in runs:
        rates.setdefault(run["workers"], []).append(run["rate"])
    mean = {workers: sum(values) / len(values) for workers, values in rates.items()}
    ratios = {f"{workers}_vs_1": round(rate / mean[1], 3) for workers, rate in mean.items() if workers != 1}
    return {
        "mean_rate": {str(workers): round(rate, 1) for workers, rate in mean.items()},
        "ratio": ratios,
        "bar": {f"2 workers >= {BAR_TWO_WORKERS}x 1": ratios.get("2_vs_1", 0.0) >= BAR_TWO_WORKERS},
    }


def table(runs: list[Json], result: Json) -> str:
    lines = [f"{'workers':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'srvCPU':>6}  per worker"]
    for run in runs:
        lat = run["latency_ms"]
        each = " ".join(f"{share:.0%}" for share in run["worker_cpu"])
        lines.append(
            f"{run['workers']:7} {run['rate']:8,.0f} {lat['p50']:8.2f} {lat['p99']:8.2f} {run['errors_total']:6} "
            f"{run['server_cpu']:6.0%}  {each}"
        )
    lines.append(f"mean req/s by workers {result['mean_rate']}; ratio {result['ratio']}; bar {result['bar']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.snapshots_dir = args.snapshots_dir or args.bench_dir / "snapshots"
    args.out = args.out or args.bench_dir / "workers.json"
    if not (args.snapshots_dir / "CURRENT").is_file():
        raise SystemExit(f"{args.snapshots_dir} has no CURRENT pointer (bench_gateway.py --build-only makes one)")
    stop_on_sigterm()
    os.chdir(ROOT)
    report: Json = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_average()},
        "settings": {
            "order": args.order,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "visitors": args.visitors,
            "mix_known_new_unknown": list(args.mix),
            "store": "redis",
            "serve_command": args.serve_command,
        },
    }
    snap = Snapshot.load(args.snapshots_dir)
    args.run_dir = new_run_dir(args.bench_dir / "workers-run")
    args.pinned_root = pin_snapshot(snap, args.run_dir / "snapshots")
    # one secret for every gateway of the run: the seeded visitors' pseudonyms must not change
    os.environ["TAILOR_SECRET_FILE"] = str((args.run_dir / "secret").resolve())
    report["code"] = code_version()
    report["snapshot"] = {"version": snap.version, "counts": snap.manifest["counts"]}
    say(f"serving snapshot {snap.version} ({len(snap.item_ids):,} items) from {args.pinned_root}")
    runs = bench_order(snap, args)
    report["runs"] = runs
    report["result"] = result = summary(runs)
    report["machine"]["load_average_at_end"] = load_average()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.out}")
    print(table(runs, result))
    print(footer(report, snap.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
