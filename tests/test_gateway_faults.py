"""The gateway's fallbacks (stale snapshot, slow or failing store) and its snapshot swaps, in process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.snapshot import Snapshot, load
from gateway.store import CounterKey, MemoryStore, Profile, Requirement, Store, open_store
from index_builder import snapshot
from tests.conftest import RedisServer
from tests.gateways import ids, post_events, settings
from tests.snapshots import corrupt, current_dir, republish
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    return load(current_dir(small_snapshots))


# -- fallbacks --------------------------------------------------------------------------------


def test_stale_snapshot_answers_popular_with_the_cause(root: Path) -> None:
    republish(root, age=timedelta(days=2))
    with TestClient(create_app(settings(root, max_snapshot_age_s=3600))) as client:
        body = client.get("/v1/recommend", params={"visitor": "x"}).json()
        similar = client.get("/v1/items/i00001/similar").json()
        ready = client.get("/readyz").json()
    assert body["fallback"] == similar["fallback"] == "stale-snapshot"
    assert all(item["reasons"] == ["popular"] for item in body["items"])
    assert ready["stale"] is True


class SlowStore(MemoryStore):
    """A store that takes longer than the gateway will wait."""

    in_process = False

    async def profile(
        self,
        visitor: str,
        *,
        limit: int,
        now: float,
        counters: bool | Sequence[CounterKey] = True,
        requires: Requirement | None = None,
        inbox: Requirement | None = None,
    ) -> Profile:
        await asyncio.sleep(0.5)  # the behaviour under test: a store slower than the gateway's timeout
        return await super().profile(visitor, limit=limit, now=now, requires=requires, inbox=inbox)


def test_slow_store_times_out_into_popular_items(root: Path, snap: Snapshot) -> None:
    app = create_app(settings(root, store_timeout_ms=20, store_retry_after_s=0), store=SlowStore())
    with TestClient(app) as client:
        user = next(iter(snap.user_row))
        response = client.get("/v1/recommend", params={"user": user})
        metrics = client.get("/metrics").text
    assert response.status_code == 200
    assert response.json()["fallback"] == "store-timeout"
    assert 'tailor_fallbacks_total{cause="store-timeout"} 1.0' in metrics
    assert 'tailor_store_errors_total{kind="store-timeout"} 1.0' in metrics


def test_redis_down_means_popular_items_then_recovery_by_itself(
    root: Path, snap: Snapshot, redis_server: RedisServer
) -> None:
    store: Store = open_store(redis_server.url)
    user = next(iter(snap.user_row))
    app = create_app(settings(root, store=redis_server.url, store_retry_after_s=0.2), store=store)
    with TestClient(app) as client:
        assert client.get("/v1/recommend", params={"user": user}).json()["fallback"] is None
        redis_server.stop()
        try:
            down = [client.get("/v1/recommend", params={"user": user}) for _ in range(5)]
            not_ready = client.get("/readyz")
            events = client.post("/v1/events", json={"events": [{"user": user, "item": "i00001", "event": "view"}]})
        finally:
            redis_server.start()
        assert [r.status_code for r in down] == [200] * 5
        assert {r.json()["fallback"] for r in down} <= {"store-unavailable", "store-timeout"}
        assert not_ready.status_code == 503
        assert not_ready.json()["store"] == "unreachable"
        assert (events.status_code, events.json()["error"]["code"]) == (503, "store-unavailable")
        wait_until(  # the guard retries after store_retry_after_s
            lambda: client.get("/v1/recommend", params={"user": user}).json()["fallback"] is None,
            what="the guard to try the store again",
        )
        body = client.get("/v1/recommend", params={"user": user}).json()
        assert body["fallback"] is None
        assert body["profile"] == "snapshot"
        assert client.get("/readyz").status_code == 200


def test_frozen_redis_times_out_instead_of_hanging(root: Path, snap: Snapshot, redis_server: RedisServer) -> None:
    app = create_app(settings(root, store=redis_server.url, store_timeout_ms=30), store=open_store(redis_server.url))
    with TestClient(app) as client:
        user = next(iter(snap.user_row))
        assert client.get("/v1/recommend", params={"user": user}).json()["fallback"] is None
        redis_server.pause()
        try:
            body = client.get("/v1/recommend", params={"user": user}).json()
        finally:
            redis_server.resume()
    assert body["fallback"] == "store-timeout"
    assert len(body["items"]) == 10


def test_new_visitor_profile_is_shared_through_redis(root: Path, snap: Snapshot, redis_server: RedisServer) -> None:
    """Two gateways on one Redis: an event taken by one personalises the other's answer."""
    shared = settings(root, store=redis_server.url)
    with (
        TestClient(create_app(shared, store=open_store(redis_server.url))) as first,
        TestClient(create_app(shared, store=open_store(redis_server.url))) as second,
    ):
        post_events(first, "roaming-visitor", [(snap.item_ids[9], "add_to_cart")])
        body = second.get("/v1/recommend", params={"visitor": "roaming-visitor"}).json()
    assert body["profile"] == "live"
    assert snap.item_ids[9] not in ids(body)


# -- snapshots ----------------------------------------------------------------------------------


def test_admin_reload_swaps_to_the_new_current_version(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        old = client.get("/v1/popular").json()["snapshot"]
        assert client.post("/admin/reload").json() == {"changed": False, "version": old, "previous": old}
        new = republish(root)
        assert client.post("/admin/reload").json() == {"changed": True, "version": new, "previous": old}
        assert client.get("/v1/popular").json()["snapshot"] == new
        assert f'tailor_snapshot_info{{version="{new}"}} 1.0' in client.get("/metrics").text


def test_a_corrupt_snapshot_is_refused_and_the_old_one_keeps_serving(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        old = client.get("/v1/popular").json()["snapshot"]
        bad = republish(root)
        corrupt(root / bad)
        response = client.post("/admin/reload")
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "snapshot-refused"
        assert any("sha256 mismatch" in p for p in error["problems"])
        assert client.get("/v1/popular").json()["snapshot"] == old
        ready = client.get("/readyz").json()
        assert ready["ready"] is True
        assert any(bad in p for p in ready["problems"])


def test_the_watcher_picks_up_a_new_pointer_by_itself(root: Path) -> None:
    with TestClient(create_app(settings(root, watch_interval_s=0.05))) as client:
        new = republish(root)
        wait_until(lambda: client.get("/v1/popular").json()["snapshot"] == new, what="the watcher")
        assert client.get("/v1/popular").json()["snapshot"] == new


def test_start_up_on_a_corrupt_current_snapshot_serves_the_newest_good_one(root: Path) -> None:
    good = snapshot.current_version(root)
    bad = republish(root)
    corrupt(root / bad, "items.json")
    with TestClient(create_app(settings(root))) as client:
        assert client.get("/v1/popular").json()["snapshot"] == good
        assert any(bad in p for p in client.get("/readyz").json()["problems"])


def test_without_any_snapshot_the_gateway_runs_but_is_not_ready(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        response = client.get("/v1/recommend")
    assert ready.status_code == 503
    assert (response.status_code, response.json()["error"]["code"]) == (503, "no-snapshot")
