"""Training: ALS item vectors, recency-weighted user vectors (content vectors for cold items: index_builder.content),
time-decayed popularity, and the hyperparameter search on a validation split of the training data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from implicit.cpu import _als
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from index_builder import ease, item_models, rp3
from index_builder.content import with_category_rows
from index_builder.dataset import Interactions, history_positions, random_split, temporal_split
from index_builder.evaluate import Metrics, Scorer, evaluate
from index_builder.model import ModelParams, recency_weights

Vectors = npt.NDArray[np.float32]
Progress = Callable[[str], None]

# The search space. The user model (recency blend) is cheap to try, as only the fold-in changes,
# so every ALS fit is scored with several of them. A half-life of 0 means no decay at all (the
# long-term share is then moot): the plain ALS fold-in, each split's own tuned-ALS baseline.
FACTORS: tuple[int, ...] = (32, 64, 128)
REGULARIZATION = (1.0, 10.0, 30.0)
ALPHA = (1.0, 5.0, 20.0)
HALF_LIVES = (2.0, 5.0, 15.0)
LONG_TERM_SHARES = (0.0, 0.1, 0.2, 0.5)
EASE_REGULARIZATION = (10.0, 50.0, 200.0, 1000.0, 5000.0)
# RP3beta's grid (α, β, neighbours per item) when `--item-model rp3` is pinned; neighbours are
# capped by rp3.MAX_WEIGHTS. Not tried otherwise: on no hold-out of docs/quality.md did RP3beta,
# tuned on validation, beat tuned ALS or EASE (nor on the validation splits, the 1M-event shop's too).
RP3_GRID: tuple[tuple[float, float, int], ...] = ((0.5, 0.0, 200), (0.5, 0.2, 200), (0.5, 0.4, 200), (0.75, 0.4, 200))
# The weights of the category rows in ALS's input (`fit_item_vectors`) the tuner tries on the chosen
# setting and user model, when the catalog has categories (and the builder allows it: at most
# CONTENT_MAX_ITEMS items).
CONTENT_WEIGHTS = (8.0, 32.0, 128.0)
# Above this many items new visitors' candidates come from a search of the item graph (the builder's
# neighbour lists stop at the same size), and the category rows make that search harder. On the
# 1M-item shop of docs/performance.md, weight 32 won validation by 3.8%, but the hold-out did not
# move (nDCG@10 0.0931 against 0.0952, ± 0.011). The graph then needed efSearch 1024 instead of 384
# for its recall target (1.26 ms against 0.86 ms a query). New visitors' served recall@10 fell from
# 0.967 to 0.940. A pinned --content-weight still applies at any size.
CONTENT_MAX_ITEMS = 300_000
# The same rows' weights in EASE's (binary) input, tried on the best EASE configuration.
EASE_CONTENT_WEIGHTS = (32.0, 128.0, 512.0)
# The weights of the visit rows in EASE's input (`ease.fit`), tried with every λ beside none, where
# they fit (`ease.fits(..., visits=True)`). One weight: on ml-latest-small's random protocol 1, 2 and
# 4 scored within 0.7% of each other on the hold-out (docs/quality.md), and each costs a fit per λ.
EASE_VISIT_WEIGHTS = (2.0,)
Setting = tuple[int, float, float]  # factors, regularization, alpha
# A fit given a `progress` says how far it got at most this often: at 20M events one is two minutes.
ITERATION_PROGRESS_S = 10.0


def confidence_matrix(data: Interactions) -> sp.csr_matrix:
    """Users x items, summed event weights per pair (duplicates add up)."""
    matrix = sp.csr_matrix((data.weight, (data.user, data.item)), shape=(data.n_users, data.n_items))
    matrix.sum_duplicates()
    return matrix


def profile_matrix(data: Interactions, params: ModelParams) -> sp.csr_matrix:
    """Users x items, event weights blended of a lasting and a decaying part by how many events ago
    each happened in the user's history (`model.recency_weights`)."""
    order, _, events_ago = history_positions(data)
    decayed = data.weight[order] * recency_weights(events_ago, params)
    matrix = sp.csr_matrix((decayed, (data.user[order], data.item[order])), shape=(data.n_users, data.n_items))
    matrix.sum_duplicates()
    return matrix


