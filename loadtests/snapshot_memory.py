"""What a snapshot costs a gateway process: the time to load it and the resident memory it adds,
split into private memory (Python tables: item ids, titles, category sets; paid by every worker)
and shared page cache (memory-mapped vectors, pools and the HNSW graph; paid once per host).

    nice -n 19 python -m loadtests.snapshot_memory var/snapshots [var/bench/snapshots ...]

Loads each root's current snapshot as the gateway does (gateway.snapshot.load_current, checksums
verified), then answers a few hundred new-visitor queries through its index so the pages a query
touches are resident. Prints one JSON object per root.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from gateway.snapshot import load_current


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(root: Path, queries: int = 300) -> dict[str, object]:
    gc.collect()
    before = {field: _status_mb(field) for field in ("RssAnon", "RssFile")}
    started = time.perf_counter()
    snap, _ = load_current(root)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    for row in rng.choice(len(snap.user_vectors), size=min(queries, len(snap.user_vectors)), replace=False):
        snap.index.search(snap.user_vectors[row], 200)
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
