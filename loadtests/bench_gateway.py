"""Capacity, latency and recall of the gateway on a 100k-item shop, per store backend, in one run.

For each store (memory, then Redis on its own throwaway redis-server) the harness starts
`tailor serve` with one worker on a free loopback port, seeds new visitors with 1-3 recent clicks
through POST /v1/events, then drives it with wrk (loadtests/wrk/paths.lua) for a fixed time each:

    healthz     GET /healthz, constant JSON: the framework's ceiling on this machine
    recommend   GET /v1/recommend over a shuffled list: known users, seeded new visitors, unknown visitors
    similar     GET /v1/items/{id}/similar for random items
    half rate   /v1/recommend paced at half the measured maximum: latency when the server is not saturated

and finally compares served results with exact search (recall@10): known users against
item_vectors @ user_vector without their seen items; seeded visitors against the same fold-in the
builder uses (index_builder.model), without the items they clicked.

    .venv/bin/python loadtests/bench_gateway.py                  # builds var/bench/ on first use
    .venv/bin/python loadtests/bench_gateway.py --stores memory --duration 5

Results go to var/bench/gateway.json; a compact table is printed at the end. wrk shares the two
cores with the server (one wrk thread by default), so compare endpoints within a run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import numpy.typing as npt

from loadtests.exact import Snapshot, measure_recall
from loadtests.harness import (
    ROOT,
    add_gateway_options,
    add_wrk_options,
    describe,
    footer,
    load_average,
    run_wrk,
    say,
    start_gateway,
    stop_on_sigterm,
)
from loadtests.traffic import (
    add_mix_option,
    counter_delta,
    gateway_counters,
    make_traffic,
    preflight,
    seed_visitors,
)

STORES = ("memory", "redis")
RECALL_K = 10

# The bars this benchmark reports against.
BAR_RECOMMEND_VS_HEALTHZ = 0.3
BAR_P99_AT_HALF_MS = 10.0
BAR_DEGRADED = 0.01  # share of answers that fell back to popular items because of the store

Floats = npt.NDArray[np.float32]
Rows = npt.NDArray[np.intp]


# --------------------------------------------------------------------------------------------- data


def _run_measured(command: Sequence[str], log: Path) -> dict[str, Any]:
    """Run a command to completion with output to `log`; its wall time and its own peak RSS."""
    say(f"$ {shlex.join(command)}  (log: {log})")
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}:\n" + "\n".join(tail))
    # ru_maxrss is in KiB on Linux
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "command": shlex.join(command),
    }


def ensure_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """Make the shop and the snapshot unless they exist; what it cost, now or when it was made."""
    shop: Path = args.shop_dir
    snapshots: Path = args.snapshots_dir
    info_path: Path = args.bench_dir / "build_info.json"
    info: dict[str, Any] = json.loads(info_path.read_bytes()) if info_path.is_file() else {}
    tailor = [sys.executable, "-m", "tailor"]
    shop_ready = all((shop / name).is_file() for name in ("items.jsonl", "events.csv", "users.csv"))
    current = snapshots / "CURRENT"
    snapshot_ready = current.is_file() and (snapshots / current.read_text().strip() / "manifest.json").is_file()
    if args.rebuild:
        shop_ready = snapshot_ready = False
    if args.skip_build and not (shop_ready and snapshot_ready):
        raise SystemExit(f"--skip-build, but {shop} or {snapshots} is incomplete")
    args.bench_dir.mkdir(parents=True, exist_ok=True)
    if not shop_ready:
        say(f"making the synthetic shop in {shop}")
        sizes = ["--users", str(args.users), "--items", str(args.items), "--events", str(args.events)]
        command = [*tailor, "synth", "--out", str(shop), *sizes, "--seed", str(args.seed)]
        info = {"synth": _run_measured(command, args.bench_dir / "synth.log")}
        info["synth"]["sizes"] = {"users": args.users, "items": args.items, "events": args.events}
        snapshot_ready = False  # a new shop needs a new snapshot
    else:
        say(f"reusing the shop in {shop}")
    if not snapshot_ready:
        say(f"building the snapshot into {snapshots} (this takes minutes at 100k items)")
        command = [
            *tailor,
            "build",
            "--events",
            str(shop / "events.csv"),
            "--items",
            str(shop / "items.jsonl"),
            "--out",
            str(snapshots),
            "--max-trials",
            str(args.max_trials),
            "--force",
        ]
        info["build"] = _run_measured(command, args.bench_dir / "build.log")
    else:
        say(f"reusing the snapshot in {snapshots}")
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def new_run_dir(parent: Path, keep: int = 5) -> Path:
    """A directory of this run's own (concurrent runs must not share request lists or a pinned root);
    only the newest `keep` runs' directories are kept."""
    parent.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in parent.iterdir() if p.is_dir() and p.name[:1].isdigit())
    for stale in old[: max(0, len(old) - keep + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    run = parent / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    run.mkdir()
    return run


def code_version() -> dict[str, Any]:
    """The commit of the code under test and whether gateway/ or index_builder/ differ from it."""

    def git(*command: str) -> str:
        try:
            done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return ""
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "gateway", "index_builder", "tailor")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": dirty.splitlines()}


def pin_snapshot(snap: Snapshot, root: Path) -> Path:
    """A private snapshot root whose CURRENT names `snap`, so the gateway under test keeps serving the
    same version even if someone publishes a new one meanwhile. Its files are hard links (no copy):
    a gateway refuses a version directory that is a symlink out of its root."""
    root.mkdir(parents=True)
    shutil.copytree(snap.directory.resolve(), root / snap.version, copy_function=os.link)
    (root / "CURRENT").write_text(snap.version + "\n")
    return root


# ------------------------------------------------------------------------------------------- a store


def bench_store(store: str, snap: Snapshot, args: argparse.Namespace) -> dict[str, Any]:
    work = args.run_dir / store
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"store": store}
    runs: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        server, base, client, log, result["ready_seconds"] = start_gateway(stack, store, work, args)
        say(f"{store}: ready in {result['ready_seconds']:.1f}s; seeding {args.visitors} new visitors with 1-3 clicks")
        started = time.perf_counter()
        visitors = seed_visitors(client, snap, args.visitors, random.Random(args.seed))
        result["seed"] = {
            "visitors": len(visitors),
            "events": sum(len(v) for v in visitors.values()),
            "seconds": round(time.perf_counter() - started, 2),
        }
        traffic = make_traffic(snap, visitors, args)
        result["preflight_problems"] = problems = preflight(client, traffic, work)
        for problem in problems[:5]:
            say(f"{store}: PREFLIGHT {problem}")

        def wrk(name: str, *, label: str, rate: float | None = None, duration: float = args.duration) -> dict[str, Any]:
            if server.poll() is not None:
                raise RuntimeError(f"the gateway exited with {server.returncode}; see {log}")
            mix = traffic[name]
            # enough paths that wrk never wraps around within the run (a repeat could come from a cache):
            # no endpoint outruns /healthz, so its measured rate bounds every later run
            ceiling = rate or (runs["healthz"]["rate"] if "healthz" in runs else 20_000.0)
            size = 1 if name == "healthz" else max(args.list_size, int(duration * ceiling * 1.25) + args.connections)
            path = work / f"{label}.txt"
            kinds = mix.window(size, path)
            before = gateway_counters(client)
            run = run_wrk(
                base,
                path,
                duration=duration,
                connections=args.connections,
                threads=args.threads,
                server_pid=server.pid,
                rate=rate,
            )
            run["gateway"] = delta = counter_delta(before, gateway_counters(client))
            # answers from popular items because the store or the snapshot let the gateway down (not the
            # expected cold-start of an unknown visitor): throughput bought with them is not personalization
            answered = sum(v for k, v in delta["responses"].items() if not k.startswith("metrics"))
            degraded = sum(v for k, v in delta["fallbacks"].items() if k != "cold-start")
            run["degraded_fallbacks"] = int(degraded)
            run["degraded_share"] = round(degraded / answered, 4) if answered else 0.0
            if name != "healthz":
                # in-flight requests at the end were sent too
                run["sent_by_kind"] = mix.consume(kinds, min(run["requests"] + args.connections, size))
                if mix.reused:
                    run["population_reused"] = mix.reused
            return run

        if args.warmup > 0:
            say(f"{store}: warming up on the recommend mix for {args.warmup:g}s")
            result["warmup"] = wrk("recommend", label="warmup", duration=args.warmup)
        for name in ("healthz", "recommend", "similar"):
            say(f"{store}: {name} at full speed for {args.duration:g}s ({args.connections} connections)")
            runs[name] = wrk(name, label=name)
            say(f"{store}: {name:9} {describe(runs[name])}")
        target = args.half_rate or runs["recommend"]["rate"] / 2
        # wrk's delay() leaves each connection idle for connections/rate seconds on average *plus* the
        # response time, so the achieved rate falls short; short calibration runs measure by how much.
        # Two of them: the first may still share the server with the previous run's backlog (at 1M
        # items each similar-items answer takes a second), and then asks too much.
        factor = 1.0
        for _ in range(2):
            calibration = wrk("recommend", label="calibration", rate=target * factor, duration=min(5.0, args.duration))
            factor = min(2.0, factor * target / max(calibration["rate"], 1.0))
        say(f"{store}: recommend paced ({target:,.0f} req/s; asking {target * factor:,.0f})")
        runs["recommend_half"] = wrk("recommend", label="recommend_half", rate=target * factor)
        runs["recommend_half"]["target_rate"] = round(target, 1)
        say(f"{store}: half rate {describe(runs['recommend_half'])}")
        # The control: the constant endpoint paced at the same rate shows this machine's own latency
        # floor (scheduler, wrk, loopback) under which no endpoint's p99 can go.
        runs["healthz_half"] = wrk("healthz", label="healthz_half", rate=target * factor)
        runs["healthz_half"]["target_rate"] = round(target, 1)
        say(f"{store}: healthz at the same rate {describe(runs['healthz_half'])}")
        if args.breakdown:
            for kind in ("known", "new", "unknown"):
                name = f"recommend_{kind}"
                say(f"{store}: /v1/recommend for {kind} visitors only, full speed for {args.breakdown_duration:g}s")
                runs[name] = wrk(name, label=name, duration=args.breakdown_duration)
                say(f"{store}: {kind:9} {describe(runs[name])}")
        result["runs"] = runs
        time.sleep(2.0)  # let a store circuit breaker opened under load close again
        say(f"{store}: recall@10 against exact search ({args.recall_samples} known users, as many new visitors)")
        result["recall"] = measure_recall(client, snap, visitors, args.recall_samples, random.Random(args.seed + 1))
        with contextlib.suppress(httpx.HTTPError):
            (work / "metrics.txt").write_text(client.get("/metrics").text)
        result["server_alive_at_end"] = server.poll() is None
    healthz, recommend = runs["healthz"]["rate"], runs["recommend"]["rate"]
    ratio = recommend / healthz if healthz else 0.0
    result["recommend_vs_healthz"] = round(ratio, 3)
    result["bars"] = {
        f"recommend >= {BAR_RECOMMEND_VS_HEALTHZ}x healthz": ratio >= BAR_RECOMMEND_VS_HEALTHZ,
        f"p99 < {BAR_P99_AT_HALF_MS:g} ms at half max rate": runs["recommend_half"]["latency_ms"]["p99"]
        < BAR_P99_AT_HALF_MS,
        "no errors": all(run["errors_total"] == 0 for run in runs.values()) and not problems,
        f"store fallbacks <= {BAR_DEGRADED:.0%} of answers": all(
            run["degraded_share"] <= BAR_DEGRADED for run in runs.values()
        ),
    }
    return result


