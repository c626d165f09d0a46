"""Resident memory per visitor of the memory store, for choosing `memory://?max_visitors=N`.

Each shape fills a fresh MemoryStore in a child process with the gateway's default retention and
reports the growth of the process's resident memory divided by the visitors held:

- `typical`: a visitor of a few sessions: 20 events with ids, over 12 items in 3 categories;
- `full`: a visitor at every per-visitor bound (recent events, event ids, counter fields).

    .venv/bin/python loadtests/store_memory.py [--visitors 20000] [--out var/bench/store_memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import uuid
from pathlib import Path

from gateway.store import MemoryStore, Recorded, Retention

EVENT_TYPES = ("view", "view", "view", "add_to_cart", "purchase")


def _events(shape: str, visitor: int, retention: Retention) -> list[Recorded]:
    if shape == "typical":
        count, items, categories = 20, 12, 3
    else:  # enough events and distinct items to reach every bound of the retention
        count = max(retention.keep, retention.ids) + 1
        items, categories = retention.max_counters, 50
    return [
        Recorded(
            EVENT_TYPES[n % len(EVENT_TYPES)],
            1_700_000_000.0 + n * 60,
            item=f"item-{(visitor * 7 + n) % items if shape == 'typical' else n % items}",
            id=str(uuid.uuid4()),
            categories=(f"category-{n % categories}",),
        )
        for n in range(count)
    ]


def _resident_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(shape: str, visitors: int, results: multiprocessing.Queue[tuple[str, float]]) -> None:
    retention = Retention()
    store = MemoryStore(max_visitors=visitors)
    batches = [_events(shape, v, retention) for v in range(min(visitors, 50))]  # built before the baseline
    now = 1_700_100_000.0

    async def fill() -> None:
        for v in range(visitors):
            events = [Recorded(e.event, e.ts, e.item, f"{v}-{e.id}", e.categories) for e in batches[v % len(batches)]]
            await store.record(f"visitor-{v:08d}", events, retention=retention, now=now)

    before = _resident_kb()
    asyncio.run(fill())
    assert len(store) == visitors
    results.put((shape, (_resident_kb() - before) * 1024 / visitors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=20_000, help="visitors per shape (default 20000)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/store_memory.json"))
    args = parser.parse_args()
    results: multiprocessing.Queue[tuple[str, float]] = multiprocessing.Queue()
    figures: dict[str, float] = {}
    for shape, visitors in (("typical", args.visitors), ("full", max(1, args.visitors // 20))):
        child = multiprocessing.Process(target=_measure, args=(shape, visitors, results))
        child.start()
        name, per_visitor = results.get()
        child.join()
        figures[name] = round(per_visitor)
        print(f"{name:8s} {visitors:7d} visitors: {per_visitor / 1024:8.1f} KB resident per visitor")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bytes_per_visitor": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