def fit_item_vectors(
    data: Interactions,
    params: ModelParams,
    seed: int = 0,
    content: sp.csr_matrix | None = None,
    progress: Progress | None = None,
) -> Vectors:
    """ALS's item vectors; with `params.content_weight`, fitted with `content`'s rows (categories x
    items, `content.category_rows`) times that weight below the users' rows. With `progress`, a
    line on the iterations done and the time to go every ITERATION_PROGRESS_S."""
    matrix = confidence_matrix(data)
    if params.content_weight > 0:
        matrix = with_category_rows(matrix, content, params.content_weight)
    # OpenBLAS's own threads fight implicit's and make ALS many times slower.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=seed,
        )
        callback = None if progress is None else iteration_progress(params, progress)
        model.fit(matrix, show_progress=False, callback=callback)
    return np.ascontiguousarray(model.item_factors, dtype=np.float32)


def iteration_progress(
    params: ModelParams, progress: Progress, clock: Callable[[], float] = time.perf_counter
) -> Callable[[int, float, float], None]:
    """implicit's per-iteration callback (iteration from 0, its seconds, its loss): `progress` told
    the iterations done and the time to go, at most every ITERATION_PROGRESS_S, never after the last."""
    started = said = clock()

    def report(iteration: int, _seconds: float, _loss: float) -> None:
        nonlocal said
        now, done = clock(), iteration + 1
        if done < params.iterations and now - said >= ITERATION_PROGRESS_S:
            said = now
            left = (now - started) / done * (params.iterations - done)
            progress(f"ALS: iteration {done}/{params.iterations} ({now - started:.0f}s, about {left:.0f}s to go)")

    return report


def user_vectors(data: Interactions, item_vectors: Vectors, params: ModelParams) -> Vectors:
    """Every user's vector folded in from their recency-weighted history (see `model.fold_in`)."""
    profile = profile_matrix(data, params)
    profile.data *= params.alpha
    users = np.zeros((data.n_users, item_vectors.shape[1]), dtype=np.float32)
    gram = (item_vectors.T @ item_vectors).astype(np.float32)
    with threadpool_limits(1, "blas"):
        _als._least_squares(
            gram,
            profile.indptr,
            profile.indices,
            profile.data.astype(np.float32),
            users,
            item_vectors,
            params.regularization,
            num_threads=0,
        )
    return users


def dot_scorer(users: Vectors, items: Vectors) -> Scorer:
    return lambda batch: users[batch] @ items.T


def popularity_scores(data: Interactions, half_life_days: float, now: int | None = None) -> Vectors:
    """Event weights per item, each decayed by its age at `now` (default: the newest event)."""
    if len(data) == 0:
        return np.zeros(data.n_items, dtype=np.float32)
    now = int(data.ts.max()) if now is None else now
    age_days = np.maximum(now - data.ts, 0) / 86400.0
    decay = np.power(0.5, age_days / half_life_days) if half_life_days > 0 else np.ones(len(data))
    scores = np.bincount(data.item, weights=data.weight * decay, minlength=data.n_items)
    return scores.astype(np.float32)


def popularity_scorer(data: Interactions, half_life_days: float) -> Scorer:
    scores = popularity_scores(data, half_life_days)
    return lambda batch: np.broadcast_to(scores, (len(batch), len(scores)))


class Trial(msgspec.Struct, frozen=True):
    """One configuration scored on one validation split."""

    params: ModelParams
    split: str  # "temporal" or "random"
    ndcg_at_10: float
    seconds: float


class Pins(msgspec.Struct, frozen=True):
    """Choices an expert fixed (`tailor build --factors ...`); None = the tuner chooses."""

    factors: int | None = None
    regularization: float | None = None
    alpha: float | None = None
    half_life_events: float | None = None
    long_term_share: float | None = None
    item_model: item_models.ItemModel | None = None
    content_weight: float | None = None
    ease_regularization: float | None = None
    ease_content_weight: float | None = None
    ease_visit_weight: float | None = None


