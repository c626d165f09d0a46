"""Model segments: visitors grouped by how they behave, alike in the builder and the gateway.

The features are RFM-style and use only what a live gateway profile holds (its sliding-window
counters and `last_seen`), so the builder, which computes them from the event log as of the log's
end, and the gateway, which computes them per request, put a visitor in the same cluster:

    recency        log1p(days since the newest event), capped at a year; also the value for "never"
    frequency      log1p(views + clicks in the window)
    purchases      log1p(purchases in the window): the M of RFM. The store counts events, not
                   order values, so how often a visitor buys stands in for how much they spend.
    add_to_cart    log1p(add-to-cart events in the window)
    affinity:C     the share of the window's views that were of items in top-level category C,
                   for the catalog's most popular top-level categories

The features are standardised over the build's users and clustered with K-Means; a visitor's
segment is the nearest centroid, named `model:<k>` (model:0 the largest cluster).

Where the two sides can still differ: the store's windows slide by estimate (exact at bucket
edges) and stop adding counters past `max_counters`; the builder's cleaned log has no item-less
events, so a search does not move its `last_seen` as it moves the gateway's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from itertools import repeat

import msgspec
import numpy as np
import numpy.typing as npt
from scipy.cluster.vq import kmeans2, vq

from index_builder.schema import Interaction, Item

Matrix = npt.NDArray[np.float64]

PREFIX = "model:"
DAY = 86_400.0
WINDOW_DAYS = 30  # the gateway names this window's counters "…/30d" (gateway.store.base.window_label)
RECENCY_CAP_DAYS = 365.0
AFFINITY_CATEGORIES = 8
MAX_FIT_USERS = 100_000  # a seeded sample beyond this is clustered; every user is then labelled
ITERATIONS = 50

# Raw activity, the columns `log_activity` counts and a profile's counters give: then one column
# of category views per affinity category.
DAYS, VIEWS, CLICKS, PURCHASES, CARTS, FIRST_CATEGORY = range(6)
COUNTED_EVENTS = {"view": VIEWS, "click": CLICKS, "purchase": PURCHASES, "add_to_cart": CARTS}  # in column order
BEHAVIOUR = ["recency", "frequency", "purchases", "add_to_cart"]


class Segment(msgspec.Struct, frozen=True):
    id: str
    description: str
    users: int  # of the build's users in it
    # The centroid in raw units (days, counts in the window, shares): a typical member.
    centre: dict[str, float]


class SegmentModel(msgspec.Struct, frozen=True, dict=True):  # dict: room for the cached counter keys
    """What `segments.json` holds: enough to put any visitor's profile into a cluster."""

    features: list[str]
    mean: list[float]
    scale: list[float]  # standard deviation over the build's users (1 where it is 0)
    affinity: list[str]  # top-level categories, most popular first
    affinity_members: list[list[str]]  # the listed categories whose view counters add up to each
    centroids: list[list[float]]  # standardised, one per segment
    segments: list[Segment]
    window_days: int = WINDOW_DAYS
    recency_cap_days: float = RECENCY_CAP_DAYS

    def __post_init__(self) -> None:
        width = len(BEHAVIOUR) + len(self.affinity)
        if not len(self.features) == len(self.mean) == len(self.scale) == width:
            raise ValueError(f"segment model: {width} features expected")
        if len(self.affinity_members) != len(self.affinity):
            raise ValueError("segment model: affinity members do not match the affinity categories")
        if not self.centroids or len(self.centroids) != len(self.segments):
            raise ValueError("segment model: one centroid per segment, at least one")
        if any(len(centroid) != width for centroid in self.centroids) or min(self.scale) <= 0:
            raise ValueError("segment model: centroids or scales of the wrong shape")

    @property
    def window(self) -> str:
        return f"{self.window_days}d"

    @cached_property
    def _keys(self) -> CounterKeys:
        return counter_keys(self.affinity_members, self.window_days)

    def counter_names(self) -> list[str]:
        """The profile counters `assign` reads ("view/30d", "view@category:shoes/boots/30d", ...)."""
        return [*self._keys.events, *sorted(self._keys.members)]

    def vector(self, counters: Mapping[str, int], last_seen: float | None, now: float) -> list[float]:
        """The visitor's features, unstandardised, as plain floats."""
        return _features_of(_raw_of(counters, last_seen, now, self._keys, len(self.affinity)), self.recency_cap_days)

    @cached_property
    def _blank_z(self) -> list[float]:
        """The standardised features of a visitor with no activity: a start that `assign` changes
        only where a visitor has some (a category's share of views is 0 for most categories)."""
        raw = [math.inf] + [0.0] * (FIRST_CATEGORY - 1 + len(self.affinity))
        features = _features_of(raw, self.recency_cap_days)
        return [(x - m) / s for x, m, s in zip(features, self.mean, self.scale, strict=True)]

    def assign(self, counters: Mapping[str, int], last_seen: float | None, now: float) -> str:
        """The id of the segment whose centroid is nearest to the visitor's standardised features.

        The features of `vector`, with the same arithmetic (a property test compares the two), in
        one function: it runs on every request of a visitor with activity, where each call and
        comprehension of `vector` cost a cold fetch. Plain Python: on vectors this short numpy's
        per-call overhead costs more than the arithmetic."""
        keys, mean, scale = self._keys, self.mean, self.scale
        z = self._blank_z.copy()
        get = counters.get
        events = keys.events
        views, clicks, purchases, carts = get(events[0], 0), get(events[1], 0), get(events[2], 0), get(events[3], 0)
        days = math.inf if last_seen is None else (now - last_seen) / DAY
        z[0] = (math.log1p(min(max(days, 0.0), self.recency_cap_days)) - mean[0]) / scale[0]
        z[1] = (math.log1p(views + clicks) - mean[1]) / scale[1]
        z[2] = (math.log1p(purchases) - mean[2]) / scale[2]
        z[3] = (math.log1p(carts) - mean[3]) / scale[3]
        if views > 0:  # no views, no shares (as _features_of)
            seen: dict[int, int] = {}
            for key in counters.keys() & keys.members:
                at = keys.affinity_of[key]
                seen[at] = seen.get(at, 0) + counters[key]
            for at, count in seen.items():
                column = len(BEHAVIOUR) + at
                z[column] = (min(count / views, 1.0) - mean[column]) / scale[column]
        distances = [math.dist(z, centroid) for centroid in self.centroids]
        return self.segments[distances.index(min(distances))].id


