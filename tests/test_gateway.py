"""The gateway's HTTP behaviour, in process (Starlette's TestClient runs the lifespan)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from annoy import AnnoyIndex
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.recommend.candidates import (
    LIVE_CATEGORY_POPULAR,
    LIVE_NEIGHBOURS,
    LIVE_POPULAR,
    MIN_GRAPH_DEPTH,
    graph_depth,
)
from gateway.snapshot import Snapshot, load
from gateway.store import Interaction, MemoryStore
from index_builder.ann import SIMILAR_NAME, Graph
from index_builder.model import fold_in, profile_confidence
from tests.gateways import ids, post_events, pseudonym, settings
from tests.snapshots import current_dir, republish
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    return load(current_dir(small_snapshots))


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(root))) as test_client:
        yield test_client


def exact_top(snap: Snapshot, vector: np.ndarray[Any, Any], excluded: set[int], n: int) -> list[str]:
    scores = np.asarray(snap.item_vectors @ vector, dtype=np.float64)
    scores[list(excluded)] = -np.inf
    scores[snap.stock == 0] = -np.inf  # out of stock: not served (setting serve_out_of_stock)
    order = np.argsort(-scores, kind="stable")[:n]
    return [snap.item_ids[row] for row in order]


# -- recommendations ------------------------------------------------------------------------


def test_known_user_gets_the_exact_top_items_by_their_vector_without_seen_ones(
    client: TestClient, snap: Snapshot
) -> None:
    user = next(iter(snap.user_row))
    row = snap.user_row[user]
    body = client.get("/v1/recommend", params={"user": user, "n": 10}).json()
    assert body["profile"] == "snapshot"
    assert body["fallback"] is None
    assert body["snapshot"] == snap.version
    assert ids(body) == exact_top(snap, snap.user_vectors[row], set(snap.seen(row).tolist()), 10)
    assert all(item["reasons"] == ["user-vector"] for item in body["items"])
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(len(repr(score).partition(".")[2]) <= 6 for score in scores)  # compact JSON numbers


def test_known_user_outside_the_precomputed_pools_is_searched_online_to_the_same_answer(
    root: Path, snap: Snapshot
) -> None:
    assert snap.pool_rows is not None
    wider = snap.pool_rows.shape[1] + 50  # wider than the build computed, so the gateway searches itself
    user = list(snap.user_row)[7]
    row = snap.user_row[user]
    with TestClient(create_app(settings(root, candidate_pool=wider))) as client:
        body = client.get("/v1/recommend", params={"user": user, "n": 20}).json()
    assert body["profile"] == "snapshot"
    assert ids(body) == exact_top(snap, snap.user_vectors[row], set(snap.seen(row).tolist()), 20)


def test_unknown_visitor_without_events_gets_popular_items_as_cold_start(client: TestClient, snap: Snapshot) -> None:
    body = client.get("/v1/recommend", params={"visitor": "stranger", "n": 5}).json()
    assert body["fallback"] == "cold-start"
    assert body["profile"] == "none"
    assert ids(body) == [snap.item_ids[row] for row in snap.popular[""][:5]]
    assert all(item["reasons"] == ["popular"] for item in body["items"])
    assert all(len(repr(item["score"]).partition(".")[2]) <= 6 for item in body["items"])


def live_vector(snap: Snapshot, rows: list[int], events: list[str]) -> np.ndarray[Any, Any]:
    weights = np.array([snap.event_weights[e] for e in events], dtype=np.float32)
    distinct, confidence = profile_confidence(np.array(rows, dtype=np.intp), weights, snap.params)
    return fold_in(snap.item_vectors, snap.gram, distinct, confidence)


def test_new_visitor_is_ranked_by_fold_in_among_neighbours_and_category_favourites_of_their_items(
    client: TestClient, snap: Snapshot
) -> None:
    clicked = [snap.item_ids[5], snap.item_ids[17]]
    post_events(client, "fresh", [(clicked[0], "click"), (clicked[1], "view")])
    body = client.get("/v1/recommend", params={"visitor": "fresh", "n": 8}).json()
    assert body["profile"] == "live"
    assert body["fallback"] is None
    assert snap.neighbour_rows is not None
    candidates = set(snap.neighbour_rows[[5, 17], :LIVE_NEIGHBOURS].ravel().tolist())
    candidates |= set(snap.popular[""][:LIVE_POPULAR].tolist())
    for category in snap.category_sets[5] | snap.category_sets[17]:
        candidates |= set(snap.popular[category][:LIVE_CATEGORY_POPULAR].tolist())
    outside = set(range(len(snap.item_ids))) - candidates
    vector = live_vector(snap, [5, 17], ["click", "view"])
    assert ids(body) == exact_top(snap, vector, {5, 17} | outside, 8)
    assert not set(clicked) & set(ids(body))


def test_without_precomputed_neighbours_a_new_visitor_is_searched_over_the_whole_catalog(
    root: Path, snap: Snapshot
) -> None:
    with TestClient(create_app(settings(root))) as client:
        recommender = client.app.state.gateway.recommender  # type: ignore[attr-defined]
        recommender.snap.neighbour_rows = recommender.snap.neighbour_scores = None  # as in a huge catalog
        post_events(client, "fresh", [(snap.item_ids[8], "purchase")])
        body = client.get("/v1/recommend", params={"visitor": "fresh", "n": 8}).json()
        similar = client.get(f"/v1/items/{snap.item_ids[3]}/similar", params={"n": 5}).json()
    assert ids(body) == exact_top(snap, live_vector(snap, [8], ["purchase"]), {8}, 8)
    unit = snap.item_vectors / np.linalg.norm(snap.item_vectors, axis=1, keepdims=True)
    scores = unit @ unit[3]
    scores[3] = -np.inf
    scores[snap.stock == 0] = -np.inf
    assert ids(similar) == [snap.item_ids[r] for r in np.argsort(-scores, kind="stable")[:5]]


def test_known_users_recent_events_are_left_out_too(client: TestClient, snap: Snapshot) -> None:
    user = next(iter(snap.user_row))
    first = ids(client.get("/v1/recommend", params={"user": user, "n": 3}).json())
    client.post("/v1/events", json={"events": [{"user": user, "item": first[0], "event": "purchase"}]})
    after = ids(client.get("/v1/recommend", params={"user": user, "n": 3}).json())
    assert first[0] not in after
    assert after[:2] == first[1:]


def test_category_filter_keeps_only_items_in_any_given_category_or_its_children(
    client: TestClient, snap: Snapshot
) -> None:
    user = next(iter(snap.user_row))
    parents = sorted({c.split("/")[0] for cats in snap.categories for c in cats})
    wanted = parents[:2]
    body = client.get("/v1/recommend", params={"user": user, "n": 12, "category": ",".join(wanted)}).json()
    assert len(body["items"]) == 12
    for item in body["items"]:
        assert {c.split("/")[0] for c in item["categories"]} & set(wanted)
    repeated = client.get("/v1/recommend", params=[("user", user), ("n", "12"), *[("category", c) for c in wanted]])
    assert ids(repeated.json()) == ids(body)


def test_explicit_exclude_is_honoured_and_the_list_stays_full(client: TestClient, snap: Snapshot) -> None:
    user = next(iter(snap.user_row))
    top = ids(client.get("/v1/recommend", params={"user": user, "n": 5}).json())
    body = client.get("/v1/recommend", params={"user": user, "n": 5, "exclude": ",".join(top[:2])}).json()
    assert ids(body)[:3] == top[2:]
    assert len(body["items"]) == 5


def test_a_narrow_category_is_filled_by_searching_within_it_then_by_popular(client: TestClient, snap: Snapshot) -> None:
    user = next(iter(snap.user_row))
    smallest = min(snap.category_rows, key=lambda c: len(snap.category_rows[c]))
    size = len(snap.category_rows[smallest])
    body = client.get("/v1/recommend", params={"user": user, "n": 100, "category": smallest}).json()
    returned = ids(body)
    assert len(returned) == len(set(returned))
    assert all(smallest in snap.category_sets[snap.row_of[i]] for i in returned)
    seen = {snap.item_ids[r] for r in snap.seen(snap.user_row[user]).tolist()}
    assert len([i for i in returned if i not in seen]) == len(returned)
    assert len(returned) <= size


def test_similar_items_are_the_nearest_by_cosine_and_exclude_the_item(client: TestClient, snap: Snapshot) -> None:
    item = snap.item_ids[3]
    body = client.get(f"/v1/items/{item}/similar", params={"n": 6}).json()
    unit = snap.item_vectors / np.linalg.norm(snap.item_vectors, axis=1, keepdims=True)
    scores = unit @ unit[3]
    scores[3] = -np.inf
    scores[snap.stock == 0] = -np.inf
    expected = [snap.item_ids[r] for r in np.argsort(-scores, kind="stable")[:6]]
    assert ids(body) == expected
    assert all(entry["reasons"] == [f"similar-to:{item}"] for entry in body["items"])


def test_popular_per_category_is_ordered_by_popularity(client: TestClient, snap: Snapshot) -> None:
    category = next(iter(sorted(snap.popular.keys() - {""})))
    body = client.get("/v1/popular", params={"category": category, "n": 5}).json()
    rows = [snap.row_of[i] for i in ids(body)]
    assert rows == snap.popular[category][:5].tolist()
    assert all(category in snap.category_sets[r] for r in rows)


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    given = client.get("/v1/popular", headers={"x-request-id": "abc-123"})
    assert given.json()["request_id"] == "abc-123" == given.headers["x-request-id"]
    first = client.get("/v1/popular").json()["request_id"]
    second = client.get("/v1/popular").json()["request_id"]
    assert first != second


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "code", "field"),
    [
        ({"n": "0"}, 400, "invalid-parameter", "n"),
        ({"n": "101"}, 400, "invalid-parameter", "n"),
        ({"n": "ten"}, 400, "invalid-parameter", "n"),
        ({"visitor": "x" * 300}, 400, "invalid-parameter", "visitor"),
        ({"colour": "red"}, 400, "unknown-parameter", "colour"),
        ({"category": "no-such-category"}, 400, "unknown-category", "category"),
    ],
)
def test_bad_query_is_a_4xx_with_a_machine_readable_reason(
    client: TestClient, query: dict[str, str], status: int, code: str, field: str
) -> None:
    response = client.get("/v1/recommend", params=query)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["field"] == field


def test_a_parameter_given_twice_is_refused(client: TestClient) -> None:
    response = client.get("/v1/recommend?n=2&n=3")
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "invalid-parameter", "message": "`n` may be given once", "field": "n"}


def test_unknown_item_is_a_404_and_unknown_route_a_json_404(client: TestClient) -> None:
    response = client.get("/v1/items/nope/similar")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "unknown-item")
    response = client.get("/v2/anything")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "not-found")
    response = client.delete("/v1/recommend")
    assert (response.status_code, response.json()["error"]["code"]) == (405, "method-not-allowed")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid-body"),
        (b'{"events": []}', "application/json", 400, "invalid-body"),
        (b"[]", "application/json", 400, "invalid-body"),
        (b'{"events": 5}', "application/json", 400, "invalid-body"),
        (b'{"evnets": []}', "application/json", 400, "invalid-body"),
        (b"42", "application/json", 400, "invalid-body"),
        (
            b'{"visitor": "v", "item": "i00001", "event": "view"}',
            "application/x-www-form-urlencoded",
            415,
            "unsupported-media-type",
        ),
    ],
)
def test_an_unusable_body_is_a_4xx_and_stores_nothing(
    client: TestClient, body: bytes, content_type: str, status: int, code: str
) -> None:
    response = client.post("/v1/events", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert client.get("/v1/recommend", params={"visitor": "v"}).json()["fallback"] == "cold-start"


@pytest.mark.parametrize(
    ("bad", "code", "field"),
    [
        ({"visitor": "v", "item": "i00002", "event": "click", "extra": 1}, "invalid-event", "extra"),
        ({"item": "i00002", "event": "click"}, "invalid-event", "visitor"),
        ({"visitor": "v", "event": "click"}, "missing-item", "item"),
        ({"visitor": "v", "item": "i00002", "event": "teleport"}, "unknown-event", "event"),
        ({"visitor": "v", "item": "i00002", "event": "View"}, "invalid-event", "event"),
        ({"visitor": "v", "item": "i00002", "event": "view", "ts": time.time() + 3600}, "ts-in-future", "ts"),
        ({"visitor": "v", "item": "i00002", "event": "view", "ts": "yesterday"}, "invalid-event", "ts"),
        ({"visitor": "v", "item": 17, "event": "view"}, "invalid-event", "item"),
        ("not an event", "invalid-event", None),
    ],
)
def test_invalid_events_are_rejected_one_by_one_and_valid_ones_kept(
    client: TestClient, snap: Snapshot, bad: object, code: str, field: str | None
) -> None:
    good = {"visitor": "v", "item": snap.item_ids[1], "event": "click"}
    response = client.post("/v1/events", json={"events": [good, bad]})
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (1, 0)
    (rejected,) = body["rejected"]
    assert (rejected["index"], rejected["code"], rejected.get("field")) == (1, code, field)
    assert rejected["message"]
    after = client.get("/v1/recommend", params={"visitor": "v"}).json()
    assert after["profile"] == "live"  # the valid event was stored
    assert snap.item_ids[1] not in ids(after)
    # and a batch with nothing valid is a 422 naming every problem, storing nothing
    response = client.post("/v1/events", json=[bad, bad])
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid-events"
    assert [p.split(":")[0] for p in error["problems"]] == [
        f"events[{i}]" + (f".{field}" if field else "") for i in (0, 1)
    ]


def test_one_event_a_bare_array_or_a_beacon_are_all_accepted(client: TestClient, snap: Snapshot) -> None:
    one = {"visitor": "a", "item": snap.item_ids[1], "event": "view"}
    assert client.post("/v1/events", json=one).json()["accepted"] == 1
    assert client.post("/v1/events", json=[one, {**one, "visitor": "b"}]).json()["accepted"] == 2
    # navigator.sendBeacon(url, JSON.stringify(batch)) sends text/plain;charset=UTF-8
    beacon = msgspec.json.encode({"events": [{**one, "visitor": "c"}]})
    response = client.post("/v1/events", content=beacon, headers={"content-type": "text/plain;charset=UTF-8"})
    assert (response.status_code, response.json()["accepted"]) == (202, 1)
    for visitor in "abc":
        assert client.get("/v1/recommend", params={"visitor": visitor}).json()["profile"] == "live"


def test_a_retried_event_is_counted_once(root: Path, snap: Snapshot) -> None:
    store = MemoryStore()
    with TestClient(create_app(settings(root), store=store)) as client:
        batch = [
            {"visitor": "v", "item": snap.item_ids[1], "event": "view", "id": "e-1"},
            {"visitor": "v", "item": snap.item_ids[2], "event": "view", "id": "e-2"},
        ]
        first, again = (client.post("/v1/events", json=batch).json() for _ in range(2))
        assert first == {"accepted": 2, "duplicates": 0, "rejected": [], "unconsented": 0}
        assert again == {"accepted": 0, "duplicates": 2, "rejected": [], "unconsented": 0}
        metrics = client.get("/metrics").text
        profile = asyncio.run(store.profile(pseudonym(client, "v"), limit=10, now=time.time()))
    assert len(profile.recent) == 2
    assert profile.counters["view/1h"] == 2
    assert "tailor_events_duplicate_total 2.0" in metrics


def test_timestamps_are_normalised_to_utc(root: Path, snap: Snapshot) -> None:
    store = MemoryStore()
    item = snap.item_ids[1]
    with TestClient(create_app(settings(root), store=store)) as client:
        batch = [
            {"visitor": "v", "item": item, "event": "view", "ts": "2026-11-22T10:00:00+01:00"},
            {"visitor": "v", "item": item, "event": "view", "ts": "2026-11-22T09:00:01"},  # no offset: UTC
            {"visitor": "v", "item": item, "event": "view", "ts": "2026-11-22T09:00:02Z"},
            {"visitor": "v", "item": item, "event": "view", "ts": 1_795_338_003_000},  # Date.now() milliseconds
            {"visitor": "v", "item": item, "event": "view", "ts": 1_795_338_004.5},  # seconds
        ]
        assert client.post("/v1/events", json=batch).json()["accepted"] == 5
        profile = asyncio.run(store.profile(pseudonym(client, "v"), limit=10, now=time.time()))
    base = 1_795_338_000.0  # 2026-11-22T09:00:00Z
    assert [i.ts for i in profile.recent] == [base, base + 1, base + 2, base + 3, base + 4.5]
    assert profile.last_seen == base + 4.5


def test_custom_event_types_are_accepted_once_declared(root: Path, snap: Snapshot) -> None:
    event = {"visitor": "v", "item": snap.item_ids[1], "event": "wishlist"}
    with TestClient(create_app(settings(root))) as client:
        assert client.post("/v1/events", json=event).json()["error"]["code"] == "invalid-events"
    store = MemoryStore()
    with TestClient(create_app(settings(root, custom_events=["wishlist", "share"]), store=store)) as client:
        assert client.post("/v1/events", json=event).json()["accepted"] == 1
        assert client.post("/v1/events", json={"visitor": "v", "event": "share"}).json()["accepted"] == 1  # no item
        profile = asyncio.run(store.profile(pseudonym(client, "v"), limit=10, now=time.time()))
    assert profile.counters["wishlist/1h"] == profile.counters["share/1h"] == 1


def test_too_large_batch_is_refused(root: Path) -> None:
    with TestClient(create_app(settings(root, max_events_per_batch=3))) as client:
        events = [{"visitor": "v", "item": "i00001", "event": "view"}] * 4
        response = client.post("/v1/events", json={"events": events})
        assert (response.status_code, response.json()["error"]["code"]) == (413, "batch-too-large")
        event = b'{"visitor": "v", "event": "search", "query": "' + b"x" * 2000 + b'"}'
        huge = b'{"events": [' + b",".join([event] * 3000) + b"]}"  # 6 MB
        response = client.post("/v1/events", content=huge)
        assert (response.status_code, response.json()["error"]["code"]) == (413, "body-too-large")


# -- operations ---------------------------------------------------------------------------------


def test_metrics_count_latency_per_route_and_fallbacks_by_cause(client: TestClient) -> None:
    client.get("/v1/recommend", params={"visitor": "nobody"})
    client.get("/v1/recommend", params={"n": "0"})
    text = client.get("/metrics").text
    assert 'tailor_request_seconds_count{route="recommend"} 2.0' in text
    assert 'tailor_responses_total{route="recommend",status="400"} 1.0' in text
    assert 'tailor_fallbacks_total{cause="cold-start"} 1.0' in text
    assert "tailor_snapshot_age_seconds " in text
    assert 'tailor_candidate_cache_lookups{result="miss"}' in text


def test_metrics_show_how_many_visitors_the_memory_store_holds(client: TestClient) -> None:
    app: Any = client.app
    item_ids = app.state.gateway.recommender.snap.item_ids
    post_events(client, "metrics-a", [(item_ids[0], "view")])
    post_events(client, "metrics-b", [(item_ids[1], "view"), (item_ids[2], "add_to_cart")])
    store = app.state.gateway.store
    text = client.get("/metrics").text
    assert f"tailor_store_visitors {float(len(store))}" in text
    assert len(store) >= 2
    assert f"tailor_store_bytes {float(store.bytes)}" in text


def test_openapi_documents_every_route_with_its_parameters(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    routes = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    app: Any = client.app
    # A WebSocket route has no methods: its handshake is a GET.
    app_routes = {(m, r.path) for r in app.routes for m in (getattr(r, "methods", None) or ("GET",)) if m != "HEAD"}
    assert routes == app_routes
    names = {p["name"] for p in doc["paths"]["/v1/recommend"]["get"]["parameters"]}
    assert names == {"user", "visitor", "token", "n", "category", "exclude", "page", "device", "referrer", "country"}
    assert "Recommendations" in doc["components"]["schemas"]
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/v1/items/{item_id}/similar" in page.text


def test_events_are_stored_oldest_first_with_their_own_timestamps(root: Path) -> None:
    store = MemoryStore()
    with TestClient(create_app(settings(root), store=store)) as client:
        start = round(time.time()) - 100
        batch = [
            {"visitor": "v1", "item": "i00003", "event": "view", "ts": start + 50},
            {"visitor": "v1", "item": "i00002", "event": "click", "ts": start},
            {"visitor": "v1", "event": "search", "query": "shoes"},
        ]
        assert client.post("/v1/events", json={"events": batch}).status_code == 202
        profile = asyncio.run(store.profile(pseudonym(client, "v1"), limit=5, now=time.time()))
    assert profile.recent == [
        Interaction("i00002", "click", start),
        Interaction("i00003", "view", start + 50),
    ]
    totals = {name: n for name, n in profile.counters.items() if "@" not in name and name.endswith("/1h")}
    assert totals == {"view/1h": 1, "click/1h": 1, "search/1h": 1}
    assert profile.counters["view@item:i00003/7d"] == 1


def hnsw_index(staging: Path, vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
    Graph.build(vectors).save(staging)
    return {"method": "hnsw", "ef_search": 400}


def annoy_index(staging: Path, vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
    """What builds before the HNSW graph shipped: an Annoy forest over the dot product."""
    forest = AnnoyIndex(vectors.shape[1], "dot")
    for row, vector in enumerate(vectors):
        forest.add_item(row, vector.tolist())
    forest.build(20)
    forest.save(str(staging / "items.ann"))
    return {"method": "annoy", "n_trees": 20, "search_k": 40_000}


@pytest.mark.parametrize(("index", "method"), [(hnsw_index, "hnsw"), (annoy_index, "annoy")], ids=["hnsw", "annoy"])
def test_new_visitors_are_answered_from_the_snapshots_index(
    root: Path, index: Callable[[Path, npt.NDArray[np.float32]], dict[str, Any]], method: str
) -> None:
    republish(root, index=index)
    with TestClient(create_app(settings(root))) as client:
        recommender = client.app.state.gateway.recommender  # type: ignore[attr-defined]
        snap = recommender.snap
        assert snap.method == method
        snap.neighbour_rows = snap.neighbour_scores = None  # as in a huge catalog: the index answers
        post_events(client, "fresh", [(snap.item_ids[8], "purchase")])
        body = client.get("/v1/recommend", params={"visitor": "fresh", "n": 8}).json()
    assert ids(body) == exact_top(snap, live_vector(snap, [8], ["purchase"]), {8}, 8)


def test_a_pool_from_the_graph_holds_as_many_rows_as_its_search_is_tuned_for(root: Path) -> None:
    def shallow_graph(staging: Path, vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
        return {**hnsw_index(staging, vectors), "ef_search": 16}

    republish(root, index=shallow_graph)
    with TestClient(create_app(settings(root))) as client:
        recommender = client.app.state.gateway.recommender  # type: ignore[attr-defined]
        snap, candidates = recommender.snap, recommender.candidates
        assert len(snap.item_ids) > MIN_GRAPH_DEPTH < candidates.pool_size
        vector = live_vector(snap, [8], ["purchase"])
        pool = candidates.top(vector, exclude=np.array([8]))
        assert len(pool.rows) == graph_depth(candidates.pool_size, 16) == MIN_GRAPH_DEPTH
        exact = exact_top(snap, vector, {8}, MIN_GRAPH_DEPTH)
        assert len({snap.item_ids[row] for row in pool.rows} & set(exact)) >= 0.9 * MIN_GRAPH_DEPTH
        snap.neighbour_rows = snap.neighbour_scores = None  # as in a huge catalog: the graph answers
        post_events(client, "fresh", [(snap.item_ids[8], "purchase")])
        body = client.get("/v1/recommend", params={"visitor": "fresh", "n": 8}).json()
    assert ids(body) == exact_top(snap, vector, {8}, 8)
    assert graph_depth(200, 384) == 200
    assert graph_depth(200, 128) == 128


def test_similar_items_come_from_the_similar_items_graph_where_the_snapshot_has_no_lists(root: Path) -> None:
    def unit_graph(staging: Path, vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
        Graph.build(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).save(staging, SIMILAR_NAME)
        return {"method": "hnsw", "ef_search": 400}

    republish(root, similar=unit_graph)
    with TestClient(create_app(settings(root))) as client:
        gateway = client.app.state.gateway  # type: ignore[attr-defined]
        snap = gateway.recommender.snap
        assert snap.neighbour_rows is None and snap.similar_index is not None
        searched = 0

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal searched
            searched += 1
            return search(*args, **kwargs)

        search = snap.similar_index.search
        snap.similar_index.search = counting
        body = client.get(f"/v1/items/{snap.item_ids[3]}/similar", params={"n": 6}).json()
    unit = snap.item_vectors / np.linalg.norm(snap.item_vectors, axis=1, keepdims=True)
    scores = unit @ unit[3]
    scores[3] = -np.inf
    scores[snap.stock == 0] = -np.inf
    assert ids(body) == [snap.item_ids[r] for r in np.argsort(-scores, kind="stable")[:6]]
    assert searched == 1


def test_items_added_since_the_build_join_a_graph_pool_without_deepening_it(root: Path) -> None:
    def shallow_graph(staging: Path, vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
        return {**hnsw_index(staging, vectors), "ef_search": 16}

    republish(root, index=shallow_graph)
    with TestClient(create_app(settings(root))) as client:
        gateway = client.app.state.gateway  # type: ignore[attr-defined]
        built = gateway.recommender.snap
        body = {"title": "Brand new", "categories": built.categories[11], "tags": sorted(built.item_tags[11])}
        assert client.put("/v1/items/new-1", json=body).status_code == 200
        wait_until(lambda: "new-1" in gateway.recommender.snap.row_of)
        snap, candidates = gateway.recommender.snap, gateway.recommender.candidates
        row = snap.row_of["new-1"]
        assert row >= snap.built_rows
        pool = candidates.top(snap.item_vectors[row] * 10, exclude=np.array([8]))
    assert len(pool.rows) == MIN_GRAPH_DEPTH < candidates.pool_size
    assert row in pool.rows.tolist()
    assert np.all(np.diff(pool.scores) <= 0)
