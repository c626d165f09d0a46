"""What 100 active business rules cost /v1/recommend, against no rules, on one gateway, in one run.

One `tailor serve` worker (memory store by default) on the benchmark shop (the 100k-item snapshot
bench_gateway.py builds), with new visitors seeded with 1-3 clicks. wrk drives the usual recommend
mix (known users, seeded visitors, unknown visitors); every run gets visitors no earlier run asked
for. Each side runs twice, in the order none, rules, rules, none (ABBA), so a drift of the shared
machine in either direction hits both sides alike, and neither always runs second:

    none  full speed      no rule set active
    rules full speed      100 rules + 5 predicate segments active (PUT /admin/rules?activate=true)
    rules full speed      again
    none  full speed      again
    none  paced           at half the with-rules maximum: latency when neither side is saturated
    rules paced           at the same rate
    rules paced           again
    none  paced           again

Every switch is followed by `--settle` seconds (3) of unrecorded traffic at the next run's rate, so
runs compare steady states (plans made, remembered answers, caches warm) rather than the first
seconds after an activation.

The 100 rules are scoped the way a shop's are: site-wide ones (stock filter, diversity cap, banner,
some boosts, buries and filters), category-page ones (pins, cross-sell injections, boosts, banners:
`page` is /c/<category>) and audience ones (segments over counters, recency, session, device, time
of day), plus 5 predicate segments, so every request reads the visitor's counters. Every request
carries a page and a device, with and without rules alike. The ratios reported: none / rules for
throughput (what the rules cost in CPU), rules / none for p50 and p99 at the paced rate (what a
visitor waits), each side's two runs averaged; the ratio of each pair (first none and first rules,
second and second) is reported as well. Results go to var/bench/rules.json.

    .venv/bin/python loadtests/bench_rules.py
    .venv/bin/python loadtests/bench_rules.py --duration 5 --stores memory,redis
    .venv/bin/python loadtests/bench_rules.py --pairs 4      # ABBA twice: a steadier average

The paced p50 of one pair moves by tens of percent on a shared two-core machine; `--pairs 4` runs
each side four times (none, rules, rules, none, none, rules, rules, none) and averages all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtests.bench_gateway import code_version, ensure_snapshot, new_run_dir, pin_snapshot
from loadtests.exact import Snapshot
from loadtests.harness import (
    add_gateway_options,
    add_wrk_options,
    describe,
    load_average,
    run_wrk,
    say,
    start_gateway,
)
from loadtests.traffic import make_traffic, seed_visitors

BAR_LATENCY_RATIO = 1.3
RULES = 100


def rule_set(directory: Path, rng: random.Random, count: int = RULES) -> dict[str, Any]:
    """`count` rules over the snapshot's catalog (items.json), deterministic for `rng`, scoped the way
    a shop's rules are: a few site-wide (stock filter, diversity cap, banners), most for a category
    page (its pins, cross-sells and boosts), for a segment, a device or a time of day."""
    items = json.loads((directory / "items.json").read_bytes())
    tops = sorted({c.split("/")[0] for item in items for c in item.get("categories", [])})
    leaves = sorted({c for item in items for c in item.get("categories", [])})
    by_top: dict[str, list[str]] = {}
    for item in items:
        for category in item.get("categories", [])[:1]:
            by_top.setdefault(category.split("/")[0], []).append(str(item["item_id"]))
    tags = sorted({t for item in items for t in item.get("tags", [])}) or ["none"]

    def page(top: str) -> dict[str, Any]:
        return {"context": {"page": [f"/c/{top}"]}}

    audiences: list[dict[str, Any]] = [
        {"segment": "browsers"},
        {"segment": "buyers"},
        {"segment": "loyal"},
        {"segment": "new-visitors"},
        {"counter": {"event": "purchase", "window": "30d", "at_most": 0}},
        {"recency": {"event": "add_to_cart", "within": "1h"}},
        {"session": {"pages_at_least": 3}},
        {"context": {"device": ["mobile"]}},
        {"context": {"hours": list(range(18, 23))}},
        {"context": {"weekdays": ["sat", "sun"]}},
    ]
    rules: list[dict[str, Any]] = [
        {"id": "in-stock-only", "priority": 100, "actions": [{"type": "filter", "items": {"in_stock": False}}]},
        {"id": "diversity", "priority": 90, "actions": [{"type": "cap", "per_category": 3}]},
        {"id": "site-banner", "actions": [{"type": "attach", "slot": "top", "content": {"text": "Free shipping"}}]},
    ]
    # (kind, scope): 40% for a category page, 35% for an audience, the rest site-wide.
    plan = [("pin", "page")] * 10 + [("inject", "page")] * 10 + [("boost", "page")] * 10 + [("attach", "page")] * 7
    plan += [("boost", "audience")] * 15 + [("bury", "audience")] * 8 + [("filter", "audience")] * 5
    plan += [("attach", "audience")] * 7 + [("boost", "site")] * 10 + [("bury", "site")] * 10
    plan += [("filter", "site")] * 5
    rng.shuffle(plan)
    for kind, scope in plan[: count - len(rules)]:
        index = len(rules)
        top = rng.choice(tops)
        match = rng.choice(
            [
                {"categories": [rng.choice(leaves)]},
                {"tags": [rng.choice(tags)]},
                {"price_at_least": round(rng.uniform(100, 500), 2)},
            ]
        )
        if kind == "pin":
            action: dict[str, Any] = {"type": "pin", "item": rng.choice(by_top[top]), "position": rng.randint(1, 3)}
        elif kind == "inject":
            action = {"type": "inject", "items": rng.sample(by_top[top], 2)}
        elif kind == "attach":
            action = {"type": "attach", "slot": f"slot-{index % 4}", "content": {"text": f"offer {index}"}}
        elif kind == "filter":
            action = {"type": "filter", "items": match}
        else:
            weight = rng.uniform(1.5, 4.0) if kind == "boost" else rng.uniform(0.2, 0.7)
            if scope == "page":
                match = {"categories": [top]}
            action = {"type": "boost", "items": match, "weight": round(weight, 2)}
        rule: dict[str, Any] = {"id": f"{kind}-{index}", "priority": rng.randint(0, 50), "actions": [action]}
        if scope == "page":
            rule["when"] = page(top)
        elif scope == "audience":
            rule["when"] = rng.choice(audiences)
        rules.append(rule)
    segments = [
        {"id": "new-visitors", "when": {"recency": {"not_within": "30d"}}},
        {"id": "browsers", "when": {"counter": {"event": "view", "window": "7d", "at_least": 2}}},
        {"id": "buyers", "when": {"counter": {"event": "purchase", "window": "30d", "at_least": 1}}},
        {"id": "carters", "when": {"counter": {"event": "add_to_cart", "window": "7d", "at_least": 1}}},
        {"id": "loyal", "when": {"all": [{"segment": "buyers"}, {"segment": "browsers"}]}},
    ]
    return {"timezone": "Europe/Berlin", "segments": segments, "rules": rules}


def with_context(path: Path, tops: list[str], rng: random.Random) -> None:
    """Give every request of a request list the page and device the snippet would send."""
    devices = ["mobile", "mobile", "desktop", "tablet"]
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join(f"{line}&page=/c/{rng.choice(tops)}&device={rng.choice(devices)}" for line in lines) + "\n"
    )


def bench_store(store: str, snap: Snapshot, args: argparse.Namespace) -> dict[str, Any]:
    work = args.run_dir / store
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"store": store}
    runs: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        server, base, client, log, _ = start_gateway(stack, store, work, args)
        say(f"{store}: seeding {args.visitors} new visitors with 1-3 clicks")
        visitors = seed_visitors(client, snap, args.visitors, random.Random(args.seed))
        traffic = make_traffic(snap, visitors, args)["recommend"]
        doc = rule_set(snap.directory, random.Random(args.seed))
        tops = sorted(
            {
                c.split("/")[0]
                for item in json.loads((snap.directory / "items.json").read_bytes())
                for c in item.get("categories", [])
            }
        )
        context_rng = random.Random(args.seed + 2)
        stored = client.put("/admin/rules", json=doc)
        if stored.status_code != 201:
            raise RuntimeError(f"PUT /admin/rules: {stored.status_code} {stored.text[:500]}")
        version = stored.json()["version"]

        serving: list[bool | None] = [None]

        def use(rules: bool) -> bool:
            """Serve with the rule set or without; whether that switched."""
            if serving[0] is rules:
                return False
            answer = client.post(f"/admin/rules/{version}/activate" if rules else "/admin/rules/deactivate")
            answer.raise_for_status()
            if answer.json()["serving"] != (version if rules else None):
                raise RuntimeError(f"the gateway does not serve what was activated: {answer.text[:300]}")
            serving[0] = rules
            return True

        def wrk(label: str, *, rate: float | None = None, duration: float = args.duration) -> dict[str, Any]:
            if server.poll() is not None:
                raise RuntimeError(f"the gateway exited with {server.returncode}; see {log}")
            size = max(args.list_size, int(duration * (rate or 20_000) * 1.25) + args.connections)
            path = work / f"{label}.txt"
            kinds = traffic.window(size, path)
            with_context(path, tops, context_rng)
            run = run_wrk(
                base,
                path,
                duration=duration,
                connections=args.connections,
                threads=args.threads,
                server_pid=server.pid,
                rate=rate,
            )
            traffic.consume(kinds, min(run["requests"] + args.connections, size))
            if traffic.reused:
                run["population_reused"] = traffic.reused
            return run

        def settle(label: str, *, rate: float | None = None) -> None:
            if args.settle > 0:
                wrk(f"{label}_settle", rate=rate, duration=args.settle)

        use(False)
        say(f"{store}: warming up for {args.warmup:g}s")
        wrk("warmup", duration=args.warmup)
        for label in sides("full", args.pairs):
            switched = use(label.startswith("rules"))
            if switched:
                settle(label)
            runs[label] = wrk(label)
            say(f"{store}: {label:14} {describe(runs[label])}")
        use(True)
        sample = client.get("/v1/recommend", params={"visitor": next(iter(visitors)), "device": "mobile"}).json()
        result["sample_answer"] = {k: sample[k] for k in ("rules", "segments", "content")}
        metrics = client.get("/metrics").text
        result["rules_with_hits"] = sum(
            1
            for line in metrics.splitlines()
            if line.startswith("tailor_rule_hits_total{") and not line.endswith(" 0.0")
        )
        # Latency is compared at one rate both sides sustain: half the with-rules maximum.
        full_rules = [runs[label]["rate"] for label in sides("full", args.pairs) if label.startswith("rules")]
        rules_max = sum(full_rules) / len(full_rules)
        target = rules_max / 2
        for label in sides("paced", args.pairs):
            if use(label.startswith("rules")):
                settle(label, rate=target)
            runs[label] = wrk(label, rate=target)
            say(f"{store}: {label:14} {describe(runs[label])}")
        result["server_alive_at_end"] = server.poll() is None
    result["runs"] = runs
    result["ratios"] = ratios(runs, args.pairs)
    result["bar"] = {
        f"latency with {RULES} rules <= {BAR_LATENCY_RATIO}x none (p50, paced)": (
            result["ratios"]["p50_rules_over_none_paced"] <= BAR_LATENCY_RATIO
        ),
        f"throughput with {RULES} rules >= 1/{BAR_LATENCY_RATIO} of none": (
            result["ratios"]["throughput_none_over_rules"] <= BAR_LATENCY_RATIO
        ),
        "no errors": all(run["errors_total"] == 0 for run in runs.values()),
    }
    return result


def sides(kind: str, pairs: int = 2) -> list[str]:
    """The runs of one kind ("full" or "paced") in the order they run: pair k is none_k and
    rules_k, none first in odd pairs and rules first in even ones (none, rules, rules, none, ...)."""
    order: list[str] = []
    for k in range(1, pairs + 1):
        pair = [f"none_{kind}_{k}", f"rules_{kind}_{k}"]
        order += pair if k % 2 else pair[::-1]
    return order


def ratios(runs: dict[str, Any], pairs: int = 2) -> dict[str, Any]:
    """The ratios of a store's runs (see the module): each side's runs averaged."""

    def mean(side: str, kind: str, read: Callable[[dict[str, Any]], float]) -> float:
        return sum(read(runs[f"{side}_{kind}_{k}"]) for k in range(1, pairs + 1)) / pairs

    def rate(run: dict[str, Any]) -> float:
        return float(run["rate"])

    def latency(quantile: str) -> Callable[[dict[str, Any]], float]:
        return lambda run: float(run["latency_ms"][quantile])

    def paced(quantile: str) -> float:
        return round(mean("rules", "paced", latency(quantile)) / mean("none", "paced", latency(quantile)), 3)

    return {
        "throughput_none_over_rules": round(mean("none", "full", rate) / mean("rules", "full", rate), 3),
        "p50_rules_over_none_paced": paced("p50"),
        "p99_rules_over_none_paced": paced("p99"),
        "p50_rules_over_none_paced_pairs": [
            round(runs[f"rules_paced_{k}"]["latency_ms"]["p50"] / runs[f"none_paced_{k}"]["latency_ms"]["p50"], 3)
            for k in range(1, pairs + 1)
        ],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["store   run             req/s    p50 ms   p99 ms"]
    for result in results:
        for label, run in result["runs"].items():
            latency = run["latency_ms"]
            again = run.get("population_reused")
            lines.append(
                f"{result['store']:7} {label:14} {run['rate']:8,.0f} {latency['p50']:8.2f} {latency['p99']:8.2f}"
                + (f"  (asked again: {', '.join(again)})" if again else "")
            )
        found = result["ratios"]
        lines.append(
            f"{result['store']:7} ratios: throughput none/rules {found['throughput_none_over_rules']:.2f}x, "
            f"paced p50 rules/none {found['p50_rules_over_none_paced']:.2f}x, "
            f"p99 {found['p99_rules_over_none_paced']:.2f}x (p50 per pair: "
            f"{', '.join(f'{r:.2f}x' for r in found['p50_rules_over_none_paced_pairs'])}); "
            f"rules with hits: {result['rules_with_hits']}/{RULES}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="bench_rules.py"
    )
    p.add_argument("--bench-dir", type=Path, default=Path("var/bench"), help="working directory (default var/bench)")
    p.add_argument("--stores", default="memory", help="comma-separated: memory, redis (default memory)")
    add_wrk_options(p, duration=10.0, warmup=3.0)
    p.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds of unrecorded traffic after every switch between rules and none, at the next run's rate: "
        "runs compare steady states, not the first seconds after an activation (default 3)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="pairs of runs (none, rules) per speed, in alternating order: 2 is none, rules, rules, none (ABBA); "
        "4 repeats that, for a steadier average on a noisy machine (default 2)",
    )
    p.add_argument(
        "--visitors",
        type=int,
        default=200_000,
        help="new visitors seeded with 1-3 clicks (200000: enough that no run asks for one an earlier run did; "
        "a repeat's candidates come from the cache, which would make both sides cheaper and the rules' share larger)",
    )
    p.add_argument("--list-size", type=int, default=50_000, help="least paths per wrk run (50000)")
    p.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    add_gateway_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # What bench_gateway.py's snapshot step needs: reuse its shop and snapshot, never build here.
    args.shop_dir, args.snapshots_dir = args.bench_dir / "shop", args.bench_dir / "snapshots"
    args.rebuild, args.skip_build, args.mix = False, True, (0.5, 0.3, 0.2)
    ensure_snapshot(args)
    snap = Snapshot.load(args.snapshots_dir)
    args.run_dir = new_run_dir(args.bench_dir / "rules-run")
    args.pinned_root = pin_snapshot(snap, args.run_dir / "snapshots")
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_start": load_average(),
        "code": code_version(),
        "snapshot": snap.version,
        "settings": {"duration_s": args.duration, "connections": args.connections, "rules": RULES},
    }
    report["stores"] = results = [bench_store(s.strip(), snap, args) for s in args.stores.split(",") if s.strip()]
    report["load_average_at_end"] = load_average()
    out = args.bench_dir / "rules.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
