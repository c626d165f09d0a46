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
import contextlib
import gc
import json
import os
import random
import resource
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import websockets

from loadtests.bench_gateway import code_version, ensure_snapshot, new_run_dir, pin_snapshot
from loadtests.exact import Snapshot
from loadtests.harness import (
    ROOT,
    add_gateway_options,
    add_wrk_options,
    footer,
    load_average,
    run_wrk,
    say,
    start_gateway,
    stop_on_sigterm,
)
from loadtests.stream_push import Json, bench_push
from loadtests.traffic import counter_delta, gateway_counters

STORES = ("memory", "redis")
EVENT_TYPES = ("view", "click", "add_to_cart")
SECRET_ENV = "TAILOR_SECRET"
# the small shop made when no snapshot exists yet (var/bench/stream-demo/)
DEMO_SIZES = {"users": 2_000, "items": 5_000, "events": 100_000}


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
    add_wrk_options(p, duration=15.0, warmup=2.0, scope="ingestion: ")
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
    stop_on_sigterm()
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
