"""The Redis store under load, through the real gateway on a real redis-server with the default URL
options: whole event batches of many visitors, concurrent batches, a batch that fails part-way and
its retry, and a burst of due trigger timers, of which none may get lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import msgspec
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.rules.triggers import Trigger, TriggerEngine, TriggerMessage
from gateway.runtime import Gateway
from gateway.store import Recorded, RedisStore, Requirement, Timer
from gateway.store.base import decode_log
from tests.conftest import RedisServer
from tests.gateways import settings
from tests.waiting import wait_until

T = TypeVar("T")
HOUR = 3600.0
DAY = 24 * HOUR
ANYONE = Requirement("marketing", default=True)  # the opt-out model
CART = Trigger(id="cart-abandon", on="add_to_cart", unless="purchase", wait="30m", message=TriggerMessage("Hi"))


class Shop:
    """A gateway on the session's redis-server under a key prefix of its own, and a client to look in Redis."""

    def __init__(self, client: TestClient, redis: Redis, prefix: str) -> None:
        self.client = client
        self.redis = redis
        self.prefix = prefix

    @property
    def gateway(self) -> Gateway:
        app: Any = self.client.app
        gateway: Gateway = app.state.gateway
        return gateway

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await `work()` on the gateway's event loop."""
        portal = self.client.portal
        assert portal is not None
        return portal.call(work)

    def key(self, visitor: str) -> str:
        return f"{self.prefix}v:{self.gateway.pseudonym(visitor)}:"

    def stored(self, visitors: list[str]) -> list[int]:
        """How many interactions Redis holds for each visitor."""
        pipe = self.redis.pipeline(transaction=False)
        for visitor in visitors:
            pipe.llen(self.key(visitor) + "recent")
        return [int(n) for n in pipe.execute()]


@pytest.fixture
def shop(root: Path, redis_server: RedisServer) -> Iterator[Shop]:
    redis_server.start()
    prefix = f"test:{uuid.uuid4().hex}:"
    redis = Redis.from_url(redis_server.url)
    # Triggers polled often, so a test of due timers waits little.
    configured = settings(root, store=f"{redis_server.url}?prefix={prefix}", trigger_poll_s=0.05)
    try:
        with TestClient(create_app(configured)) as client:
            yield Shop(client, redis, prefix)
    finally:
        redis.close()


def batch(visitors: list[str], tag: str = "") -> list[dict[str, Any]]:
    return [{"visitor": v, "event": "view", "item": "i00001", "id": f"{tag}{v}"} for v in visitors]


def test_a_batch_of_500_visitors_is_stored_whole(shop: Shop) -> None:
    visitors = [f"visitor-{n}" for n in range(500)]
    response = shop.client.post("/v1/events", json=batch(visitors))
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 500
    assert shop.stored(visitors) == [1] * 500