class TuneResult(msgspec.Struct, frozen=True):
    best: ModelParams
    best_metrics: Metrics  # the chosen configuration on the temporal validation split
    trials: list[Trial]
    popularity_half_life_days: float
    # Per split: the chosen configuration's nDCG@10 over the best plain-ALS one's (tuned ALS).
    ratios: dict[str, float] = msgspec.field(default_factory=dict)


UserModel = tuple[float, float]  # half_life_events, long_term_share
PLAIN: UserModel = (0.0, 0.0)  # no decay: implicit's own ALS user vectors, the baseline


def user_models(pins: Pins) -> list[UserModel]:
    """The recency blends the tuner tries: plain ALS first, then each half-life and share."""
    if pins.half_life_events is not None:
        shares = LONG_TERM_SHARES if pins.long_term_share is None else (pins.long_term_share,)
        return list(dict.fromkeys((pins.half_life_events, share) for share in shares))
    if pins.long_term_share is not None:
        return [(half_life, pins.long_term_share) for half_life in HALF_LIVES]
    return [PLAIN, *((half_life, share) for half_life in HALF_LIVES for share in LONG_TERM_SHARES)]


def tune(
    train: Interactions,
    *,
    max_trials: int = 20,
    iterations: int = 15,
    seed: int = 0,
    progress: Progress | None = None,
    max_eval_users: int = 3000,
    pins: Pins | None = None,
    pooled: bool = True,
    ease_allowed: bool = True,
    visits_allowed: bool = True,
    content_allowed: bool = True,
    content: sp.csr_matrix | None = None,
) -> TuneResult:
    """Pick ALS settings and the user model's recency blend on two validation splits of `train`.

    One split holds out each user's latest 20% (what comes next), the other a random 20% (what
    else they like, whenever): a choice that fits only one shape of hold-out loses on the other.
    Each configuration's score is the smaller of its two ratios to that split's tuned ALS (the best
    plain, decay-free fold-in found there), so the winner is the one best on both.

    Coordinate search over the ALS settings: starting from the defaults, sweep one setting at a
    time over its values and keep the best, until a round changes nothing or `max_trials` ALS fits
    (two per setting, one per split) are spent. The first setting is scored with every user model,
    later ones with plain ALS and the first's two best, and the winner again with all of them.

    Then, given the items' category rows (`content`, `content.category_rows`), the chosen setting
    and user model are fitted again with each of CONTENT_WEIGHTS (two fits each, beyond
    `max_trials`; only with `content_allowed` or a pinned weight), and the best weight is kept if
    its smaller ratio is higher; the best EASE configuration likewise with each of
    EASE_CONTENT_WEIGHTS.

    Then the item-item models that serve known users from pools (when `pooled`: every known user
    gets one): EASE where it fits (`ease.fits`, and `ease_allowed`), with each λ of
    EASE_REGULARIZATION, each without and (where `ease.fits` them, and `visits_allowed`) with the
    visit rows of EASE_VISIT_WEIGHTS, and, only when pinned, RP3beta with each setting of RP3_GRID,
    each on both splits and with every user model (`_score_item_model`).
    EASE is chosen instead of ALS if its smaller ratio is higher, a pinned model always; the ALS
    part of the result then still serves visitors the build did not know. `ease_allowed` and
    `visits_allowed` say whether the data the chosen model will be fitted to fits them, when that
    is more than `train`.
    """
    pins = pins or Pins()
    splits = {"temporal": temporal_split(train), "random": random_split(train, seed=seed)}
    trials: list[Trial] = []
    ndcg: dict[str, dict[tuple[Setting, UserModel], float]] = {name: {} for name in splits}
    fitted: dict[Setting, dict[str, Vectors]] = {}  # item vectors kept only for the best setting so far
    metrics_of: dict[tuple[Setting, UserModel], Metrics] = {}
    all_models = user_models(pins)

    def baseline(split: str) -> float:
        plain = [value for (_, model), value in ndcg[split].items() if model == PLAIN]
        return max(plain) if plain else max(ndcg[split].values(), default=0.0)

    def ratio(config: tuple[Setting, UserModel]) -> float:
        ratios = [
            ndcg[name][config] / baseline(name) if baseline(name) > 0 else 1.0
            for name in splits
            if config in ndcg[name]
        ]
        return min(ratios) if len(ratios) == len(splits) else float("-inf")

    def score(key: Setting, models: list[UserModel]) -> None:
        if all((key, model) in ndcg[name] for model in models for name in splits):
            return
        if key not in fitted:
            if 2 * len(fitted) >= max_trials:
                return
            fitted[key] = {}
        factors, regularization, alpha = key
        for name, (fit, validation) in splits.items():
            if name not in fitted[key]:
                started = time.perf_counter()
                fitted[key][name] = fit_item_vectors(fit, ModelParams(factors, regularization, alpha, iterations), seed)
                fit_seconds = time.perf_counter() - started
            else:
                fit_seconds = 0.0
            items = fitted[key][name]
            for half_life, share in models:
                if (key, (half_life, share)) in ndcg[name]:
                    continue
                params = ModelParams(factors, regularization, alpha, iterations, half_life, share)
                scored_at = time.perf_counter()
                scorer = dot_scorer(user_vectors(fit, items, params), items)
                metrics = evaluate(scorer, fit, validation, max_users=max_eval_users, seed=seed)
                ndcg[name][(key, (half_life, share))] = metrics.ndcg_at_10
                if name == "temporal":
                    metrics_of[(key, (half_life, share))] = metrics
                trials.append(Trial(params, name, metrics.ndcg_at_10, fit_seconds + time.perf_counter() - scored_at))
                fit_seconds = 0.0
        leader = max(fitted, key=setting_score)
        for other, vectors in fitted.items():
            if other != leader:
                vectors.clear()  # at a million events, 20 fits' vectors would not fit the memory budget
        if progress is not None:
            best = max((ratio(config), config) for config in ndcg["temporal"])
            mine = max(ratio((key, model)) for model in models)
            progress(
                f"tuning: trial {2 * len(fitted)}/{max_trials} factors={factors} reg={regularization:g} "
                f"alpha={alpha:g}: {mine:.3f}x tuned ALS on the worse split; best {best[0]:.3f}x "
                f"(temporal {ndcg['temporal'][best[1]]:.4f}, random {ndcg['random'][best[1]]:.4f} nDCG@10)"
            )

    def setting_score(key: Setting) -> float:
        return max((ratio((key, model)) for model in all_models if (key, model) in ndcg["temporal"]), default=-1e9)

    axes = (
        FACTORS if pins.factors is None else (pins.factors,),
        REGULARIZATION if pins.regularization is None else (pins.regularization,),
        ALPHA if pins.alpha is None else (pins.alpha,),
    )
    start: Setting = (
        64 if pins.factors is None else pins.factors,
        10.0 if pins.regularization is None else pins.regularization,
        5.0 if pins.alpha is None else pins.alpha,
    )
    score(start, all_models)
    ranked = sorted(all_models, key=lambda model: ratio((start, model)), reverse=True)
    searched = list(dict.fromkeys([PLAIN, *ranked[:2]])) if PLAIN in all_models else ranked[:3]
    current, changed = start, True
    while changed and 2 * len(fitted) < max_trials:
        changed = False
        for axis in range(3):
            for candidate in _along(current, axis, axes):
                score(candidate, searched)
                if setting_score(candidate) > setting_score(current):
                    current, changed = candidate, True
    score(max(fitted, key=setting_score), all_models)  # baselines moved since: the leader now
    chosen = max(
        ((ratio((key, model)), (key, model)) for key, model in ndcg["temporal"] if model in all_models),
        key=lambda entry: entry[0],
    )[1]
    (factors, regularization, alpha), (half_life, share) = chosen
    best = ModelParams(factors, regularization, alpha, iterations, half_life, share)
    ratios = {name: ndcg[name][chosen] / baseline(name) if baseline(name) > 0 else 1.0 for name in splits}
    best_metrics = metrics_of[chosen]
    baselines = {name: baseline(name) for name in splits}
    weights = CONTENT_WEIGHTS if pins.content_weight is None else (pins.content_weight,)
    sized = pins.content_weight is not None or content_allowed
    if content is not None and content.shape[0] > 0 and sized and any(weight > 0 for weight in weights):
        for weight in weights:
            params = msgspec.structs.replace(best, content_weight=weight)
            scored = _score_content(splits, params, content, baselines, trials, max_eval_users, seed)
            worse = _worse_ratio(scored)
            if progress is not None:
                progress(f"tuning: category rows at weight {weight:g}: {worse:.3f}x tuned ALS on the worse split")
            if pins.content_weight is not None or worse > min(ratios.values()):
                best = params
                ratios = {name: ratio for name, (ratio, _) in scored.items()}
                best_metrics = scored["temporal"][1]
    # Per item model, its candidate settings, each scored with every user model.
    families: dict[item_models.ItemModel, list[ModelParams]] = {}
    if pooled and ease_allowed and ease.fits(train):
        lambdas = EASE_REGULARIZATION if pins.ease_regularization is None else (pins.ease_regularization,)
        visits = (0.0, *EASE_VISIT_WEIGHTS) if pins.ease_visit_weight is None else (pins.ease_visit_weight,)
        # all of `train`, not the splits, as the model is fitted to at least all of it
        if any(weight > 0 for weight in visits) and not (visits_allowed and ease.fits(train, visits=True)):
            if pins.ease_visit_weight is not None and progress is not None:
                progress(f"tuning: EASE's visit rows do not fit ({ease.VISITS_MAX_DENSE:,} rows or items); none used")
            visits = (0.0,)
        families["ease"] = [
            msgspec.structs.replace(best, ease_regularization=value, ease_visit_weight=weight)
            for weight in visits
            for value in lambdas
        ]
    if pooled and pins.item_model == "rp3":  # only when pinned: it won no hold-out (docs/quality.md)
        grid = dict.fromkeys((a, b, rp3.capped(k, train.n_items)) for a, b, k in RP3_GRID)
        families["rp3"] = [msgspec.structs.replace(best, rp3_alpha=a, rp3_beta=b, rp3_neighbours=k) for a, b, k in grid]
    for family, candidates in families.items():
        if pins.item_model not in (None, family):
            continue
        found = _score_item_model(splits, candidates, all_models, baselines, trials, max_eval_users, seed, progress)
        params, scored = max(found.items(), key=lambda entry: _worse_ratio(entry[1]))
        ease_weights = EASE_CONTENT_WEIGHTS if pins.ease_content_weight is None else (pins.ease_content_weight,)
        if family == "ease" and content is not None and content.shape[0] > 0 and any(w > 0 for w in ease_weights):
            rows = [msgspec.structs.replace(params, ease_content_weight=weight) for weight in ease_weights]
            model = [(params.half_life_events, params.long_term_share)]
            with_rows = _score_item_model(
                splits, rows, model, baselines, trials, max_eval_users, seed, progress, content
            )
            found = with_rows if pins.ease_content_weight is not None else found | with_rows
            params, scored = max(found.items(), key=lambda entry: _worse_ratio(entry[1]))
        if pins.item_model == family or _worse_ratio(scored) > min(ratios.values()):
            best = params
            ratios = {name: ratio for name, (ratio, _) in scored.items()}
            best_metrics = scored["temporal"][1]
    fit, validation = splits["temporal"]
    popularity_half_life = max(
        (7.0, 30.0, 0.0),
        key=lambda days: (
            evaluate(popularity_scorer(fit, days), fit, validation, max_users=max_eval_users, seed=seed).ndcg_at_10
        ),
    )
    return TuneResult(best, best_metrics, trials, popularity_half_life, ratios)


