"""The live catalog across two gateway nodes on one Redis, in one run (docs/catalog.md):

1. lag: 1,000 new items, one at a time, each PUT on node A with the content of a built item, then
   node B's `GET /v1/items/{related}/similar?n=5` polled as fast as one client can until the new
   item is in it (`related`: a built item whose list the new item enters at rank 3 or better by
   the snapshot's vectors, by a margin: no tie). The lag is from just before the PUT to the first answer that has it;
   p50, p99 and max over the changes. Each new item is retired again once seen (not timed), so
   the next one competes with the built items only.
2. bulk import: 50,000 new items POSTed to node A in calls of 1,000 (one client, one call at a
   time), with node B's items/s catching up measured too (until B serves the last one); and
   `GET /v1/recommend` on node A (known users and cold visitors, half each) with wrk, first
   without the import, then while it runs: p99 during over p99 without.

The shop is synthetic (20,000 items, 200,000 events, built once into --bench-dir and reused); a
build with the content model is needed (older snapshots have none: added items get no vector).

    nice -n 19 .venv/bin/python loadtests/bench_catalog.py            # about 3 minutes after the build
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np

from gateway.snapshot import Snapshot, load
from index_builder import snapshot as published
from loadtests.bench_gateway import code_version, new_run_dir, pin_snapshot
from loadtests.harness import (
    ROOT,
    add_gateway_options,
    free_port,
    load_average,
    run_wrk,
    running,
    say,
    serve_command,
    wait_ready,
    wait_redis,
)


def ensure_snapshot(bench: Path) -> Path:
    shop, snapshots = bench / "shop", bench / "snapshots"
    tailor = [sys.executable, "-m", "tailor"]
    if not (shop / "events.csv").is_file():
        say("synthesising the shop (20,000 items)")
        command = [*tailor, "synth", "--out", str(shop), "--users", "5000", "--items", "20000"]
        subprocess.run([*command, "--events", "200000", "--seed", "5"], check=True, cwd=ROOT)
    if published.current_version(snapshots) is None:
        say("building its snapshot (a few minutes)")
        command = [*tailor, "build", "--events", str(shop / "events.csv"), "--items", str(shop / "items.jsonl")]
        subprocess.run([*command, "--out", str(snapshots), "--max-trials", "1", "--force"], check=True, cwd=ROOT)
    version = published.current_version(snapshots)
    assert version is not None
    return snapshots / version


def templates(snap: Snapshot, count: int, rng: random.Random) -> list[tuple[list[str], list[str], str]]:
    """(categories, tags, related) for new items: content of a built item, and a built item whose
    similar list the new item would enter in the top 3."""
    assert snap.content is not None and snap.neighbour_scores is not None, "a snapshot with the content model"
    found: list[tuple[list[str], list[str], str]] = []
    rows = list(range(len(snap.item_ids)))
    rng.shuffle(rows)
    serving = snap.stock != 0
    seen: set[str] = set()
    for row in rows:
        content = (snap.categories[row], sorted(snap.item_tags[row]))
        if repr(content) in seen:
            continue
        seen.add(repr(content))
        vector = snap.content.vectors([content])[0]
        norm = float(np.linalg.norm(vector))
        if norm == 0:
            continue
        cosine = snap.unit_vectors @ (vector / norm)
        beats = np.flatnonzero((cosine > snap.neighbour_scores[:, 2] + 1e-3) & serving)
        if len(beats):
            found.append((*content, snap.item_ids[int(beats[np.argmax(cosine[beats])])]))
            if len(found) == count:
                break
    return found


def percentiles(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


def measure_lag(a: httpx.Client, b: httpx.Client, snap: Snapshot, changes: int, rng: random.Random) -> dict[str, Any]:
    lags: list[float] = []
    polls = 0
    chosen = templates(snap, changes, rng)
    for number, (categories, tags, related) in enumerate(chosen):
        item = f"lag-{number}"
        started = time.perf_counter()
        body = {"title": item, "categories": categories, "tags": tags, "stock": 5}
        assert a.put(f"/v1/items/{item}", json=body).status_code == 200
        deadline = started + 10
        while True:
            polls += 1
            answer = b.get(f"/v1/items/{related}/similar", params={"n": 5}).json()
            if any(entry["id"] == item for entry in answer["items"]):
                lags.append(time.perf_counter() - started)
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{item} not in the similar items of {related} on node B after 10 s")
        # Retired again (untimed), so the next new item competes with the built items only.
        assert a.delete(f"/v1/items/{item}").status_code == 200
        if (number + 1) % 100 == 0:
            say(f"lag: {number + 1}/{len(chosen)} changes, p99 so far {percentiles(lags)['p99_ms']} ms")
    return {**percentiles(lags), "polls_per_change": round(polls / len(lags), 1)}


def bulk_rows(snap: Snapshot, count: int, rng: random.Random) -> list[bytes]:
    """Calls of 1,000 new items with the content of random built items, as JSON bodies."""
    rows = [
        {
            "item_id": f"bulk-{n}",
            "title": f"Bulk {n}",
            "categories": snap.categories[row],
            "tags": sorted(snap.item_tags[row]),
            "price": round(rng.uniform(1, 500), 2),
            "stock": rng.randint(1, 50),
            "colour": rng.choice(["red", "green", "blue"]),
        }
        for n, row in enumerate(rng.choices(range(len(snap.item_ids)), k=count))
    ]
    return [json.dumps(rows[start : start + 1000]).encode() for start in range(0, count, 1000)]


def recommend_paths(snap: Snapshot, path: Path, rng: random.Random, count: int = 50_000) -> Path:
    users = list(snap.user_row)
    lines = [
        f"/v1/recommend?user={rng.choice(users)}&n=10" if n % 2 else f"/v1/recommend?visitor=cold-{n}&n=10"
        for n in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    directory = ensure_snapshot(args.bench_dir)
    snap = load(directory)
    run = new_run_dir(args.bench_dir / "run")
    args.pinned_root = pin_snapshot(snap, run / "snapshots")  # type: ignore[arg-type]
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_start": load_average(),
        "code": code_version(),
        "snapshot": {"version": snap.version, "items": len(snap.item_ids)},
    }
    with contextlib.ExitStack() as stack:
        port = free_port()
        command = [args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        redis = stack.enter_context(running(command, run / "redis.log", "redis-server"))
        wait_redis(port, redis)
        url = f"redis://127.0.0.1:{port}/0"
        nodes = []
        for name in ("a", "b"):
            node_dir = run / name
            node_dir.mkdir()
            node_port = free_port()
            proc = stack.enter_context(
                running(serve_command(args, url, node_port), node_dir / "serve.log", f"node {name}")
            )
            client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{node_port}", timeout=30))
            wait_ready(client, proc, node_dir / "serve.log", args.ready_timeout)
            nodes.append((proc, client, f"http://127.0.0.1:{node_port}"))
        (proc_a, a, url_a), (_, b, _) = nodes

        say(f"lag over {args.changes} changes")
        report["lag"] = measure_lag(a, b, snap, args.changes, rng)

        paths = recommend_paths(snap, run / "recommend.txt", rng)
        wrk = {"duration": args.duration, "connections": args.connections, "threads": 1, "server_pid": proc_a.pid}
        say("recommend on node A without an import")
        run_wrk(url_a, paths, **{**wrk, "duration": 3.0})  # warm-up, not recorded
        without = run_wrk(url_a, paths, **wrk)

        bodies = bulk_rows(snap, args.bulk, rng)
        done = threading.Event()
        timing: dict[str, float] = {}

        def importer() -> None:
            with httpx.Client(base_url=url_a, timeout=60) as client:
                started = time.perf_counter()
                for body in bodies:
                    answer = client.post("/v1/items", content=body, headers={"content-type": "application/json"})
                    assert answer.status_code == 200 and not answer.json()["rejected"], answer.text[:300]
                timing["stored_s"] = time.perf_counter() - started
                say(f"import: {args.bulk:,} items stored in {timing['stored_s']:.1f} s")
                last = f"bulk-{args.bulk - 1}"
                while True:
                    seen = b.get(f"/v1/items/{last}")
                    if seen.status_code == 200 and seen.json()["served"]:
                        break
                    time.sleep(0.01)
                timing["served_on_b_s"] = time.perf_counter() - started
                say(f"import: all served on node B after {timing['served_on_b_s']:.1f} s")
            done.set()

        say(f"recommend on node A while {args.bulk:,} items are imported")
        thread = threading.Thread(target=importer, name="import")
        thread.start()
        during = run_wrk(url_a, paths, **wrk)
        import_running_at_end = not done.is_set()
        thread.join()
        report["import"] = {
            "items": args.bulk,
            "calls": len(bodies),
            "stored_s": round(timing["stored_s"], 2),
            "items_per_s_stored": round(args.bulk / timing["stored_s"]),
            "served_on_node_b_s": round(timing["served_on_b_s"], 2),
            "items_per_s_served_on_node_b": round(args.bulk / timing["served_on_b_s"]),
            "import_ran_for_the_whole_wrk_run": import_running_at_end,
        }
        report["recommend"] = {
            "without_import": without,
            "during_import": during,
            "p99_ratio_during_over_without": round(during["latency_ms"]["p99"] / without["latency_ms"]["p99"], 2),
            "rate_ratio_during_over_without": round(during["rate"] / without["rate"], 2),
        }
    report["load_average_at_end"] = load_average()
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-dir", type=Path, default=Path("var/bench-catalog"), help="working directory")
    p.add_argument("--changes", type=int, default=1000, help="new items for the lag (default 1000)")
    p.add_argument("--bulk", type=int, default=50_000, help="items imported in bulk (default 50000)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    add_gateway_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = bench(args)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    lag, imported, recommend = report["lag"], report["import"], report["recommend"]
    print(
        f"lag A->B over {lag['count']} new items: p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms, "
        f"max {lag['max_ms']} ms\n"
        f"bulk import of {imported['items']:,}: {imported['items_per_s_stored']:,} items/s stored, "
        f"{imported['items_per_s_served_on_node_b']:,} items/s served on node B\n"
        f"recommend p99 during the import / without: {recommend['p99_ratio_during_over_without']}x "
        f"(req/s {recommend['rate_ratio_during_over_without']}x)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
