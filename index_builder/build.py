"""`tailor build`: read, clean, tune, evaluate, gate, train on everything, index and publish."""

from __future__ import annotations

import resource
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from index_builder import ann, ease, item_models, segments, snapshot
from index_builder.clean import Catalog, CleanReport, assemble, clean_interactions, clean_items
from index_builder.content import category_rows, content_vectors
from index_builder.dataset import Interactions, sampled_items, temporal_split, user_sample
from index_builder.evaluate import Metrics, evaluate
from index_builder.live_catalog import overlay, read_live
from index_builder.model import ModelParams, fold_in, profile_confidence, regularized_gram
from index_builder.readers import Format, InputError, interaction_rows, item_rows
from index_builder.schema import DEFAULT_EVENT_WEIGHTS, Interaction, Item
from index_builder.train import (
    CONTENT_MAX_ITEMS,
    Pins,
    TuneResult,
    dot_scorer,
    fit_item_vectors,
    popularity_scorer,
    popularity_scores,
    profile_matrix,
    tune,
    user_vectors,
)

POPULAR_LIST_LENGTH = 200
ANN_QUERIES = 300
# Evaluation scores every sampled user against the whole catalog: the sample shrinks as the catalog
# grows (a seeded sample; the manifest records how many were scored and the 95% interval).
MAX_TEST_USERS = 5000
MIN_TEST_USERS = 1000
TEST_SCORES = 1_000_000_000  # users x items scored per evaluation at most, above MIN_TEST_USERS
# Tuning compares settings on the whole histories of a sample of users: about this many interactions.
TUNING_INTERACTIONS = 500_000
TUNING_SCORES = 100_000_000  # users x items per validation score during tuning, above 500 users


class BuildConfig(msgspec.Struct, frozen=True):
    events: list[Path]
    items: Path | None = None
    format: Format = "auto"
    out: Path = Path("var/snapshots")
    weights: dict[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    max_trials: int = 20
    pins: Pins = Pins()  # choices an expert fixed; the tuner chooses the rest
    iterations: int = 15
    target_recall: float = 0.95
    seed: int = 0
    force: bool = False
    max_rejected_fraction: float = 0.5
    # Known users whose best items are precomputed (the most active first), and how many each.
    precompute_users: int = 200_000
    pool_size: int = 200
    # Each item's most similar items (cosine), for similar-item answers and for candidates of
    # visitors the build did not know. The work grows with items squared, hence the cap; above it
    # the snapshot holds a graph over the unit vectors for similar items instead (similar_index).
    neighbours: int = 100
    neighbours_max_items: int = 300_000
    # K-Means clusters of users by behaviour, shipped as segments.json for the gateway; 0 = none.
    segments: int = 5
    # The gateway's live catalog (its catalog_file, or its Redis), laid over `items`.
    catalog: list[str] = []


class QualityGateError(Exception):
    """The trained model ranks worse than popularity on the hold-out, so it is not published."""


class BuildResult(msgspec.Struct, frozen=True):
    manifest: snapshot.Manifest
    reports: list[CleanReport]
    model: Metrics
    popularity: Metrics
    tuning: TuneResult


class Stopwatch:
    """Progress lines on stderr, each with the time since the build started."""

    def __init__(self, quiet: bool = False) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)


# Each step's share of a build's time outside tuning, measured on the synthetic 1M-item, 3M-event
# shop (docs/performance.md); the 1M-event shop and ml-latest-small split it alike (evaluate 0.2-0.35,
# index 0.5-0.6). At each step the time left is the time these steps took so far times what the
# remaining ones weigh over what the finished ones weighed.
STEP_SHARES = {
    "read": 0.135,
    "evaluate": 0.225,
    "train": 0.11,
    "index": 0.505,
    "write": 0.025,
}
# An estimate needs this much time spent in the steps above: reading a small file says little.
MIN_EVIDENCE_S = 5.0