class CounterKeys(msgspec.Struct, frozen=True):
    """The counter names a profile is read through, built once per model."""

    events: list[str]  # "view/30d", "click/30d", ...: raw columns VIEWS to CARTS
    affinity_of: dict[str, int]  # "view@category:<member>/30d" -> its affinity category's index
    members: frozenset[str]  # the keys of affinity_of


def counter_keys(affinity_members: Sequence[Sequence[str]], window_days: int = WINDOW_DAYS) -> CounterKeys:
    window = f"{window_days}d"
    affinity_of = {
        f"view@category:{member}/{window}": index
        for index, members in enumerate(affinity_members)
        for member in members
    }
    return CounterKeys([f"{event}/{window}" for event in COUNTED_EVENTS], affinity_of, frozenset(affinity_of))


def _raw_of(
    counters: Mapping[str, int], last_seen: float | None, now: float, keys: CounterKeys, n_affinity: int
) -> list[float]:
    raw: list[float] = [math.inf if last_seen is None else (now - last_seen) / DAY]
    raw += map(counters.get, keys.events, repeat(0))
    seen = [0] * n_affinity
    if raw[VIEWS] > 0:  # no views, no shares
        # A keys view intersected with a set walks the smaller of the two in C: a visitor's few
        # category counters, not one lookup per member of every affinity category.
        for key in counters.keys() & keys.members:
            seen[keys.affinity_of[key]] += counters[key]
    raw += seen
    return raw


