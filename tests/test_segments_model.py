"""Model segments: the builder clusters users by behaviour, the gateway puts a visitor into the
same cluster from their live counters, and the model travels in the snapshot like every file."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules import conditions
from gateway.rules.conditions import Compiler
from gateway.rules.segments import Segmenter
from gateway.snapshot import Snapshot, SnapshotRefusedError, load
from gateway.store import Recorded, window_label
from gateway.store.base import DEFAULT_WINDOWS
from index_builder import segments, snapshot
from index_builder.build import BuildConfig, assemble_inputs, fit_segments, read_events
from index_builder.schema import Interaction, Item
from index_builder.segments import SegmentModel
from tailor.cli import main
from tests.snapshots import current_dir

DAY = 86_400.0
NOW = 1_800_000_000.0
AFFINITY = ["shoes", "books"]
MEMBERS = [["shoes/boots", "shoes/sneakers"], ["books/fiction"]]


def raw_activity(days: float, views: int, clicks: int, purchases: int, carts: int, *category_views: int) -> list[float]:
    return [days, views, clicks, purchases, carts, *category_views]


def population(seed: int = 1) -> segments.Matrix:
    """40 heavy buyers (seen today, many views, several purchases) then 40 one-time viewers (one
    view two months ago, which a 30-day window no longer counts)."""
    rng = np.random.default_rng(seed)
    buyers = [
        raw_activity(rng.uniform(0, 1), *rng.integers([20, 5, 3], [40, 15, 8]).tolist(), 2, 10, 2) for _ in range(40)
    ]
    viewers = [raw_activity(rng.uniform(50, 70), 0, 0, 0, 0, 0, 0) for _ in range(40)]
    return segments.feature_matrix(np.array(buyers + viewers, dtype=np.float64))


def gateway_counters(
    events: list[Interaction], items: list[Item], end: float
) -> dict[str, tuple[dict[str, int], float]]:
    """Each user's counters and last_seen as the gateway's store holds them at `end`: the counter
    names of gateway.store.Recorded (the item's categories as the snapshot lists them), counted in
    every default window. Exact counts: the store's sliding windows only estimate the older part."""
    categories = {item.item_id: tuple(item.categories) for item in items}
    counters: dict[str, Counter[str]] = {}
    last_seen: dict[str, float] = {}
    for event in events:
        ts = event.timestamp.timestamp()
        last_seen[event.user_id] = max(last_seen.get(event.user_id, -math.inf), ts)
        recorded = Recorded(event.event, ts, event.item_id, categories=categories.get(event.item_id or "", ()))
        mine = counters.setdefault(event.user_id, Counter())
        for window in DEFAULT_WINDOWS:
            if end - window < ts <= end:
                mine.update(f"{name}/{window_label(window)}" for name in recorded.counter_names())
    return {user: (dict(counters[user]), last_seen[user]) for user in counters}


def test_features_are_read_from_a_gateway_profiles_counters() -> None:
    counters = {
        "view/30d": 8,
        "click/30d": 2,
        "purchase/30d": 1,
        "add_to_cart/30d": 3,
        "view/1d": 99,  # other windows do not count
        "view@category:shoes/boots/30d": 3,
        "view@category:shoes/sneakers/30d": 1,
        "view@category:garden/30d": 4,  # not an affinity category
        "view@item:i1/30d": 5,
    }
    found = segments.features(counters, NOW - 2 * DAY, NOW, MEMBERS)
    expected = [math.log1p(2), math.log1p(10), math.log1p(1), math.log1p(3), 4 / 8, 0.0]
    np.testing.assert_allclose(found, expected)


def test_a_visitor_never_seen_is_a_year_away_and_has_no_activity() -> None:
    found = segments.features({}, None, NOW, MEMBERS)
    assert found.tolist() == [math.log1p(365), 0.0, 0.0, 0.0, 0.0, 0.0]


def test_a_category_share_never_exceeds_one_when_items_are_listed_twice() -> None:
    counters = {"view/30d": 2, "view@category:shoes/boots/30d": 2, "view@category:shoes/sneakers/30d": 2}
    assert segments.features(counters, NOW, NOW, MEMBERS)[4] == 1.0


def test_clusters_are_the_same_for_the_same_seed() -> None:
    matrix = population()
    first, first_labels = segments.fit(matrix, AFFINITY, MEMBERS, 3, seed=7)
    second, second_labels = segments.fit(matrix, AFFINITY, MEMBERS, 3, seed=7)
    assert first == second
    assert first_labels.tolist() == second_labels.tolist()


def test_heavy_buyers_and_one_time_viewers_land_in_different_clusters() -> None:
    model, labels = segments.fit(population(), AFFINITY, MEMBERS, 2, seed=0)
    assert len(set(labels[:40].tolist())) == 1
    assert len(set(labels[40:].tolist())) == 1
    assert labels[0] != labels[40]
    buyers, viewers = model.segments[labels[0]], model.segments[labels[40]]
    assert (buyers.users, viewers.users) == (40, 40)
    assert buyers.description.startswith("recent, frequent, buys")
    assert viewers.description == "dormant, rare, browses"


def test_a_new_visitor_is_assigned_to_the_cluster_that_behaves_like_them() -> None:
    model, labels = segments.fit(population(), AFFINITY, MEMBERS, 2, seed=0)
    counters = {"view/30d": 30, "click/30d": 8, "purchase/30d": 5, "add_to_cart/30d": 2}
    assert model.assign(counters, NOW - 3600, NOW) == model.segments[labels[0]].id
    assert model.assign({}, None, NOW) == model.segments[labels[40]].id


def test_the_gateway_puts_a_visitor_with_no_activity_where_the_model_does_at_any_time() -> None:
    """Segmenter remembers the segment of an empty profile; the model's answer for one must not
    depend on the time."""
    model, labels = segments.fit(population(), AFFINITY, MEMBERS, 2, seed=0)
    segmenter = Segmenter([], Compiler(DEFAULT_WINDOWS, window_label), model)
    for now in (0.0, NOW, NOW + 400 * DAY):
        assert model.assign({}, None, now) == model.segments[labels[40]].id
        assert segmenter.assign(conditions.facts(now), personal=True) == [model.segments[labels[40]].id]
    active = {"view/30d": 30, "click/30d": 8, "purchase/30d": 5, "add_to_cart/30d": 2}
    busy = conditions.facts(NOW, counters=active, last_seen=NOW - 3600)
    assert segmenter.assign(busy, personal=True) == [model.segments[labels[0]].id]
    assert segmenter.assign(conditions.facts(NOW), personal=False) == []


@settings(max_examples=300, deadline=None)
@given(
    views=st.dictionaries(
        st.sampled_from(["shoes/boots", "shoes/sneakers", "books/fiction", "garden"]), st.integers(0, 40), max_size=4
    ),
    totals=st.tuples(*[st.integers(0, 60)] * 4),
    ago=st.one_of(st.none(), st.floats(-DAY, 800 * DAY)),
    k=st.integers(1, 4),
)
def test_assign_puts_a_visitor_in_the_cluster_nearest_to_their_vector(
    views: dict[str, int], totals: tuple[int, int, int, int], ago: float | None, k: int
) -> None:
    """`assign` (one function, for speed) against its definition: the standardised `vector`'s
    nearest centroid (the first of equally near ones)."""
    model, _ = segments.fit(population(), AFFINITY, MEMBERS, k, seed=0)
    counters = {f"{event}/30d": count for event, count in zip(segments.COUNTED_EVENTS, totals, strict=True) if count}
    counters |= {f"view@category:{category}/30d": count for category, count in views.items() if count}
    counters["click@item:i1/7d"] = 3  # counters the model does not read
    last_seen = None if ago is None else NOW - ago
    z = [(x - m) / s for x, m, s in zip(model.vector(counters, last_seen, NOW), model.mean, model.scale, strict=True)]
    distances = [math.dist(z, centroid) for centroid in model.centroids]
    assert model.assign(counters, last_seen, NOW) == model.segments[distances.index(min(distances))].id


def test_segment_ids_are_model_k_numbered_by_size() -> None:
    model, labels = segments.fit(population()[:50], AFFINITY, MEMBERS, 2, seed=0)
    assert [s.id for s in model.segments] == ["model:0", "model:1"]
    assert [s.users for s in model.segments] == [40, 10]
    assert np.bincount(labels).tolist() == [40, 10]


def test_asking_for_more_clusters_than_distinct_users_gives_fewer() -> None:
    matrix = segments.feature_matrix(
        np.array([raw_activity(1, 5, 0, 0, 0, 0, 0)] * 3 + [raw_activity(90, 0, 0, 0, 0, 0, 0)])
    )
    model, _ = segments.fit(matrix, AFFINITY, MEMBERS, 5, seed=0)
    assert [s.users for s in model.segments] == [3, 1]


def test_the_model_round_trips_through_json() -> None:
    model, _ = segments.fit(population(), AFFINITY, MEMBERS, 2, seed=0)
    decoded = msgspec.json.decode(msgspec.json.encode(model), type=SegmentModel)
    assert decoded == model
    assert decoded.assign({"view/30d": 3}, NOW - DAY, NOW) == model.assign({"view/30d": 3}, NOW - DAY, NOW)


def test_a_model_whose_centroids_do_not_match_its_features_is_refused() -> None:
    model, _ = segments.fit(population(), AFFINITY, MEMBERS, 2, seed=0)
    broken = msgspec.to_builtins(model)
    broken["centroids"][0].pop()
    with pytest.raises(msgspec.ValidationError, match="centroids"):
        msgspec.json.decode(msgspec.json.encode(broken), type=SegmentModel)


def test_affinity_is_the_most_popular_top_level_categories_with_their_listed_subcategories() -> None:
    items = [
        Item("a", categories=["shoes/boots"]),
        Item("b", categories=["shoes/sneakers", "books/fiction"]),
        Item("c", categories=["garden"]),
        Item("d"),
    ]
    chosen, members = segments.affinity_categories(items, np.array([5, 3, 4, 9]), limit=2)
    assert chosen == ["shoes", "garden"]
    assert members == [["shoes/boots", "shoes/sneakers"], ["garden"]]


# The builder and the gateway on a built snapshot of the session's small synthetic shop.


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    return load(current_dir(small_snapshots))


def test_the_gateway_puts_every_known_user_in_the_cluster_the_builder_put_them_in(
    small_shop: Path, snap: Snapshot
) -> None:
    config = BuildConfig(events=[small_shop / "events.csv"], items=small_shop / "items.jsonl")
    events, given_items, _ = read_events(config, lambda _: None)
    data, catalog, _ = assemble_inputs(events, given_items, config, lambda _: None)
    built, labels = fit_segments(events, data, catalog, lambda _: None, k=5, seed=0)
    assert snap.segment_model == built  # the shipped model is the one these steps give
    assert len(built.segments) > 1

    end = max(event.timestamp for event in events).timestamp()
    profiles = gateway_counters(events, catalog.items, end)
    for row, user in enumerate(catalog.user_ids):
        counters, last_seen = profiles[user]
        assert snap.segment_model.assign(counters, last_seen, end) == built.segments[labels[row]].id, user


def test_a_build_ships_segments_json_under_the_manifests_checksums(small_snapshots: Path) -> None:
    directory = current_dir(small_snapshots)
    manifest = snapshot.load_manifest(directory)
    assert "segments.json" in manifest.files
    assert snapshot.verify(directory) == []
    assert manifest.parameters["segments"] == 5
    summary = manifest.metrics["segments"]
    assert [s["id"] for s in summary] == [f"model:{k}" for k in range(len(summary))]
    assert sum(s["users"] for s in summary) == manifest.counts["users"]
    assert all(s["description"] for s in summary)


def test_the_gateway_snapshot_carries_the_segment_model(snap: Snapshot) -> None:
    assert snap.segment_model is not None
    assert snap.segment_model.window == window_label(30 * DAY)
    assert snap.segment_model.assign({}, None, NOW).startswith("model:")


def test_a_tampered_segments_json_is_refused(root: Path) -> None:
    directory = current_dir(root)
    path = directory / "segments.json"
    text = path.read_text(encoding="utf-8")
    at = text.index('"centroids":[[') + len('"centroids":[[')
    digit = next(i for i in range(at, len(text)) if text[i].isdigit())
    # Another digit, same size, still a valid model: only the checksum can tell.
    path.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :], encoding="utf-8")
    assert load(directory, verify=False).segment_model is not None
    with pytest.raises(SnapshotRefusedError, match=r"segments\.json: sha256 mismatch"):
        load(directory)


