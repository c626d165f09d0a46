"""What the benchmark sends: populations of users, visitors and items handed out without repeats,
request lists per run, the seeded new visitors, and the checks and counters read around each run."""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

from loadtests.exact import Snapshot
from loadtests.harness import check_shape


class Population:
    """Visitors or items handed out in one shuffled order. A run peeks at the next ones and afterwards
    consumes only as many as it sent, so no run repeats a request an earlier run made (which the
    gateway might answer from its cache) until the whole population has been used once."""

    def __init__(self, values: Sequence[str], rng: random.Random) -> None:
        self.values = list(values)
        rng.shuffle(self.values)
        self.cursor = 0

    def peek(self, count: int) -> list[str]:
        n = len(self.values)
        return [self.values[(self.cursor + i) % n] for i in range(count)]

    def consume(self, count: int) -> None:
        self.cursor += count

    @property
    def wrapped(self) -> bool:
        return self.cursor > len(self.values)


class Fresh(Population):
    """Never-seen visitor ids, as many as asked for."""

    def __init__(self, prefix: str) -> None:
        super().__init__([], random.Random(0))
        self.prefix = prefix

    def peek(self, count: int) -> list[str]:
        return [f"{self.prefix}{self.cursor + i:08d}" for i in range(count)]

    @property
    def wrapped(self) -> bool:
        return False


@dataclass
class Kind:
    name: str
    weight: float
    population: Population
    template: str  # "{}" is replaced by the population's value


@dataclass
class Traffic:
    """A request mix over populations; `window` writes the next paths for one wrk run."""

    name: str
    kinds: list[Kind]
    rng: random.Random

    def window(self, size: int, path: Path) -> list[str]:
        drawn = self.rng.choices(range(len(self.kinds)), weights=[k.weight for k in self.kinds], k=size)
        counts = Counter(drawn)
        values = {i: iter(self.kinds[i].population.peek(counts[i])) for i in counts}
        paths = [self.kinds[i].template.format(next(values[i])) for i in drawn]
        path.write_text("\n".join(paths) + "\n")
        return [self.kinds[i].name for i in drawn]

    def consume(self, kinds: list[str], count: int) -> dict[str, int]:
        used = Counter(kinds[:count])
        for kind in self.kinds:
            kind.population.consume(used[kind.name])
        return dict(used)

    @property
    def reused(self) -> list[str]:
        return [kind.name for kind in self.kinds if kind.population.wrapped]


def parse_mix(text: str) -> tuple[float, float, float]:
    try:
        known, new, unknown = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KNOWN,NEW,UNKNOWN fractions, got {text!r}") from None
    total = known + new + unknown
    if total <= 0 or min(known, new, unknown) < 0:
        raise argparse.ArgumentTypeError(f"fractions must be >= 0 and not all 0: {text!r}")
    return known / total, new / total, unknown / total


def add_mix_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mix",
        type=parse_mix,
        default=(0.5, 0.3, 0.2),
        help="recommend list: known users, seeded visitors, unknown visitors (default 0.5,0.3,0.2)",
    )


def make_traffic(snap: Snapshot, visitors: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Traffic]:
    rng = random.Random(args.seed)
    known = Population(snap.user_ids, rng)
    seeded = Population(list(visitors), rng)
    unknown = Fresh(f"anon-{rng.getrandbits(32):08x}-")
    items = Population(snap.item_ids, rng)
    recommend = "/v1/recommend?{}&n=10"
    known_kind = Kind("known", args.mix[0], known, recommend.format("user={}"))
    new_kind = Kind("new", args.mix[1], seeded, recommend.format("visitor={}"))
    unknown_kind = Kind("unknown", args.mix[2], unknown, recommend.format("visitor={}"))
    traffic = {
        "healthz": Traffic("healthz", [Kind("healthz", 1, Population(["-"], rng), "/healthz")], rng),
        "recommend": Traffic("recommend", [known_kind, new_kind, unknown_kind], rng),
        "similar": Traffic("similar", [Kind("similar", 1, items, "/v1/items/{}/similar?n=10")], rng),
    }
    # single-kind mixes share the populations, so they never repeat what the mix already asked
    for kind in (known_kind, new_kind, unknown_kind):
        alone = Kind(kind.name, 1.0, kind.population, kind.template)
        traffic[f"recommend_{kind.name}"] = Traffic(f"recommend_{kind.name}", [alone], rng)
    return traffic