def test_16_concurrent_batches_of_40_visitors_are_all_stored(shop: Shop) -> None:
    groups = [[f"visitor-{g}-{n}" for n in range(40)] for g in range(16)]

    async def post_all() -> list[httpx2.Response]:
        transport = httpx2.ASGITransport(app=shop.client.app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await asyncio.gather(*(client.post("/v1/events", json=batch(group)) for group in groups))

    responses = shop.run(post_all)
    assert [(r.status_code, r.json().get("accepted")) for r in responses] == [(202, 40)] * 16
    assert shop.stored([v for group in groups for v in group]) == [1] * 640


def test_a_batch_that_fails_part_way_says_what_is_stored_and_its_retry_stores_the_rest(shop: Shop) -> None:
    visitors = [f"visitor-{n}" for n in range(500)]
    events = batch(visitors, tag="first-")
    # One visitor's counters hash is a string: the store's script fails for them alone, before it writes.
    broken = shop.key(visitors[250]) + "counters"
    shop.redis.set(broken, "not a hash")
    failed = shop.client.post("/v1/events", json=events)
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert error["code"] == "store-unavailable"
    assert error["stored"] == [n for n in range(500) if n != 250]
    assert "same event ids" in error["message"]
    shop.redis.delete(broken)
    assert shop.stored(visitors) == [0 if n == 250 else 1 for n in range(500)]

    retried = shop.client.post("/v1/events", json=events)
    assert retried.status_code == 202, retried.text
    assert (retried.json()["accepted"], retried.json()["duplicates"]) == (1, 499)
    assert shop.stored(visitors) == [1] * 500
    entries: Any = shop.redis.xrange(f"{shop.prefix}events")
    logged = [str(decode_log(entry[b"e"]).event_id) for _, entry in entries]
    assert sorted(logged) == sorted(event["id"] for event in events)  # each event in the log once


def test_400_due_timers_are_all_delivered(shop: Shop) -> None:
    shop.gateway.triggers.use([CART], version=1)
    store = shop.gateway.store
    assert isinstance(store, RedisStore)
    visitors = [f"timer-{n}" for n in range(400)]
    past = time.time() - 60
    payload = msgspec.json.encode([1, past])

    async def schedule_all() -> None:
        for visitor in visitors:
            assert await store.schedule(visitor, [Timer(CART.id, past, payload)], now=past) == [True]

    shop.run(schedule_all)
    inboxes = [f"{shop.prefix}v:{visitor}:inbox" for visitor in visitors]

    def state() -> tuple[int, list[int]]:
        pipe = shop.redis.pipeline(transaction=False)
        for inbox in inboxes:
            pipe.llen(inbox)
        return shop.redis.zcard(f"{shop.prefix}timers"), pipe.execute()

    def all_delivered() -> bool:
        pending, delivered = state()
        return pending == 0 and all(delivered)

    wait_until(all_delivered, timeout=30, interval=0.05, what="every timer")
    pending, delivered = state()
    assert pending == 0
    assert delivered == [1] * 400


@pytest.mark.anyio
async def test_a_timer_whose_firing_fails_is_retried_until_it_is_delivered(
    redis_store: RedisStore, raw: AsyncRedis
) -> None:
    engine = TriggerEngine(redis_store, requires=ANYONE, windows=(HOUR, DAY), retry_s=60)
    engine.use([CART], version=1)
    now = time.time()
    prefix = redis_store.prefix
    for visitor in ("a", "b"):
        assert await redis_store.schedule(visitor, [Timer(CART.id, now, b"")], now=now) == [True]
    # Keys of the wrong type make the store's scripts fail for these visitors, before they write:
    # a's counters fail its firing and the store's taking the timer back (the process holds it);
    # b's fired marks fail its firing only (the timer goes back into the store).
    await raw.set(f"{prefix}v:a:counters", "not a hash")
    await raw.set(f"{prefix}v:b:fired", "not a hash")
    assert await engine.fire_due(now) == 2
    assert await raw.zrange(f"{prefix}timers", 0, -1, withscores=True) == [
        (msgspec.json.encode(["b", CART.id]), now + 60)
    ]
    await raw.delete(f"{prefix}v:a:counters", f"{prefix}v:b:fired")
    assert await engine.fire_due(now + 59) == 0
    assert await engine.fire_due(now + 60) == 2
    assert [await raw.llen(f"{prefix}v:{visitor}:inbox") for visitor in ("a", "b")] == [1, 1]
    assert await engine.fire_due(now + DAY) == 0  # delivered once


@pytest.mark.anyio
async def test_a_timer_is_dropped_with_a_warning_after_its_last_attempt(
    redis_store: RedisStore, raw: AsyncRedis, caplog: pytest.LogCaptureFixture
) -> None:
    engine = TriggerEngine(redis_store, requires=ANYONE, windows=(HOUR, DAY), retry_s=60, attempts=2)
    engine.use([CART], version=1)
    now = time.time()
    assert await redis_store.schedule("b", [Timer(CART.id, now, b"")], now=now) == [True]
    await raw.set(f"{redis_store.prefix}v:b:fired", "not a hash")
    assert await engine.fire_due(now) == 1
    assert await engine.fire_due(now + 60) == 1
    assert await raw.zcard(f"{redis_store.prefix}timers") == 0
    assert "trigger cart-abandon dropped after 2 failed firings" in caplog.text


@pytest.mark.anyio
async def test_a_trigger_whose_firing_on_an_event_fails_is_retried_as_a_timer(
    redis_store: RedisStore, raw: AsyncRedis
) -> None:
    welcome = Trigger(id="welcome", on="view", message=TriggerMessage("Welcome!"))
    engine = TriggerEngine(redis_store, requires=ANYONE, windows=(HOUR, DAY), retry_s=60)
    engine.use([welcome], version=1)
    now = time.time()
    await raw.set(f"{redis_store.prefix}v:w:fired", "not a hash")
    await engine.on_recorded("w", [Recorded("view", now, item="i1")], now)
    assert await raw.llen(f"{redis_store.prefix}v:w:inbox") == 0
    await raw.delete(f"{redis_store.prefix}v:w:fired")
    assert await engine.fire_due(now + 60) == 1
    assert await raw.llen(f"{redis_store.prefix}v:w:inbox") == 1
