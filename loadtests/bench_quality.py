"""Side-by-side quality benchmark on one temporal split, in one run.

Rows: popularity, implicit's ALS with default parameters, implicit's ALS tuned by grid search on
the validation split, and `tailor build` as shipped (its own tuner, recency-weighted fold-in,
content vectors for cold items). All rows train on the same 80% and are scored on the same 20%.

    .venv/bin/python loadtests/bench_quality.py                      # MovieLens small
    .venv/bin/python loadtests/bench_quality.py --events var/shop/events.csv --items var/shop/items.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from index_builder.build import BuildConfig, Stopwatch, evaluate_shipped, read_inputs
from index_builder.dataset import Interactions, temporal_split
from index_builder.evaluate import Metrics, Scorer, evaluate
from index_builder.readers import Format
from index_builder.train import ALPHA, FACTORS, REGULARIZATION, confidence_matrix, popularity_scorer, tune

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


class Row(msgspec.Struct):
    name: str
    metrics: Metrics
    train_seconds: float
    parameters: dict[str, object]


def als_scorer(train: Interactions, **params: float) -> Scorer:
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(random_state=0, **params)
        model.fit(confidence_matrix(train), show_progress=False)
    users, items = model.user_factors, model.item_factors
    return lambda batch: users[batch] @ items.T


def timed(make: Callable[[], Scorer]) -> tuple[Scorer, float]:
    started = time.perf_counter()
    scorer = make()
    return scorer, time.perf_counter() - started


def run(events: Path, items: Path, fmt: Format, say: Callable[[str], None]) -> list[Row]:
    data, catalog, _, _, _ = read_inputs(BuildConfig(events=[events], items=items, format=fmt), say)
    train, test = temporal_split(data)
    fit, validation = temporal_split(train)
    rows: list[Row] = []

    scorer, seconds = timed(lambda: popularity_scorer(train, 0.0))
    rows.append(Row("popularity", evaluate(scorer, train, test), seconds, {}))
    say("popularity done")

    scorer, seconds = timed(lambda: als_scorer(train))
    rows.append(Row("implicit ALS, defaults", evaluate(scorer, train, test), seconds, {}))
    say("ALS defaults done")

    # Grid search on the validation split carved from training, the same grid Tailor's tuner walks.
    started = time.perf_counter()
    best: tuple[float, dict[str, float]] | None = None
    for factors, regularization, alpha in itertools.product(FACTORS, REGULARIZATION, ALPHA):
        params = {"factors": factors, "regularization": regularization, "alpha": alpha}
        ndcg = evaluate(als_scorer(fit, **params), fit, validation).ndcg_at_10
        if best is None or ndcg > best[0]:
            best = (ndcg, params)
    assert best is not None
    scorer = als_scorer(train, **best[1])
    seconds = time.perf_counter() - started
    rows.append(Row("implicit ALS, grid-tuned", evaluate(scorer, train, test), seconds, dict(best[1])))
    say(f"ALS grid search done: {best[1]}")

    started = time.perf_counter()
    tuning = tune(train, progress=say)
    metrics = evaluate_shipped(train, test, catalog, tuning.best, seed=0)
    seconds = time.perf_counter() - started  # includes its tuning, like the grid-tuned row
    rows.append(Row("tailor build", metrics, seconds, msgspec.to_builtins(tuning.best)))
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=Path, default=MOVIELENS / "ratings.csv")
    p.add_argument("--items", type=Path, default=MOVIELENS / "movies.csv")
    p.add_argument("--format", default=None, help="input format (default: movielens for the default paths)")
    p.add_argument("--json", type=Path, default=Path("var/bench/quality.json"), help="where to write the rows")
    args = p.parse_args()
    fmt: Format = args.format or ("movielens" if args.events.name == "ratings.csv" else "auto")
    if not args.events.exists():
        print(f"{args.events}: not found. See docs/quality.md for getting MovieLens.", file=sys.stderr)
        return 1
    rows = run(args.events, args.items, fmt, Stopwatch())
    print(table(rows))
    tuned = next(r for r in rows if r.name == "implicit ALS, grid-tuned").metrics.ndcg_at_10
    tailor = rows[-1].metrics.ndcg_at_10
    popularity = rows[0].metrics.ndcg_at_10
    print(f"\ntailor / tuned ALS nDCG@10: {tailor / tuned:.2f}x; tuned ALS / popularity: {tuned / popularity:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(msgspec.json.format(msgspec.json.encode(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
