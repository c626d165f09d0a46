"""Side-by-side quality benchmark on three hold-outs, in one run.

Protocols (see docs/quality.md): MovieLens ml-latest-small with each user's last 20% by time held
out ("temporal") and with a seeded random 25% of each user's ratings held out ("random"), and a
purchase-only synthetic shop (`tailor synth --shape purchases`) with the temporal hold-out
("purchases"). Rows per protocol: popularity; implicit's ALS with default parameters; implicit's
ALS grid-tuned on a validation split of that protocol's training part carved the protocol's own
way; EASE with its λ tuned the same way; RP3beta with its α, β and neighbours tuned the same way;
and `tailor build`'s model as shipped, chosen by its own tuner with no per-protocol setting.
Within a protocol every row trains on the same part and is scored on the same hold-out.

    .venv/bin/python loadtests/bench_quality.py                     # all three protocols
    .venv/bin/python loadtests/bench_quality.py --protocols temporal random
    .venv/bin/python loadtests/bench_quality.py --protocols random --random-seeds 0 1 2 3

--random-seeds runs the random protocol once per seed of its split (and of the anchors'
validation split; `tailor build` keeps its own default seed, as a user's build would): how much a
ratio owes to the one split drawn.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from index_builder import item_models
from index_builder.build import BuildConfig, Stopwatch, evaluate_shipped, read_inputs
from index_builder.content import category_rows
from index_builder.dataset import Interactions, random_split, temporal_split
from index_builder.evaluate import Metrics, Scorer, evaluate
from index_builder.model import ModelParams
from index_builder.schema import Item
from index_builder.synth import generate
from index_builder.train import ALPHA, FACTORS, REGULARIZATION, confidence_matrix, popularity_scorer, tune

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
PROTOCOLS = ("temporal", "random", "purchases")
EASE_LAMBDAS = (20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
RP3_ALPHAS = (0.25, 0.5, 0.75, 1.0)
RP3_BETAS = (0.0, 0.2, 0.4)
RP3_NEIGHBOURS = (50, 200)
# The purchase-shaped shop: many one-order customers, so more customers than items.
SHOP = {"users": 20_000, "items": 5_000, "events": 60_000, "days": 365, "seed": 1, "shape": "purchases"}


class Row(msgspec.Struct):
    name: str
    metrics: Metrics
    train_seconds: float
    parameters: dict[str, object]


class Result(msgspec.Struct):
    protocol: str
    description: str
    counts: dict[str, int]
    rows: list[Row]


Split = Callable[[Interactions], tuple[Interactions, Interactions]]


def als_scorer(train: Interactions, **params: float) -> Scorer:
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(random_state=0, **params)
        model.fit(confidence_matrix(train), show_progress=False)
    users, items = model.user_factors, model.item_factors
    return lambda batch: users[batch] @ items.T


def item_model_scorer(train: Interactions, **params: float) -> Scorer:
    return item_models.scorer(train, ModelParams(**params))  # type: ignore[arg-type]


def timed(make: Callable[[], Scorer]) -> tuple[Scorer, float]:
    started = time.perf_counter()
    scorer = make()
    return scorer, time.perf_counter() - started


def tuned(
    candidates: list[dict[str, float]],
    make: Callable[..., Scorer],
    fit: Interactions,
    validation: Interactions,
) -> dict[str, float]:
    """The candidate parameters whose model, trained on `fit`, ranks best on `validation`."""
    scored = [(evaluate(make(fit, **params), fit, validation).ndcg_at_10, i) for i, params in enumerate(candidates)]
    return candidates[max(scored)[1]]


def run(data: Interactions, catalog: list[Item], split: Split, say: Callable[[str], None]) -> list[Row]:
    train, test = split(data)
    fit, validation = split(train)
    rows: list[Row] = []

    scorer, seconds = timed(lambda: popularity_scorer(train, 0.0))
    rows.append(Row("popularity", evaluate(scorer, train, test), seconds, {}))

    scorer, seconds = timed(lambda: als_scorer(train))
    rows.append(Row("implicit ALS, defaults", evaluate(scorer, train, test), seconds, {}))
    say("  popularity and ALS defaults done")

    # The full grid Tailor's tuner walks, on this protocol's own validation split.
    started = time.perf_counter()
    grid = [
        {"factors": f, "regularization": r, "alpha": a} for f, r, a in itertools.product(FACTORS, REGULARIZATION, ALPHA)
    ]
    best = tuned(grid, als_scorer, fit, validation)
    scorer = als_scorer(train, **best)
    rows.append(Row("implicit ALS, grid-tuned", evaluate(scorer, train, test), time.perf_counter() - started, {**best}))
    say(f"  ALS grid search done: {best}")

    started = time.perf_counter()
    best = tuned([{"ease_regularization": value} for value in EASE_LAMBDAS], item_model_scorer, fit, validation)
    scorer = item_model_scorer(train, **best)
    rows.append(Row("EASE, λ tuned", evaluate(scorer, train, test), time.perf_counter() - started, {**best}))
    say(f"  EASE done: {best}")

    started = time.perf_counter()
    grid = [
        {"rp3_alpha": a, "rp3_beta": b, "rp3_neighbours": k}
        for a, b, k in itertools.product(RP3_ALPHAS, RP3_BETAS, RP3_NEIGHBOURS)
    ]
    best = tuned(grid, item_model_scorer, fit, validation)
    scorer = item_model_scorer(train, **best)
    rows.append(Row("RP3beta, tuned", evaluate(scorer, train, test), time.perf_counter() - started, {**best}))
    say(f"  RP3beta done: {best}")

    started = time.perf_counter()
    categories = category_rows([item.categories for item in catalog])
    tuning = tune(train, progress=say, content=categories)
    metrics = evaluate_shipped(train, test, catalog, tuning.best, categories=categories, seed=0)
    seconds = time.perf_counter() - started  # includes its tuning, like the grid-tuned row
    rows.append(Row("tailor build", metrics, seconds, {**msgspec.to_builtins(tuning.best), "ratios": tuning.ratios}))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| recommender | nDCG@10 | Recall@10 | Precision@10 | MAP@10 | coverage | train s (incl. tuning) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row.metrics
        lines.append(
            f"| {row.name} | {m.ndcg_at_10:.4f} | {m.recall_at_10:.4f} | {m.precision_at_10:.4f} | "
            f"{m.map_at_10:.4f} | {m.coverage:.4f} | {row.train_seconds:.1f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> str:
    ndcg = {row.name: row.metrics.ndcg_at_10 for row in rows}
    tailor = ndcg["tailor build"]
    return (
        f"tailor nDCG@10: {tailor / ndcg['implicit ALS, grid-tuned']:.3f}x grid-tuned ALS, "
        f"{tailor / ndcg['EASE, λ tuned']:.3f}x EASE, {tailor / ndcg['RP3beta, tuned']:.3f}x RP3beta, "
        f"{tailor / ndcg['popularity']:.2f}x popularity"
    )


def random_split_with(seed: int) -> Split:
    return lambda data: random_split(data, 0.25, seed=seed)


def commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return found.stdout.strip() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--movielens", type=Path, default=MOVIELENS, help="ml-latest-small directory")
    p.add_argument("--shop", type=Path, default=Path("var/bench/purchases"), help="where the synthetic shop goes")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument(
        "--random-seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="seeds of the random protocol's split, one run each (default: 0)",
    )
    p.add_argument("--json", type=Path, default=Path("var/bench/quality.json"), help="where to write the results")
    args = p.parse_args()
    say = Stopwatch()
    results: list[Result] = []
    for protocol in args.protocols:
        if protocol == "purchases":
            if not (args.shop / "events.csv").exists():
                say(f"generating the purchase-shaped shop in {args.shop}: {SHOP}")
                generate(args.shop, **SHOP)  # type: ignore[arg-type]
            config = BuildConfig(events=[args.shop / "events.csv"], items=args.shop / "items.jsonl")
            description = f"tailor synth --shape purchases {SHOP}; each user's last 20% by time held out"
        else:
            if not (args.movielens / "ratings.csv").exists():
                print(f"{args.movielens}: not found. See docs/quality.md for getting MovieLens.", file=sys.stderr)
                return 1
            config = BuildConfig(
                events=[args.movielens / "ratings.csv"], items=args.movielens / "movies.csv", format="movielens"
            )
            description = (
                "ml-latest-small; each user's last 20% by time held out"
                if protocol == "temporal"
                else "ml-latest-small; a seeded random 25% of each user's ratings held out"
            )
        data, catalog, _, _, _ = read_inputs(config, lambda _: None)
        counts = {"interactions": len(data), "users": data.n_users, "items": data.n_items}
        for seed in args.random_seeds if protocol == "random" else [None]:
            split: Split = temporal_split if seed is None else random_split_with(seed)
            name = protocol if seed in (None, 0) else f"{protocol}, seed {seed}"
            said = description if seed in (None, 0) else f"{description} (seed {seed})"
            say(f"{name}: {said}")
            rows = run(data, catalog, split, say)
            results.append(Result(name, said, counts, rows))
            print(f"\n{name}: {said}\n{table(rows)}\n{ratios(rows)}\n", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(msgspec.json.format(msgspec.json.encode({"commit": commit(), "results": results}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