def _worse_ratio(scored: dict[str, tuple[float, Metrics]]) -> float:
    """The smaller of a configuration's ratios to each split's tuned ALS: what the tuner ranks by."""
    return min(ratio for ratio, _ in scored.values())


def _score_content(  # noqa: PLR0917 - the tuner's state, passed on once
    splits: dict[str, tuple[Interactions, Interactions]],
    params: ModelParams,
    content: sp.csr_matrix,
    baselines: dict[str, float],
    trials: list[Trial],
    max_eval_users: int,
    seed: int,
) -> dict[str, tuple[float, Metrics]]:
    """ALS fitted with the category rows at `params.content_weight`, on each split: its ratio to the
    split's tuned ALS, and its metrics."""
    scored: dict[str, tuple[float, Metrics]] = {}
    for name, (fit, validation) in splits.items():
        started = time.perf_counter()
        items = fit_item_vectors(fit, params, seed, content)
        scorer = dot_scorer(user_vectors(fit, items, params), items)
        metrics = evaluate(scorer, fit, validation, max_users=max_eval_users, seed=seed)
        trials.append(Trial(params, name, metrics.ndcg_at_10, time.perf_counter() - started))
        scored[name] = (metrics.ndcg_at_10 / baselines[name] if baselines[name] > 0 else 1.0, metrics)
    return scored


