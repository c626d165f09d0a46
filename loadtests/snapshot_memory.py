"""What a snapshot costs a gateway process, and how well its index answers new visitors: the time
to load it; the resident memory it adds, split into private memory (Python tables: item ids,
titles, category lists; paid by every worker) and shared page cache (memory-mapped vectors, pools
and the HNSW graph; paid once per host); and recall@10 of new visitors' candidates against exact
search of the whole catalog, with the median time of one index search.

    nice -n 19 python -m loadtests.snapshot_memory var/snapshots [var/bench/snapshots ...]

Loads each root's current snapshot as the gateway does (gateway.snapshot.load_current, checksums
verified). New visitors are made as the gateway makes them: 1-3 clicks on items that have
interactions, folded in with the builder's math (index_builder.model); their candidates are the
index's best `pool` items without the clicked ones, as the gateway asks for them, and an item tied
with the exact 10th best counts as found. Prints one JSON object per root.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from gateway.snapshot import Snapshot, load_current
from index_builder.model import fold_in, profile_confidence


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def new_visitor_recall(snap: Snapshot, visitors: int, pool: int, seed: int = 0) -> tuple[float, float]:
    """Mean recall@10 of new visitors' index candidates against exact search, and the median
    microseconds of one search."""
    rng = np.random.default_rng(seed)
    warm = np.flatnonzero(np.asarray(snap.popularity) > 0)
    click = snap.event_weights.get("click", 1.0)
    recalls, times = [], []
    for _ in range(visitors):
        clicked = np.sort(rng.choice(warm, size=int(rng.integers(1, 4)), replace=False))
        distinct, confidence = profile_confidence(clicked, np.full(len(clicked), click, np.float32), snap.params)
        vector = fold_in(snap.item_vectors, snap.gram, distinct, confidence)
        started = time.perf_counter_ns()
        rows, _ = snap.index.search(vector, pool, distinct)
        times.append(time.perf_counter_ns() - started)
        scores = snap.item_vectors @ vector
        scores[distinct] = -np.inf
        kth = float(np.partition(-scores, 9)[9])
        found = scores[rows[:10]] >= -kth - 1e-5 * max(abs(kth), 1.0)
        recalls.append(float(found.sum()) / 10)
    return float(np.mean(recalls)), float(np.median(times)) / 1000


def measure(root: Path, visitors: int = 300, pool: int = 200) -> dict[str, object]:
    gc.collect()
    before = {field: _status_mb(field) for field in ("RssAnon", "RssFile")}
    started = time.perf_counter()
    snap, _ = load_current(root)
    load_s = time.perf_counter() - started
    recall, search_us = new_visitor_recall(snap, visitors, pool)  # also makes the pages a search touches resident
    gc.collect()
    private = _status_mb("RssAnon") - before["RssAnon"]
    shared = _status_mb("RssFile") - before["RssFile"]
    items = len(snap.item_ids)
    return {
        "root": str(root),
        "version": snap.version,
        "items": items,
        "users": len(snap.user_row),
        "index": snap.method,
        "load_seconds": round(load_s, 1),
        "private_mb": round(private, 1),
        "shared_mb": round(shared, 1),
        "private_mb_per_100k_items": round(private / items * 100_000, 1),
        "shared_mb_per_100k_items": round(shared / items * 100_000, 1),
        "new_visitors": visitors,
        "new_visitor_recall_at_10": round(recall, 4),
        "index_search_median_us": round(search_us, 1),
        "pool": pool,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", type=Path, nargs="+", help="snapshot roots (each with a CURRENT pointer)")
    args = parser.parse_args(argv)
    for root in args.roots:
        print(json.dumps(measure(root)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