class TimeLeft:
    """`(about N min left)` for the message that starts a step of STEP_SHARES.

    Tuning is not one of the steps: its time depends on the search (how many fits, whether EASE is
    tried and with how many rows), not on the data's size as theirs does; it takes from a tenth of
    a 1M-item build to most of a small one. It is started as a step without a share (None): its
    time counts for no estimate, and it reports its own progress, trial by trial."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.step: str | None = None
        self.since = clock()
        self.spent = 0.0  # seconds in the steps of STEP_SHARES done so far
        self.done = 0.0  # their shares

    def __call__(self, step: str | None) -> str:
        now = self.clock()
        if self.step is not None:
            self.spent += now - self.since
            self.done += STEP_SHARES[self.step]
        self.step, self.since = step, now
        if step is None or self.done <= 0 or self.spent < MIN_EVIDENCE_S:
            return ""
        left = self.spent * (1.0 - self.done) / self.done
        return f" (about {left / 60:.1f} min left)" if left >= 90 else f" (about {left:.0f}s left)"


def _file_input(path: Path) -> snapshot.InputFile:
    return snapshot.InputFile(str(path), snapshot.sha256_file(path), path.stat().st_size)


def read_inputs(
    config: BuildConfig, say: Callable[[str], None]
) -> tuple[Interactions, list[Item], list[str], list[CleanReport], int]:
    events, items, reports = read_events(config, say)
    data, catalog, missing = assemble_inputs(events, items, config, say)
    return data, catalog.items, catalog.user_ids, reports, missing


def read_events(
    config: BuildConfig, say: Callable[[str], None]
) -> tuple[list[Interaction], list[Item], list[CleanReport]]:
    """The cleaned events and items, before assembly: segments need each event's type and time."""
    reports: list[CleanReport] = []
    items: list[Item] = []
    if config.items is not None:
        say(f"reading items from {config.items}")
        items, report = clean_items(item_rows(config.items, config.format), str(config.items))
        reports.append(report)
    events = []
    retired: set[str] = set()
    if config.catalog:
        live = [record for source in config.catalog for record in read_live(source, say)]
        items, retired = overlay(items, live)
    for path in config.events:
        say(f"reading interactions from {path}")
        kept, report = clean_interactions(interaction_rows(path, config.format), str(path), config.weights, say)
        events.extend(kept)
        reports.append(report)
    if retired:  # a retired item's interactions would bring it back as a bare catalog entry
        before = len(events)
        events = [event for event in events if event.item_id not in retired]
        say(f"{before - len(events):,} interactions with retired items left out")
    for report in reports:
        say(
            f"{report.file}: {report.accepted:,} accepted, {report.rejected:,} rejected, "
            f"{report.duplicates:,} duplicates removed"
        )
        if report.read and report.rejected / report.read > config.max_rejected_fraction:
            raise InputError(
                f"{report.file}: {report.rejected:,} of {report.read:,} rows rejected; first: "
                + "; ".join(f"line {r.line}: {r.reason}" for r in report.examples[:3])
            )
    return events, items, reports


def assemble_inputs(
    events: list[Interaction], items: list[Item], config: BuildConfig, say: Callable[[str], None]
) -> tuple[Interactions, Catalog, int]:
    data, catalog, missing = assemble(events, items, config.weights)
    if len(data) == 0:
        raise InputError("no usable interactions: nothing to train on")
    say(f"{len(data):,} interactions, {data.n_users:,} users, {data.n_items:,} items ({missing:,} not in the catalog)")
    return data, catalog, missing


def fit_segments(
    events: list[Interaction], data: Interactions, catalog: Catalog, say: Callable[[str], None], *, k: int, seed: int
) -> tuple[segments.SegmentModel, npt.NDArray[np.intp]]:
    """Cluster the known users on their behaviour as of the log's end, computed as the gateway
    computes it from a visitor's counters (index_builder.segments); the model and each user row's
    segment index."""
    end = max(event.timestamp for event in events).timestamp()
    interactions_per_item = np.bincount(data.item, minlength=data.n_items)
    affinity, members = segments.affinity_categories(catalog.items, interactions_per_item)
    say(
        f"segmenting {data.n_users:,} users into {k} clusters by recency, frequency, purchases, "
        f"add-to-carts and their share of views in {len(affinity)} top categories"
    )
    user_rows = {user: row for row, user in enumerate(catalog.user_ids)}
    raw = segments.log_activity(events, user_rows, catalog.items, members, end=end)
    model, labels = segments.fit(segments.feature_matrix(raw), affinity, members, k, seed=seed)
    for segment in model.segments:
        say(f"  {segment.id}: {segment.users:,} users, {segment.description}")
    return model, labels