def _score_item_model(  # noqa: PLR0917 - the tuner's state, passed on once
    splits: dict[str, tuple[Interactions, Interactions]],
    candidates: list[ModelParams],
    models: list[UserModel],
    baselines: dict[str, float],
    trials: list[Trial],
    max_eval_users: int,
    seed: int,
    progress: Progress | None,
    content: sp.csr_matrix | None = None,
) -> dict[ModelParams, dict[str, tuple[float, Metrics]]]:
    """One item-item model (EASE or RP3beta, `item_models`) on each split: its ratio to the split's
    tuned ALS, and its metrics, per candidate setting and user model.

    Every candidate with every user model: one fit per candidate and split, then one scoring per
    user model, which only reweights the profile rows the fit scores. (Scoring the user models on
    the neutral profile's best candidate only would let the neutral profile pick λ, and its ranking
    of candidates is decided by the temporal split, where a profile without recency loses.)"""
    found: dict[ModelParams, dict[str, tuple[float, Metrics]]] = {}

    def with_model(params: ModelParams, model: UserModel) -> ModelParams:
        return msgspec.structs.replace(params, half_life_events=model[0], long_term_share=model[1])

    for name, (fit, validation) in splits.items():
        profiles = {model: profile_matrix(fit, with_model(candidates[0], model)).tocsr() for model in models}
        for setting in candidates:
            started = time.perf_counter()
            apply = item_models.fit(fit, setting, content)
            for model, rows in profiles.items():

                def scorer(
                    batch: npt.NDArray[np.int32], rows: sp.csr_matrix = rows, apply: ease.Apply = apply
                ) -> Vectors:
                    return apply(rows[batch])

                metrics = evaluate(scorer, fit, validation, max_users=max_eval_users, seed=seed)
                params = with_model(setting, model)
                trials.append(Trial(params, name, metrics.ndcg_at_10, time.perf_counter() - started))
                started = time.perf_counter()
                ratio = metrics.ndcg_at_10 / baselines[name] if baselines[name] > 0 else 1.0
                found.setdefault(params, {})[name] = (ratio, metrics)
            if progress is not None:
                top = max(found[with_model(setting, model)][name][0] for model in models)
                progress(f"tuning: {_describe(setting)} on the {name} split: best {top:.3f}x tuned ALS")
    return found


def _describe(params: ModelParams) -> str:
    if item_models.chosen(params) == "ease":
        rows = f" category rows {params.ease_content_weight:g}" if params.ease_content_weight > 0 else ""
        visits = f" visit rows {params.ease_visit_weight:g}" if params.ease_visit_weight > 0 else ""
        return f"EASE λ={params.ease_regularization:g}{rows}{visits}"
    return f"RP3beta α={params.rp3_alpha:g} β={params.rp3_beta:g} neighbours={params.rp3_neighbours}"


def _along(current: Setting, axis: int, axes: tuple[Sequence[float], ...]) -> list[Setting]:
    values = list(current)
    found: list[Setting] = []
    for value in axes[axis]:
        values[axis] = value
        found.append((int(values[0]), float(values[1]), float(values[2])))
    return found