def new_visitors(
    snap: Snapshot, count: int, rng: random.Random
) -> tuple[dict[str, list[int]], list[dict[str, str | int]]]:
    """`count` new visitors, each with 1-3 recent clicks (mostly popular items of one category), and
    their clicks as `POST /v1/events` events, the last one now."""
    categories = [c for c in snap.popular if c]
    visitors: dict[str, list[int]] = {}
    for number in range(count):
        pool = snap.popular[rng.choice(categories)] or snap.popular[""]
        clicks = [rng.choice(pool) if rng.random() < 2 / 3 else rng.randrange(len(snap.item_ids))]
        clicks += [rng.choice(pool) for _ in range(rng.randint(0, 2))]
        visitors[f"bench-{number:05d}-{rng.getrandbits(32):08x}"] = clicks
    now = int(time.time())
    events: list[dict[str, str | int]] = [
        {"visitor": visitor, "item": snap.item_ids[row], "event": "click", "ts": now - (len(rows) - 1 - k)}
        for visitor, rows in visitors.items()
        for k, row in enumerate(rows)
    ]
    return visitors, events


def seed_visitors(client: httpx.Client, snap: Snapshot, count: int, rng: random.Random) -> dict[str, list[int]]:
    """`count` new visitors (see new_visitors), their clicks sent through the gateway."""
    visitors, events = new_visitors(snap, count, rng)
    for start in range(0, len(events), 100):
        batch = events[start : start + 100]
        response = client.post("/v1/events", json={"events": batch})
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
        if response.status_code != 202 or not isinstance(body, dict) or body.get("accepted") != len(batch):
            raise RuntimeError(f"POST /v1/events: {response.status_code} {response.text[:300]}")
    return visitors


def preflight(client: httpx.Client, traffic: dict[str, Traffic], directory: Path, per_mix: int = 30) -> list[str]:
    """GET the first paths of every mix once and validate them, so wrk's numbers are about valid answers.
    The paths are consumed: the measured runs do not get them again from a warm cache."""
    problems: list[str] = []
    for name in ("healthz", "recommend", "similar"):
        path = directory / f"preflight-{name}.txt"
        kinds = traffic[name].window(per_mix, path)
        traffic[name].consume(kinds, per_mix)
        for line in path.read_text().split():
            response = client.get(line)
            problem = check_shape(response) if name != "healthz" else None
            if name == "healthz" and response.status_code != 200:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if problem:
                problems.append(f"GET {line}: {problem}")
    return problems


def gateway_counters(client: httpx.Client) -> dict[str, float]:
    """The gateway's own Prometheus counters, by sample name and labels (empty if /metrics fails)."""
    try:
        text = client.get("/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tailor_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                counters[name] = float(value)
    return counters


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-run increase of the interesting counters: cache hit/miss, responses by route+status, fallbacks."""
    delta: dict[str, dict[str, float]] = {"candidate_cache": {}, "responses": {}, "fallbacks": {}}
    # sample names: counters end in _total; the cache lookups may be a gauge since the snapshot loaded
    sources = {
        "tailor_candidate_cache_total": "candidate_cache",
        "tailor_candidate_cache_lookups": "candidate_cache",
        "tailor_responses_total": "responses",
        "tailor_fallbacks_total": "fallbacks",
    }
    for name, value in after.items():
        change = value - before.get(name, 0.0)
        if not change:
            continue
        metric, _, labels = name.partition("{")
        label = ",".join(part.split("=", 1)[1].strip('"') for part in labels.rstrip("}").split(",") if "=" in part)
        if metric in sources:
            delta[sources[metric]][label] = change
    return delta