def _popular_lists(scores: npt.NDArray[np.float32], items: list[Item]) -> dict[str, list[int]]:
    """Row indices of the most popular items overall ("") and per category (and parent category)."""
    order = np.argsort(-scores, kind="stable")
    lists: dict[str, list[int]] = {"": order[:POPULAR_LIST_LENGTH].tolist()}
    for row in order.tolist():
        for category in _categories_with_parents(items[row]):
            members = lists.setdefault(category, [])
            if len(members) < POPULAR_LIST_LENGTH:
                members.append(row)
    return lists


def _categories_with_parents(item: Item) -> set[str]:
    found = set(item.categories)
    for category in item.categories:
        parts = category.split("/")
        found.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    return found


def _contents(items: list[Item]) -> list[tuple[list[str], list[str]]]:
    return [(item.categories, item.tags) for item in items]


def _most_active(data: Interactions, limit: int) -> npt.NDArray[np.int32]:
    """Rows of the `limit` users with the most interactions, in row order."""
    counts = np.bincount(data.user, minlength=data.n_users)
    if limit >= data.n_users:
        return np.arange(data.n_users, dtype=np.int32)
    chosen = np.argpartition(-counts, limit - 1)[:limit] if limit > 0 else np.empty(0, dtype=np.int64)
    return np.sort(chosen).astype(np.int32)


def _seen_csr(data: Interactions) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    matrix = data.seen_matrix()
    matrix.sort_indices()
    return matrix.indptr.astype(np.int64), matrix.indices.astype(np.int32)