def _features_of(raw: Sequence[float], recency_cap_days: float) -> list[float]:
    """Raw activity (columns DAYS to CARTS, then category views) to features: the one place both
    sides do this arithmetic."""
    days, views, clicks, purchases, carts, *seen = raw
    # An item listed in two subcategories of C counts twice in the counters: hence the cap at 1.
    shares = [min(count / views, 1.0) for count in seen] if views > 0 else [0.0] * len(seen)
    recency = math.log1p(min(max(days, 0.0), recency_cap_days))
    return [recency, math.log1p(views + clicks), math.log1p(purchases), math.log1p(carts), *shares]


def features(
    counters: Mapping[str, int],
    last_seen: float | None,
    now: float,
    affinity_members: Sequence[Sequence[str]],
    *,
    window_days: int = WINDOW_DAYS,
    recency_cap_days: float = RECENCY_CAP_DAYS,
) -> npt.NDArray[np.float64]:
    """A visitor's features from a gateway profile: counters such as {"view/30d": 12,
    "view@category:shoes/boots/30d": 5}, and the Unix time of their newest event."""
    raw = _raw_of(counters, last_seen, now, counter_keys(affinity_members, window_days), len(affinity_members))
    return np.array(_features_of(raw, recency_cap_days), dtype=np.float64)


def feature_names(affinity: Sequence[str]) -> list[str]:
    return [*BEHAVIOUR, *(f"affinity:{category}" for category in affinity)]


def top_level(category: str) -> str:
    return category.split("/", maxsplit=1)[0]


def affinity_categories(
    items: Sequence[Item], interactions_per_item: npt.NDArray[np.int64], limit: int = AFFINITY_CATEGORIES
) -> tuple[list[str], list[list[str]]]:
    """The `limit` top-level categories with the most interactions, and for each the categories
    items are listed in under it: the gateway counts views per listed category ("shoes/boots"),
    so a top-level category's views are the sum of its members' counters."""
    listed: set[str] = set()
    per_top: dict[str, int] = {}
    for item, count in zip(items, interactions_per_item.tolist(), strict=True):
        listed.update(item.categories)
        for category in {top_level(c) for c in item.categories}:
            per_top[category] = per_top.get(category, 0) + count
    chosen = sorted(per_top, key=lambda c: (-per_top[c], c))[:limit]
    members: dict[str, list[str]] = {category: [] for category in chosen}
    for category in sorted(listed):
        group = members.get(top_level(category))
        if group is not None:
            group.append(category)
    return chosen, [members[category] for category in chosen]


def log_activity(
    events: Iterable[Interaction],
    user_rows: Mapping[str, int],
    items: Sequence[Item],
    affinity_members: Sequence[Sequence[str]],
    *,
    end: float,
    window_days: int = WINDOW_DAYS,
) -> Matrix:
    """Raw activity per user row as of `end`, counted from the event log the way the gateway's
    counters count it: events in the trailing window per type, views per category the item is
    listed in, and the newest event of any type. Users absent from `user_rows` are skipped."""
    column_of = {member: FIRST_CATEGORY + k for k, group in enumerate(affinity_members) for member in group}
    columns_of_item = {
        item.item_id: [column_of[c] for c in item.categories if c in column_of] for item in items if item.categories
    }
    raw = np.zeros((len(user_rows), FIRST_CATEGORY + len(affinity_members)), dtype=np.float64)
    last_seen = np.full(len(user_rows), -math.inf)
    start = end - window_days * DAY
    for record in events:
        row = user_rows.get(record.user_id)
        if row is None:
            continue
        ts = record.timestamp.timestamp()
        if ts > end:  # not yet happened as of `end`
            continue
        last_seen[row] = max(last_seen[row], ts)
        column = COUNTED_EVENTS.get(record.event)
        if column is None or ts <= start:
            continue
        raw[row, column] += 1
        if column == VIEWS and record.item_id is not None:
            for category_column in columns_of_item.get(record.item_id, ()):
                raw[row, category_column] += 1
    raw[:, DAYS] = (end - last_seen) / DAY
    return raw