def test_item_attributes_come_from_the_item_table(small_shop: Path, snap: Snapshot) -> None:
    listed = [json.loads(line) for line in (small_shop / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    for item in listed[:50]:
        row = snap.row_of[item["item_id"]]
        assert snap.item_tags[row] == frozenset(item["tags"])
        assert snap.prices[row] == item["price"]
        assert snap.stock[row] == item["stock"]
    assert snap.prices.dtype == np.float64 and snap.stock.dtype == np.int64
    assert len(snap.item_tags) == len(snap.prices) == len(snap.stock) == len(snap.item_ids)


# A build with --segments 0, from a catalog whose first item has no price and no stock.


@pytest.fixture(scope="module")
def unsegmented(small_snapshots: Path, small_shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shop = tmp_path_factory.mktemp("unpriced-shop")
    lines = (small_shop / "items.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    del first["price"], first["stock"]
    (shop / "items.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n", encoding="utf-8")
    root = tmp_path_factory.mktemp("unsegmented")
    args = ["build", "--events", str(small_shop / "events.csv"), "--items", str(shop / "items.jsonl")]
    assert main([*args, "--out", str(root), "--segments", "0", "--quiet", "--max-trials", "2"]) == 0
    return current_dir(root)


def test_segments_0_writes_no_segments_json(unsegmented: Path) -> None:
    manifest = snapshot.load_manifest(unsegmented)
    assert "segments.json" not in manifest.files
    assert not (unsegmented / "segments.json").exists()
    assert manifest.parameters["segments"] == 0
    assert manifest.metrics["segments"] == []


def test_a_snapshot_without_segments_json_loads_without_a_segment_model(unsegmented: Path) -> None:
    assert load(unsegmented).segment_model is None


def test_unknown_price_and_stock_are_nan_and_minus_one(unsegmented: Path, small_shop: Path) -> None:
    first = json.loads((small_shop / "items.jsonl").read_text(encoding="utf-8").splitlines()[0])
    loaded = load(unsegmented)
    row = loaded.row_of[first["item_id"]]
    assert math.isnan(loaded.prices[row])
    assert loaded.stock[row] == -1