def evaluate_shipped(
    train: Interactions,
    test: Interactions,
    items: list[Item],
    params: ModelParams,
    *,
    categories: sp.csr_matrix,
    seed: int,
    max_users: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Metrics:
    """The model exactly as it will ship (content vectors for cold items included), on the hold-out;
    `categories` are the items' category rows (`content.category_rows`), which it may be fitted with."""
    if item_models.chosen(params) != "als":  # known users are served EASE's or RP3beta's lists (see `build`)
        scorer = item_models.scorer(train, params, profile_matrix(train, params), categories)
        return evaluate(scorer, train, test, max_users=max_users, seed=seed)
    item_vectors = fit_item_vectors(train, params, seed, categories, progress)
    warm = np.bincount(train.item, minlength=train.n_items) > 0
    item_vectors, _ = content_vectors(_contents(items), item_vectors, warm)
    scorer = dot_scorer(user_vectors(train, item_vectors, params), item_vectors)
    return evaluate(scorer, train, test, max_users=max_users, seed=seed)


def new_visitor_vectors(
    items: npt.NDArray[np.float32],
    warm: npt.NDArray[np.bool_],
    params: ModelParams,
    weights: dict[str, float],
    *,
    n: int,
    seed: int,
) -> npt.NDArray[np.float32]:
    """Taste vectors of `n` made-up new visitors, as the gateway folds them in: 1-3 clicks each on
    items that have interactions. The index serves these as well as known users' vectors, and they
    are harder for it (they lean towards a few items)."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(warm)
    gram = regularized_gram(items, params.regularization)
    click = weights.get("click", 1.0)
    vectors = np.zeros((n if len(rows) else 0, items.shape[1]), dtype=np.float32)
    for at in range(len(vectors)):
        clicked = rng.choice(rows, size=min(int(rng.integers(1, 4)), len(rows)), replace=False)
        distinct, confidence = profile_confidence(clicked, np.full(len(clicked), click, np.float32), params)
        vectors[at] = fold_in(items, gram, distinct, confidence)
    return vectors


def sample_sizes(n_items: int) -> tuple[int, int]:
    """How many users the hold-out evaluation and each tuning score rank a catalog of `n_items` for."""
    test_users = int(np.clip(TEST_SCORES // max(n_items, 1), MIN_TEST_USERS, MAX_TEST_USERS))
    tuning_users = int(np.clip(TUNING_SCORES // max(n_items, 1), 500, 3000))
    return test_users, tuning_users


def quality_gate(model: Metrics, popularity: Metrics, force: bool) -> bool:
    """Whether the model beats popularity; raises unless `force` when it does not."""
    passed = model.ndcg_at_10 >= popularity.ndcg_at_10
    if not passed and not force:
        raise QualityGateError(
            f"model nDCG@10 {model.ndcg_at_10:.4f} < popularity {popularity.ndcg_at_10:.4f}; "
            "not published (use --force to publish anyway)"
        )
    return passed


def similar_items(
    item_vectors: npt.NDArray[np.float32],
    warm: npt.NDArray[np.bool_],
    config: BuildConfig,
    rng: np.random.Generator,
    say: Callable[[str], None],
) -> tuple[
    tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]] | None, tuple[ann.IndexChoice, ann.Graph | None] | None
]:
    """How similar items (cosine) are found: up to neighbours_max_items items, each item's list
    (neighbours); above it, a graph over the unit vectors tuned like the item index (similar)."""
    n_items = len(item_vectors)
    if config.neighbours <= 0:
        return None, None
    unit = ann.unit_rows(item_vectors)
    if n_items <= config.neighbours_max_items:
        say(f"precomputing the {config.neighbours} most similar items of each of {n_items:,} items")
        neighbours = ann.precompute_pools(
            ann.ItemIndex(unit),
            unit,
            np.arange(n_items + 1, dtype=np.int64),
            np.arange(n_items, dtype=np.int32),  # each item has only itself to leave out
            size=config.neighbours,
            progress=say,
            label="similar items",
            unit="items",
        )
        return neighbours, None
    # Too many items for a list each: similar items (cosine) come from a graph over the unit vectors
    # instead, tuned like the item index on items' own vectors as queries: as many items with
    # interactions (the ones shoppers look at most) as of any items.
    say(f"tuning the similar-items index over {n_items:,} unit vectors")
    warm_rows = np.flatnonzero(warm)
    looked_at = rng.choice(warm_rows, size=min(ANN_QUERIES, len(warm_rows)), replace=False)
    anything = rng.choice(n_items, size=min(ANN_QUERIES, n_items), replace=False)
    asked = np.concatenate([looked_at, anything])
    groups = np.repeat([0, 1], [len(looked_at), len(anything)])

    def labelled(line: str) -> None:  # the tuner's lines start "index: ..."
        say(f"similar-items {line}")

    similar = ann.tune_index(unit, unit[asked], config.target_recall, labelled, groups)
    say(f"similar-items index: {similar[0].method}, recall@10 {similar[0].recall_at_10:.3f}")
    return None, similar


def build(config: BuildConfig, say: Callable[[str], None]) -> BuildResult:
    started = time.perf_counter()
    left = TimeLeft()
    left("read")
    files = [*config.events, *([config.items] if config.items else []), *map(Path, config.catalog)]
    inputs = [_file_input(p) for p in files if p.is_file()]
    events, given_items, reports = read_events(config, say)
    data, catalog, missing = assemble_inputs(events, given_items, config, say)
    items, user_ids = catalog.items, catalog.user_ids
    segment_model = None
    if config.segments > 0:
        segment_model, _ = fit_segments(events, data, catalog, say, k=config.segments, seed=config.seed)
    del events, given_items  # the largest thing held so far; nothing below needs it

    say("splitting: each user's last 20% of interactions by time are held out for evaluation" + left(None))
    train, test = temporal_split(data)
    tuning_data = user_sample(train, TUNING_INTERACTIONS, config.seed)
    categories = category_rows([item.categories for item in items])
    test_users, tuning_users = sample_sizes(data.n_items)[0], sample_sizes(tuning_data.n_items)[1]
    say(
        "tuning on a temporal and a random validation split of the training part "
        f"(at most {config.max_trials} ALS fits) of {tuning_data.n_users:,} users' histories "
        f"({len(tuning_data):,} interactions, {tuning_data.n_items:,} items; {tuning_users:,} users scored per setting)"
    )
    ease_fits = ease.fits(data)  # as the shipped model is fitted to all of it
    tuning = tune(
        tuning_data,
        max_trials=config.max_trials,
        iterations=config.iterations,
        seed=config.seed,
        progress=say,
        max_eval_users=tuning_users,
        pins=config.pins,
        # EASE and RP3beta serve known users from pools only, and are fitted on the whole data
        pooled=data.n_users <= config.precompute_users,
        ease_allowed=ease_fits,
        visits_allowed=ease_fits and ease.fits(data, visits=True),  # the visit matrix only where EASE fits
        content=categories[:, sampled_items(train, TUNING_INTERACTIONS, config.seed)],
        content_allowed=data.n_items <= CONTENT_MAX_ITEMS,
    )
    del tuning_data
    if config.pins.item_model not in (None, item_models.chosen(tuning.best)):
        say(
            f"{config.pins.item_model} was pinned but does not fit here (more users than --precompute-users, "
            f"or for EASE min(users, items) > {ease.MAX_DENSE:,}): ALS it is"
        )
    say(
        f"chosen: {msgspec.json.encode(tuning.best).decode()}, popularity half-life "
        f"{tuning.popularity_half_life_days} days; x tuned ALS: "
        + ", ".join(f"{split} {ratio:.3f}" for split, ratio in tuning.ratios.items())
    )

    say(f"evaluating on the hold-out: model vs popularity, {test_users:,} users at most" + left("evaluate"))
    model_metrics = evaluate_shipped(
        train, test, items, tuning.best, categories=categories, seed=config.seed, max_users=test_users, progress=say
    )
    popularity_metrics = evaluate(
        popularity_scorer(train, tuning.popularity_half_life_days),
        train,
        test,
        max_users=test_users,
        seed=config.seed,
    )
    say(
        f"nDCG@10 model {model_metrics.ndcg_at_10:.4f} ± {model_metrics.ndcg_ci95:.4f} vs popularity "
        f"{popularity_metrics.ndcg_at_10:.4f} ± {popularity_metrics.ndcg_ci95:.4f} "
        f"(95% intervals over {model_metrics.users:,} users)"
    )
    passed = quality_gate(model_metrics, popularity_metrics, config.force)

    say("training the final model on all interactions" + left("train"))
    item_vectors = fit_item_vectors(data, tuning.best, config.seed, categories, say)
    warm = np.bincount(data.item, minlength=data.n_items) > 0
    item_vectors, content_model = content_vectors(_contents(items), item_vectors, warm)
    users = user_vectors(data, item_vectors, tuning.best)
    popularity = popularity_scores(data, tuning.popularity_half_life_days)
    say(f"{int((~warm).sum()):,} cold items got vectors from their categories and tags")

    say("tuning the nearest-neighbour index" + left("index"))
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(data.n_users, size=min(ANN_QUERIES, data.n_users), replace=False)
    visitors = new_visitor_vectors(item_vectors, warm, tuning.best, config.weights, n=ANN_QUERIES, seed=config.seed)
    queries = np.concatenate([users[np.sort(sample)], visitors])
    groups = np.repeat([0, 1], [len(sample), len(visitors)])
    choice, graph = ann.tune_index(item_vectors, queries, config.target_recall, say, groups)
    say(f"index: {choice.method}, recall@10 {choice.recall_at_10:.3f}, median {choice.median_query_us:.0f}µs")
    index = ann.ItemIndex(item_vectors, method=choice.method, graph=graph, ef_search=choice.ef_search)

    seen_indptr, seen_indices = _seen_csr(data)
    pool_users = _most_active(data, config.precompute_users)
    say(f"precomputing the best {config.pool_size} unseen items for {len(pool_users):,} known users")
    if item_models.chosen(tuning.best) != "als":  # the tuner allowed EASE and RP3beta only if all are pooled
        scorer = item_models.scorer(data, tuning.best, profile_matrix(data, tuning.best), categories)
        pool_rows, pool_scores = item_models.pools(scorer, data.seen_matrix().tocsr(), pool_users, config.pool_size)
    else:
        pool_rows, pool_scores = ann.precompute_pools(
            index,
            users[pool_users],
            seen_indptr,
            seen_indices,
            size=config.pool_size,
            progress=say,
            user_rows=pool_users,
        )

    version = snapshot.new_version()
    staging = snapshot.staging_dir(config.out, version)
    try:
        # The item graph goes to disk before the similar-items step builds a second graph: the
        # two held at once were a 1M-item build's peak of memory.
        if graph is not None:
            graph.save(staging)
        del index, graph
        neighbours, similar = similar_items(item_vectors, warm, config, rng, say)
        say(f"writing snapshot {version}" + left("write"))
        (staging / "items.json").write_bytes(msgspec.json.encode(items))
        (staging / "users.json").write_bytes(msgspec.json.encode(user_ids))
        np.save(staging / "item_vectors.npy", item_vectors)
        np.save(staging / "user_vectors.npy", users)
        np.save(staging / "popularity.npy", popularity)
        np.save(staging / "seen_indptr.npy", seen_indptr)
        np.save(staging / "seen_indices.npy", seen_indices)
        if neighbours is not None:
            np.save(staging / "neighbour_rows.npy", neighbours[0])
            np.save(staging / "neighbour_scores.npy", neighbours[1])
        np.save(staging / "pool_users.npy", pool_users)
        np.save(staging / "pool_rows.npy", pool_rows)
        np.save(staging / "pool_scores.npy", pool_scores)
        (staging / "popular.json").write_bytes(msgspec.json.encode(_popular_lists(popularity, items)))
        if similar is not None and similar[1] is not None:
            similar[1].save(staging, ann.SIMILAR_NAME)
        content_model.save(staging)
        if segment_model is not None:
            (staging / "segments.json").write_bytes(msgspec.json.encode(segment_model))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fields: dict[str, Any] = {
            "version": version,
            "created": datetime.now(UTC),
            "inputs": inputs,
            "parameters": {
                "model": msgspec.to_builtins(tuning.best),
                "event_weights": dict(config.weights),
                "popularity_half_life_days": tuning.popularity_half_life_days,
                "seed": config.seed,
                "tuning_trials": len(tuning.trials),
                "pinned": {
                    name: value for name, value in msgspec.to_builtins(config.pins).items() if value is not None
                },
                "pools": {"users": len(pool_users), "size": int(pool_rows.shape[1])},
                "neighbours": int(neighbours[0].shape[1]) if neighbours is not None else 0,
                "segments": config.segments,
            },
            "metrics": {
                "protocol": "temporal hold-out: each user's last 20% by time; seen items removed; k=10",
                "model": msgspec.to_builtins(model_metrics),
                "popularity": msgspec.to_builtins(popularity_metrics),
                "validation": msgspec.to_builtins(tuning.best_metrics),
                # Every configuration the tuner scored, on which split; and the chosen one's nDCG@10
                # over each split's tuned plain ALS (the smaller of the two is what it maximised).
                "tuning": {"ratios": tuning.ratios, "trials": msgspec.to_builtins(tuning.trials)},
                "segments": [
                    {"id": segment.id, "users": segment.users, "description": segment.description}
                    for segment in (segment_model.segments if segment_model is not None else [])
                ],
            },
            "counts": {
                "interactions": len(data),
                "users": data.n_users,
                "items": data.n_items,
                "cold_items": int((~warm).sum()),
                "items_missing_from_catalog": missing,
                "rejected": sum(r.rejected for r in reports),
                "duplicates": sum(r.duplicates for r in reports),
            },
            "index": msgspec.to_builtins(choice),
            # Above neighbours_max_items: how similar items are found (a graph over the unit vectors,
            # or exact search when that is faster at the target recall).
            "similar_index": msgspec.to_builtins(similar[0]) if similar is not None else {},
            "quality_gate": {"passed": passed, "forced": config.force and not passed},
        }
        fields["parameters"]["build"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(peak_mb, 1),
        }
        manifest = snapshot.publish(config.out, staging, fields)
        say(f"published {config.out / version} and pointed {config.out / snapshot.POINTER} at it")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build leaves no half-written snapshot
        raise
    return BuildResult(manifest, reports, model_metrics, popularity_metrics, tuning)
