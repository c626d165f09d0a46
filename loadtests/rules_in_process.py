"""What bench_rules.py's 100 rules cost one answer, in process: no HTTP, no load generator.

Builds a gateway (memory store) on the benchmark shop's snapshot, seeds new visitors with 1-3
clicks, stores bench_rules.py's rule set, then times `Gateway.recommendation` call by call for the
recommend mix (known users, seeded visitors, unknown visitors; every call a visitor not asked for
before, with a page and a device), alternating no rule set and the 100 rules. Prints p50 and mean
per kind of visitor, and the p99 and slowest calls of each run. Wall-clock figures of one shared
machine: compare the rows of one run, not runs.

Back to back, one call finds what the previous one left in the CPU caches. A served gateway does
not: between two of its requests come other requests' work, the event loop, the kernel, idle gaps.
`--evict 4` writes a 4 MB buffer before every timed call (outside the timing), which evicts the
per-core caches, so each call starts cold: the rules' cost measured that way is about what they cost
served (bench_rules.py), where back to back it is about half of that.

    .venv/bin/python loadtests/rules_in_process.py
    .venv/bin/python loadtests/rules_in_process.py --calls 6000 --rounds 3
    .venv/bin/python loadtests/rules_in_process.py --evict 4
    .venv/bin/python loadtests/rules_in_process.py --profile var/rules.prof   # cProfile of the rules' calls
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx2 as httpx
import numpy as np

from gateway import settings as config
from gateway.api.recommend import serving_for
from gateway.app import create_app
from gateway.rules.conditions import Context
from loadtests.bench_rules import rule_set
from loadtests.exact import Snapshot
from loadtests.traffic import new_visitors

KINDS = ("known", "new", "unknown")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="rules_in_process.py"
    )
    p.add_argument("--snapshots", type=Path, default=Path("var/bench/snapshots"), help="(default var/bench/snapshots)")
    p.add_argument("--calls", type=int, default=3000, help="timed calls per run (default 3000)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (no rules, rules) (default 2)")
    p.add_argument("--visitors", type=int, default=20_000, help="new visitors seeded (default 20000)")
    p.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    p.add_argument(
        "--evict",
        type=float,
        default=0.0,
        metavar="MB",
        help="write a buffer of this many MB before every timed call, so that each starts with cold CPU caches "
        "as a served request does (default 0: back to back)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="write a cProfile of the calls made with the rules active to FILE (read it with pstats)",
    )
    return p


async def run(args: argparse.Namespace) -> None:
    snap = Snapshot.load(args.snapshots)
    scratch = Path(tempfile.mkdtemp(prefix="tailor-rules-in-process-"))
    settings = config.resolve(
        environ={},
        overrides={
            "snapshots": str(args.snapshots),
            "store": "memory://",
            "consent_mode": "opt-out",
            "event_log": str(scratch / "events"),
            "rules_dir": str(scratch / "rules"),
            "experiments_dir": str(scratch / "experiments"),
            "secret_file": str(scratch / "secret"),
        },
    )
    app = create_app(settings)
    gateway = app.state.gateway
    await gateway.start()
    rng = random.Random(args.seed)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://in-process") as client:
            visitors, events = new_visitors(snap, args.visitors, rng)
            for start in range(0, len(events), 500):
                (await client.post("/v1/events", json={"events": events[start : start + 500]})).raise_for_status()
            stored = await client.put("/admin/rules", json=rule_set(snap.directory, random.Random(args.seed)))
            stored.raise_for_status()
            version = stored.json()["version"]
            tops = sorted({c.split("/")[0] for c in snap.popular if c})
            devices = ["mobile", "mobile", "desktop", "tablet"]
            population = {"known": list(snap.user_ids), "new": list(visitors)}
            for values in population.values():
                rng.shuffle(values)
            used = dict.fromkeys(KINDS, 0)

            def calls(count: int) -> list[tuple[str, str, Context]]:
                made = []
                for _ in range(count):
                    kind = rng.choices(KINDS, weights=(0.5, 0.3, 0.2))[0]
                    values = population.get(kind)
                    raw = values[used[kind] % len(values)] if values else f"anon-{used[kind]:08d}"
                    used[kind] += 1
                    made.append((kind, raw, Context(rng.choice(devices), None, None, f"/c/{rng.choice(tops)}")))
                return made

            profiler = cProfile.Profile() if args.profile else None
            evicting = np.zeros(int(args.evict * 2**20) // 8, dtype=np.int64)

            async def timed(
                label: str, planned: list[tuple[str, str, Context]], *, show: bool = True, profile: bool = False
            ) -> None:
                times: dict[str, list[float]] = {kind: [] for kind in KINDS}
                for kind, raw, context in planned:
                    if len(evicting):
                        np.add(evicting, 1, out=evicting)  # written through: the per-core caches now hold it
                    rec = serving_for(gateway, [])
                    if profile and profiler is not None:
                        profiler.enable()
                    started = time.perf_counter()
                    await gateway.recommendation(
                        rec, gateway.pseudonym(raw), raw, n=10, categories=[], exclude=[], context=context
                    )
                    times[kind].append(time.perf_counter() - started)
                    if profile and profiler is not None:
                        profiler.disable()
                if not show:
                    return
                every = sorted(t for kind in KINDS for t in times[kind])
                parts = [
                    f"{kind} p50 {sorted(v)[len(v) // 2] * 1e6:.0f} mean {sum(v) / len(v) * 1e6:.0f} us"
                    for kind, v in times.items()
                    if v
                ]
                slowest = ", ".join(f"{t * 1e3:.1f}" for t in every[-3:])
                p99 = every[int(len(every) * 0.99)] * 1e6
                print(f"{label:6} {' | '.join(parts)} | all p99 {p99:.0f} us, slowest {slowest} ms", flush=True)

            for _ in range(args.rounds):
                for rules in (False, True):
                    path = f"/admin/rules/{version}/activate" if rules else "/admin/rules/deactivate"
                    (await client.post(path)).raise_for_status()
                    await timed("warm", calls(300), show=False)  # new plans, first pages
                    await timed("rules" if rules else "none", calls(args.calls), profile=rules)
            if profiler is not None:
                profiler.dump_stats(args.profile)
    finally:
        await gateway.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(run(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