# ------------------------------------------------------------------------------------------- report


LABELS = {
    "healthz": "healthz",
    "recommend": "recommend",
    "similar": "similar",
    "recommend_half": "rec @half",
    "healthz_half": "hz @half",
    "recommend_known": " known",
    "recommend_new": " new",
    "recommend_unknown": " unknown",
}


def cache_hits(run: dict[str, Any]) -> str:
    cache = run.get("gateway", {}).get("candidate_cache", {})
    total = sum(cache.values())
    return f"{cache.get('hit', 0) / total:.0%}" if total else "-"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'store':7} {'run':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9':>8} {'errors':>6} "
        f"{'srvCPU':>6} {'cache':>5} {'degr':>5}"
    ]
    for result in results:
        for name, label in LABELS.items():
            if name not in result["runs"]:
                continue
            run = result["runs"][name]
            lat = run["latency_ms"]
            shown = label + ("*" if run.get("population_reused") else "")
            lines.append(
                f"{result['store']:7} {shown:10} {run['rate']:8,.0f} {lat['p50']:8.2f} {lat['p99']:8.2f} "
                f"{lat['p99_9']:8.2f} {run['errors_total']:6} {run['server_cpu']:6.0%} {cache_hits(run):>5} "
                f"{run['degraded_share']:5.0%}"
            )
        half = result["runs"]["recommend_half"]
        recall = result["recall"]
        lines.append(
            f"{'':7} recommend/healthz {result['recommend_vs_healthz']:.2f} (bar >= {BAR_RECOMMEND_VS_HEALTHZ}); "
            f"half rate: target {half['target_rate']:,.0f}, achieved {half['rate']:,.0f} req/s, "
            f"p99 {half['latency_ms']['p99']:.2f} ms (bar < {BAR_P99_AT_HALF_MS:g})"
        )
        lines.append(
            f"{'':7} recall@10 vs exact: known {recall['known']['recall_at_10']}, new {recall['new']['recall_at_10']} "
            f"(vs exact over in-stock items only: {recall['known']['recall_at_10_vs_exact_in_stock']}, "
            f"{recall['new']['recall_at_10_vs_exact_in_stock']})"
        )
        fallbacks = {kind: recall[kind]["fallbacks"] for kind in ("known", "new", "unknown")}
        lines.append(f"{'':7} fallback field by kind: {fallbacks}")
        verdicts = ", ".join(f"{bar}: {'PASS' if ok else 'FAIL'}" for bar, ok in result["bars"].items())
        lines.append(f"{'':7} {verdicts}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="bench_gateway.py"
    )
    p.add_argument("--bench-dir", type=Path, default=Path("var/bench"), help="working directory (default var/bench)")
    p.add_argument("--shop-dir", type=Path, help="synthetic shop directory (default BENCH_DIR/shop)")
    p.add_argument("--snapshots-dir", type=Path, help="snapshot root (default BENCH_DIR/snapshots)")
    p.add_argument("--out", type=Path, help="results JSON (default BENCH_DIR/gateway.json)")
    p.add_argument("--skip-build", action="store_true", help="fail instead of making a missing shop or snapshot")
    p.add_argument("--rebuild", action="store_true", help="make the shop and the snapshot again even if present")
    p.add_argument("--build-only", action="store_true", help="make or reuse the shop and snapshot, then stop")
    p.add_argument("--users", type=int, default=20_000, help="shop size when making it (default 20000)")
    p.add_argument("--items", type=int, default=100_000, help="catalog size when making it (default 100000)")
    p.add_argument("--events", type=int, default=1_000_000, help="events when making the shop (default 1000000)")
    p.add_argument("--max-trials", type=int, default=2, help="tuner budget when building (default 2)")
    p.add_argument("--stores", default="memory,redis", help="comma-separated store backends (default memory,redis)")
    add_wrk_options(p, duration=15.0, warmup=3.0)
    p.add_argument(
        "--visitors",
        type=int,
        default=200_000,
        help="new visitors seeded with 1-3 clicks (200000: enough that the runs do not ask for one twice)",
    )
    p.add_argument("--breakdown-duration", type=float, default=5.0, help="seconds per breakdown run (default 5)")
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the extra full-speed /v1/recommend runs for each kind of visitor alone",
    )
    add_mix_option(p)
    p.add_argument(
        "--half-rate",
        type=float,
        help="pace the latency run at this rate instead of half the measured maximum (to compare stores "
        "at one rate, or when the maximum was inflated by fallback answers)",
    )
    p.add_argument(
        "--list-size",
        type=int,
        default=50_000,
        help="least paths per wrk run (50000)",
    )
    p.add_argument("--recall-samples", type=int, default=300, help="users and visitors checked for recall (300)")
    p.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    p.add_argument("--serve-config", type=Path, help="passed to the gateway as --config")
    add_gateway_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.shop_dir = args.shop_dir or args.bench_dir / "shop"
    args.snapshots_dir = args.snapshots_dir or args.bench_dir / "snapshots"
    args.out = args.out or args.bench_dir / "gateway.json"
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := set(stores) - set(STORES):
        raise SystemExit(f"unknown store(s) {sorted(unknown)}; choose from {STORES}")
    for tool in ("wrk", *(["redis-server"] if "redis" in stores else [])):
        binary = args.redis_server if tool == "redis-server" else tool
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} not found on PATH")
    stop_on_sigterm()
    os.chdir(ROOT)

    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_average()},
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "server_workers": 1,
            "visitors": args.visitors,
            "mix_known_new_unknown": list(args.mix),
            "list_size": args.list_size,
            "recall_samples": args.recall_samples,
            "serve_command": args.serve_command,
        },
        "build": ensure_snapshot(args),
    }
    if args.build_only:
        print(json.dumps(report["build"], indent=2))
        return 0
    say("loading the snapshot for the exact-search reference")
    snap = Snapshot.load(args.snapshots_dir)
    args.run_dir = new_run_dir(args.bench_dir / "run")
    say(f"working files (request lists, server logs, /metrics) in {args.run_dir}")
    args.pinned_root = pin_snapshot(snap, args.run_dir / "snapshots")
    report["code"] = code_version()
    say(
        f"serving snapshot {snap.version} from {args.pinned_root} (pinned: a build publishing meanwhile cannot swap it)"
    )
    report["snapshot"] = {
        "version": snap.version,
        "counts": snap.manifest["counts"],
        "index": {k: v for k, v in snap.manifest["index"].items() if k != "trials"},
        "model": snap.manifest["parameters"]["model"],
        "build": snap.manifest["parameters"].get("build"),
    }
    results: list[dict[str, Any]] = []
    for store in stores:
        results.append(bench_store(store, snap, args))
    report["stores"] = results
    report["machine"]["load_average_at_end"] = load_average()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["peak_rss_mb_harness"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.out}")
    print(table(results))
    runs = [run for result in results for run in result["runs"].values()]
    if reused := sorted({kind for run in runs for kind in run.get("population_reused", [])}):
        print(f"* by this run the fresh {'/'.join(reused)} had run out; some were asked for again (a cache may answer)")
    print(footer(report, snap.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