def feature_matrix(raw: Matrix, recency_cap_days: float = RECENCY_CAP_DAYS) -> Matrix:
    """`log_activity`'s rows as features, through the same code the gateway runs per visitor."""
    width = raw.shape[1] - FIRST_CATEGORY + len(BEHAVIOUR)
    rows = [_features_of(row, recency_cap_days) for row in raw.tolist()]
    return np.array(rows, dtype=np.float64).reshape(len(rows), width)


def fit(
    matrix: Matrix,
    affinity: Sequence[str],
    affinity_members: Sequence[Sequence[str]],
    k: int,
    *,
    seed: int = 0,
    window_days: int = WINDOW_DAYS,
) -> tuple[SegmentModel, npt.NDArray[np.intp]]:
    """K-Means (scipy's kmeans2, k-means++ start, seeded) on standardised features; the model and
    each row's segment index. Clusters that end up empty are dropped, so there may be fewer than
    `k`; they are numbered by size, largest first."""
    if len(matrix) == 0 or k < 1:
        raise ValueError("segments need at least one user and one cluster")
    mean = matrix.mean(axis=0)
    scale = matrix.std(axis=0)
    scale[scale <= 1e-12] = 1.0  # a constant feature: nothing to standardise
    z = (matrix - mean) / scale
    rng = np.random.default_rng(seed)
    sample = z if len(z) <= MAX_FIT_USERS else z[rng.choice(len(z), MAX_FIT_USERS, replace=False)]
    k = min(k, len(np.unique(sample, axis=0)))
    with warnings.catch_warnings():
        # An empty cluster keeps its old centre and scipy warns; it is dropped below instead.
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        centroids, _ = kmeans2(sample, k, iter=ITERATIONS, minit="++", seed=seed)
    # kmeans2's labels belong to the centroids before its last update; label by the final ones.
    labels, _ = vq(z, centroids)
    sizes = np.bincount(labels, minlength=len(centroids))
    order = [c for c in np.argsort(-sizes, kind="stable").tolist() if sizes[c] > 0]
    renumber = np.zeros(len(centroids), dtype=np.intp)
    renumber[order] = np.arange(len(order))
    names = feature_names(affinity)
    segments = []
    for position, cluster in enumerate(order):
        centre = _centre(centroids[cluster] * scale + mean, affinity)
        segments.append(Segment(f"{PREFIX}{position}", describe(centre), int(sizes[cluster]), centre))
    model = SegmentModel(
        features=names,
        mean=mean.tolist(),
        scale=scale.tolist(),
        affinity=list(affinity),
        affinity_members=[list(group) for group in affinity_members],
        centroids=centroids[order].tolist(),
        segments=segments,
        window_days=window_days,
    )
    return model, renumber[labels]


def _centre(unstandardised: Matrix, affinity: Sequence[str]) -> dict[str, float]:
    days, frequency, purchases, carts, *shares = unstandardised.tolist()
    centre = {
        "days_since_seen": math.expm1(days),
        "views_and_clicks": math.expm1(frequency),
        "purchases": math.expm1(purchases),
        "add_to_cart": math.expm1(carts),
        **{f"share:{category}": share for category, share in zip(affinity, shares, strict=True)},
    }
    return {name: round(max(value, 0.0), 3) for name, value in centre.items()}


def describe(centre: Mapping[str, float]) -> str:
    """A few words from a centroid in raw units, e.g. "recent, frequent, buys, mostly shoes"."""
    days, frequency = centre["days_since_seen"], centre["views_and_clicks"]
    words = [
        "recent" if days <= 7 else "lapsing" if days <= 30 else "dormant",
        "frequent" if frequency >= 10 else "occasional" if frequency >= 2 else "rare",
        "buys" if centre["purchases"] >= 0.5 else "fills carts" if centre["add_to_cart"] >= 0.5 else "browses",
    ]
    shares = {name.removeprefix("share:"): value for name, value in centre.items() if name.startswith("share:")}
    if shares and max(shares.values()) >= 0.5:
        words.append(f"mostly {max(shares, key=lambda category: shares[category])}")
    return ", ".join(words)
