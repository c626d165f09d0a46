"""Behavioural triggers: definitions, did-not-occur timers, counted occurrences, consent, push, erasure,
durability across gateway processes on one Redis. Engine tests run on both stores with a clock of
their own (the store compares timers with the `now` it is given); gateway tests use the real one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis import Redis
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from gateway.api import encoding, wire
from gateway.app import create_app
from gateway.rules.picks import Pick
from gateway.rules.triggers import Delivered, Trigger, TriggerEngine, TriggerMessage, parse_duration
from gateway.runtime import Gateway
from gateway.settings import Settings
from gateway.snapshot import load
from gateway.store import Consent, MemoryStore, Recorded, RedisStore, Requirement, Retention, Store
from tests.conftest import RedisServer
from tests.snapshots import current_dir
from tests.waiting import wait_until

HOUR = 3600.0
DAY = 24 * HOUR
T0 = DAY * 19_676  # the first second of a day, so "within a day" counts are exact
MINUTE = 60.0

CART = Trigger(
    id="cart-abandon",
    on="add_to_cart",
    unless="purchase",
    wait="30m",
    message=TriggerMessage("Still thinking it over?", "Your cart is waiting.", offer="CART10", data={"percent": 10}),
)
THIRD_VIEW = Trigger(
    id="third-view",
    on="view",
    count=3,
    window="1d",
    same_item=True,
    message=TriggerMessage("Back again?", offer="LOOK5"),
)
WELCOME = Trigger(id="welcome", on="view", period="1h", message=TriggerMessage("Welcome!"))
ANYONE = Requirement("marketing", default=True)  # the opt-out model
OPT_IN = Requirement("marketing", default=False)


# -- definitions -------------------------------------------------------------------------------------


def test_durations_read_seconds_minutes_hours_and_days() -> None:
    assert [parse_duration(text) for text in ("45s", "30m", "2h", "1d", "0.5h")] == [45.0, 1800.0, 7200.0, DAY, 1800.0]
    with pytest.raises(ValueError, match="duration"):
        parse_duration("30 minutes")


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"unless": "purchase"}, "`unless` and `wait` go together"),
        ({"wait": "30m"}, "`unless` and `wait` go together"),
        ({"unless": "view", "wait": "30m"}, "another event type"),
        ({"unless": "purchase", "wait": "30m", "same_item": True}, "same_item"),
        ({"window": "0m"}, "`window` must be longer"),
        ({"period": "soon"}, "period"),
        ({"count": 0}, "count"),
        ({"colour": "red"}, "unknown field `colour`"),
        ({"id": "Not A Slug"}, "id"),
    ],
)
def test_an_inconsistent_trigger_is_refused_with_a_reason(fields: dict[str, Any], complaint: str) -> None:
    definition = {"id": "t", "on": "view", "message": {"title": "Hi"}, **fields}
    with pytest.raises(msgspec.ValidationError, match=complaint):
        msgspec.convert(definition, Trigger)


def test_a_trigger_reads_from_json() -> None:
    text = b"""{"id": "cart-abandon", "on": "add_to_cart", "unless": "purchase", "wait": "30m",
                "message": {"title": "Still thinking it over?", "body": "Your cart is waiting.",
                            "offer": "CART10", "data": {"percent": 10}}}"""
    assert msgspec.json.decode(text, type=Trigger) == CART


def test_definitions_are_checked_when_they_are_put_to_use() -> None:
    engine = TriggerEngine(MemoryStore(), requires=ANYONE, windows=(HOUR, DAY))
    with pytest.raises(ValueError, match="used twice"):
        engine.use([WELCOME, WELCOME], version=1)
    weekly = msgspec.structs.replace(THIRD_VIEW, window="7d")
    with pytest.raises(ValueError, match="counter_windows_s"):
        engine.check([weekly])
    with pytest.raises(ValueError, match="counter_windows_s"):
        engine.use([weekly], version=1)
    assert engine.version is None  # nothing was swapped in
    engine.use([msgspec.structs.replace(weekly, count=1)], version=2)  # a count of 1 counts nothing
    assert engine.version == 2


def test_an_answers_messages_are_encoded_as_declared(small_snapshots: Path) -> None:
    snap = load(current_dir(small_snapshots))
    delivered = Delivered("welcome", 2, CART.message, "abc", T0)
    got = encoding.encode_recommendations(
        snap, "r", [Pick(0, 0.5, "user-vector")], None, "live", messages=[msgspec.json.encode(delivered)]
    )
    item = wire.ScoredItem(snap.item_ids[0], snap.titles[0], snap.categories[0], 0.5, ["user-vector"])
    assert got == msgspec.json.encode(
        wire.Recommendations("r", snap.version, [item], None, "live", messages=[delivered])
    )


# -- the engine, on both stores ----------------------------------------------------------------------


class Heard:
    """What an engine reports through its callbacks."""

    def __init__(self) -> None:
        self.fired: list[str] = []
        self.scheduled: list[str] = []
        self.cancelled: list[str] = []


def engine_on(
    store: Store, *triggers: Trigger, requires: Requirement = ANYONE, heard: Heard | None = None
) -> TriggerEngine:
    heard = heard or Heard()
    engine = TriggerEngine(
        store,
        requires=requires,
        windows=(HOUR, DAY),
        on_fired=heard.fired.append,
        on_scheduled=heard.scheduled.append,
        on_cancelled=heard.cancelled.append,
    )
    engine.use(triggers, version=1)
    return engine


async def happen(engine: TriggerEngine, visitor: str, *events: tuple[str, str | None], at: float) -> None:
    """Store the visitor's events at `at`, then hand what was stored to the engine, as the events route does."""
    recorded = [Recorded(event, at, item=item) for event, item in events]
    stored = await engine.store.record(visitor, recorded, retention=Retention(windows=(HOUR, DAY)), now=at)
    assert stored is not None
    await engine.on_recorded(visitor, [e for e, fresh in zip(recorded, stored, strict=True) if fresh], at)


async def shown(store: Store, visitor: str, at: float = T0) -> list[Delivered]:
    """The visitor's inbox, without taking it."""
    state = await store.trigger_state(visitor, now=at)
    return [msgspec.json.decode(message, type=Delivered) for message in state.messages]


@pytest.mark.anyio
async def test_an_abandoned_cart_fires_after_the_wait(store: Store) -> None:
    heard = Heard()
    engine = engine_on(store, CART, heard=heard)
    await happen(engine, "v", ("view", "i1"), ("add_to_cart", "i1"), at=T0)
    assert heard.scheduled == ["cart-abandon"]
    assert await engine.fire_due(T0 + 30 * MINUTE - 1) == 0
    assert await shown(store, "v") == []
    assert await engine.fire_due(T0 + 30 * MINUTE) == 1
    (delivered,) = await shown(store, "v")
    assert (delivered.trigger, delivered.version, delivered.message, delivered.at) == (
        "cart-abandon",
        1,
        CART.message,
        T0 + 30 * MINUTE,
    )
    assert heard.fired == ["cart-abandon"]
    assert await engine.fire_due(T0 + DAY) == 0  # claimed once


@pytest.mark.anyio
async def test_a_purchase_within_the_wait_cancels_the_timer(store: Store) -> None:
    heard = Heard()
    engine = engine_on(store, CART, heard=heard)
    await happen(engine, "v", ("add_to_cart", "i1"), at=T0)
    await happen(engine, "v", ("purchase", "i1"), at=T0 + 10 * MINUTE)
    assert heard.cancelled == ["cart-abandon"]
    assert await engine.fire_due(T0 + HOUR) == 0
    assert await shown(store, "v") == []
    assert heard.fired == []


@pytest.mark.anyio
async def test_in_one_batch_the_later_of_cart_and_purchase_decides(store: Store) -> None:
    engine = engine_on(store, CART)
    await happen(engine, "bought", ("add_to_cart", "i1"), ("purchase", "i1"), at=T0)
    await happen(engine, "again", ("add_to_cart", "i1"), at=T0)
    await happen(engine, "again", ("purchase", "i1"), ("add_to_cart", "i2"), at=T0 + 10 * MINUTE)
    assert (await store.trigger_state("bought", now=T0)).timers == []
    (timer,) = (await store.trigger_state("again", now=T0)).timers
    assert timer.due == T0 + 40 * MINUTE  # the old timer went with the purchase, the new cart set one
    await engine.fire_due(T0 + 39 * MINUTE)
    assert await shown(store, "again") == []
    await engine.fire_due(T0 + 40 * MINUTE)
    assert [d.trigger for d in await shown(store, "again")] == ["cart-abandon"]


@pytest.mark.anyio
async def test_a_second_cart_does_not_postpone_a_pending_timer(store: Store) -> None:
    engine = engine_on(store, CART)
    await happen(engine, "v", ("add_to_cart", "i1"), at=T0)
    await happen(engine, "v", ("add_to_cart", "i2"), at=T0 + 20 * MINUTE)
    await engine.fire_due(T0 + 30 * MINUTE)
    assert [d.trigger for d in await shown(store, "v")] == ["cart-abandon"]


@pytest.mark.anyio
async def test_the_third_view_of_an_item_within_a_day_fires_and_the_second_does_not(store: Store) -> None:
    heard = Heard()
    engine = engine_on(store, THIRD_VIEW, heard=heard)
    await happen(engine, "v", ("view", "i1"), at=T0)
    await happen(engine, "v", ("view", "i1"), ("view", "i2"), at=T0 + HOUR)
    assert heard.fired == []  # the second of i1, the first of i2
    await happen(engine, "v", ("view", "i2"), ("view", "i1"), at=T0 + 2 * HOUR)
    assert heard.fired == ["third-view"]
    assert [d.message.offer for d in await shown(store, "v")] == ["LOOK5"]
    await happen(engine, "v", ("view", "i2"), at=T0 + 3 * HOUR)  # i2's third: within the period
    await happen(engine, "w", ("view", "i1"), ("view", "i1"), ("view", "i1"), at=T0)  # three at once
    assert heard.fired == ["third-view", "third-view"]


@pytest.mark.anyio
async def test_a_trigger_fires_at_most_once_per_period(store: Store) -> None:
    heard = Heard()
    engine = engine_on(store, WELCOME, heard=heard)
    await happen(engine, "v", ("view", "i1"), at=T0)
    await happen(engine, "v", ("view", "i2"), at=T0 + 59 * MINUTE)
    assert heard.fired == ["welcome"]
    await happen(engine, "v", ("view", "i3"), at=T0 + HOUR)
    assert heard.fired == ["welcome", "welcome"]
    assert len(await shown(store, "v", T0 + HOUR)) == 2


@pytest.mark.anyio
async def test_without_marketing_consent_nothing_is_scheduled_or_fired(store: Store) -> None:
    heard = Heard()
    engine = engine_on(store, CART, THIRD_VIEW, WELCOME, requires=OPT_IN, heard=heard)
    await happen(engine, "v", ("view", "i1"), ("view", "i1"), ("view", "i1"), ("add_to_cart", "i1"), at=T0)
    assert await store.trigger_state("v", now=T0) == await store.trigger_state("never-seen", now=T0)
    assert await engine.fire_due(T0 + DAY) == 0
    assert (heard.fired, heard.scheduled) == ([], [])
    denied = Consent("denied", T0, "banner")
    await store.set_consent("w", {"marketing": denied}, ttl=DAY, now=T0)
    opt_out = engine_on(store, CART, WELCOME, requires=ANYONE, heard=heard)  # a choice made decides
    await happen(opt_out, "w", ("view", "i1"), ("add_to_cart", "i1"), at=T0)
    assert (await store.trigger_state("w", now=T0)).timers == []
    assert (heard.fired, heard.scheduled) == ([], [])


@pytest.mark.anyio
async def test_consent_revoked_before_the_timer_is_due_stops_it(store: Store) -> None:
    heard = Heard()
    engine = engine_on(store, CART, requires=OPT_IN, heard=heard)
    await store.set_consent("v", {"marketing": Consent("granted", T0, "banner")}, ttl=DAY, now=T0)
    await happen(engine, "v", ("add_to_cart", "i1"), at=T0)
    assert heard.scheduled == ["cart-abandon"]
    await store.set_consent("v", {"marketing": Consent("revoked", T0 + 60, "settings")}, ttl=DAY, now=T0 + 60)
    assert await engine.fire_due(T0 + HOUR) == 1  # claimed, and not fired
    assert heard.fired == []
    assert await shown(store, "v", T0 + HOUR) == []


@pytest.mark.anyio
async def test_timers_wait_for_definitions_and_those_of_retired_triggers_are_dropped(store: Store) -> None:
    engine = engine_on(store, CART)
    await happen(engine, "v", ("add_to_cart", "i1"), at=T0)
    restarted = TriggerEngine(store, requires=ANYONE, windows=(HOUR, DAY))
    assert await restarted.fire_due(T0 + HOUR) == 0  # no definitions yet: the timer stays
    assert len((await store.trigger_state("v", now=T0)).timers) == 1
    restarted.use([WELCOME], version=2)  # the cart trigger is gone in version 2
    assert await restarted.fire_due(T0 + HOUR) == 1
    assert await shown(store, "v", T0 + HOUR) == []


@pytest.mark.anyio
async def test_two_engines_on_one_redis_fire_a_due_timer_once(redis_server: RedisServer) -> None:
    redis_server.start()
    prefix = f"test:{uuid.uuid4().hex}:"
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
    heard = Heard()
    engines = [engine_on(store, CART, heard=heard) for store in stores]
    try:
        for number in range(20):
            await happen(engines[number % 2], f"v{number}", ("add_to_cart", "i1"), at=T0)
        claimed = await asyncio.gather(*(engine.fire_due(T0 + HOUR) for engine in engines * 5))
        assert sum(claimed) == 20
        assert heard.fired == ["cart-abandon"] * 20
        for number in range(20):
            assert len(await shown(stores[0], f"v{number}", T0 + HOUR)) == 1
    finally:
        for store in stores:
            await store.close()


# -- through the gateway ---------------------------------------------------------------------------

SECRET = "trigger-test-secret"
EVERYTHING = {"analytics": "granted", "personalization": "granted", "marketing": "granted"}


def settings(root: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "secret": SECRET,
        "event_log": "",
        "push_debounce_ms": 10,
        "heartbeat_s": 0.2,  # so a socket read never waits long for nothing
        "trigger_poll_s": 0.05,
    }
    return Settings(**{**values, **changes})


def gateway_of(client: TestClient) -> Gateway:
    app: Any = client.app
    gateway: Gateway = app.state.gateway
    return gateway


def use(client: TestClient, triggers: Sequence[Trigger], version: int = 1) -> None:
    gateway_of(client).triggers.use(triggers, version)


def next_message(ws: Any) -> dict[str, Any]:
    """The next trigger message on the socket (recommendation pushes and pings pass by)."""
    for _ in range(50):
        frame: dict[str, Any] = ws.receive_json()
        if frame["type"] == "message":
            return frame
    raise AssertionError("no message frame")


def test_a_fired_message_reaches_the_open_socket_and_the_next_recommendation(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        use(client, [msgspec.structs.replace(WELCOME, on="add_to_cart")], version=7)
        grant = client.post("/v1/token").json()
        assert client.put("/v1/consent", json={"token": grant["token"], "choices": EVERYTHING}).status_code == 200
        with client.websocket_connect(f"/v1/stream?token={grant['token']}") as ws:
            assert ws.receive_json()["cause"] == "connect"
            batch = {"token": grant["token"], "events": [{"event": "add_to_cart", "item": "i00003"}]}
            assert client.post("/v1/events", json=batch).json()["accepted"] == 1
            frame = next_message(ws)
        assert frame["type"] == "message"
        assert (frame["trigger"], frame["version"], frame["message"]) == (
            "welcome",
            7,
            {"title": "Welcome!", "body": "", "offer": None, "data": {}},
        )
        assert abs(frame["at"] - time.time()) < 60 and len(frame["id"]) == 32
        answer = client.get("/v1/recommend", params={"token": grant["token"]}).json()
        assert answer["messages"] == [frame]
        assert answer["profile"] == "live"
        assert client.get("/v1/recommend", params={"token": grant["token"]}).json()["messages"] == []  # shown once
        metrics = client.get("/metrics").text
    assert 'tailor_trigger_fired_total{trigger="welcome"} 1.0' in metrics


def test_without_marketing_consent_the_gateway_neither_sets_nor_fires(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        use(client, [CART, WELCOME])
        choices = {"analytics": "granted", "personalization": "granted"}
        client.put("/v1/consent", json={"visitor": "v", "choices": choices})
        events = [
            {"visitor": "v", "event": "view", "item": "i00003"},
            {"visitor": "v", "event": "add_to_cart", "item": "i00003"},
        ]
        assert client.post("/v1/events", json=events).json()["accepted"] == 2
        export = client.get("/v1/visitors/v/export").json()
        assert (export["messages"], export["pending_triggers"], export["fired_triggers"]) == ([], {}, {})
        assert client.get("/v1/recommend", params={"visitor": "v"}).json()["messages"] == []
        metrics = client.get("/metrics").text
    assert "tailor_trigger_fired_total{" not in metrics and "tailor_trigger_timers_scheduled_total{" not in metrics


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, root: Path) -> Iterator[tuple[TestClient, Any]]:
    """A gateway (opt-out consent) on each store, and on Redis a client and the key prefix to look around with."""
    changes: dict[str, Any] = {"consent_mode": "opt-out"}
    raw: Any = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()
        prefix = f"test:{uuid.uuid4().hex}:"
        changes["store"] = f"{server.url}?prefix={prefix}"
        raw = (Redis.from_url(server.url), prefix)
    with TestClient(create_app(settings(root, **changes))) as client:
        yield client, raw
    if raw is not None:
        raw[0].close()


def test_erasure_removes_pending_timers_fired_marks_and_messages(backend: tuple[TestClient, Any]) -> None:
    client, raw = backend
    use(client, [CART, WELCOME])
    for visitor in ("leaving", "staying"):
        events = [{"visitor": visitor, "event": e, "item": "i00003"} for e in ("view", "add_to_cart")]
        assert client.post("/v1/events", json=events).json()["accepted"] == 2
    export = client.get("/v1/visitors/leaving/export").json()
    assert [m["trigger"] for m in export["messages"]] == ["welcome"]
    assert export["messages"][0]["message"]["title"] == "Welcome!"
    assert list(export["pending_triggers"]) == ["cart-abandon"]
    assert export["pending_triggers"]["cart-abandon"] == pytest.approx(time.time() + 30 * MINUTE, abs=60)
    assert list(export["fired_triggers"]) == ["welcome"]

    client.delete("/v1/visitors/leaving")
    gone = client.get("/v1/visitors/leaving/export").json()
    assert (gone["messages"], gone["pending_triggers"], gone["fired_triggers"]) == ([], {}, {})
    gateway = gateway_of(client)
    key = gateway.pseudonym("leaving")
    later = time.time() + DAY
    claimed = client.portal.call(lambda: gateway.store.claim_due(now=later, limit=100))  # type: ignore[union-attr]
    assert [visitor for visitor, _ in claimed] == [gateway.pseudonym("staying")]
    if raw is not None:  # nothing in Redis names the erased visitor, the timers' sorted set included
        redis, prefix = raw
        for name in redis.scan_iter(f"{prefix}*"):
            assert key.encode() not in name
            if redis.type(name) == b"zset":
                assert not [member for member in redis.zrange(name, 0, -1) if key.encode() in member]


def test_a_timer_set_by_one_gateway_fires_from_a_new_one_on_the_same_redis(
    root: Path, redis_server: RedisServer
) -> None:
    redis_server.start()
    prefix = f"test:{uuid.uuid4().hex}:"
    configured = settings(root, store=f"{redis_server.url}?prefix={prefix}", consent_mode="opt-out")
    soon = msgspec.structs.replace(CART, wait="2s")
    with TestClient(create_app(configured)) as first:
        use(first, [soon])
        event = {"visitor": "shopper", "event": "add_to_cart", "item": "i00003"}
        assert first.post("/v1/events", json=event).json()["accepted"] == 1
        key = gateway_of(first).pseudonym("shopper")
    # The first gateway has stopped before the timer came due: the timer waits in Redis.
    raw: Any = Redis.from_url(redis_server.url)
    assert raw.zcard(f"{prefix}timers") == 1, "the first gateway fired it before it stopped (machine too slow?)"
    with TestClient(create_app(configured)) as second:
        use(second, [soon])
        wait_until(
            lambda: not raw.zcard(f"{prefix}timers"), timeout=15, interval=0.05, what="the second gateway to fire"
        )
        export = second.get("/v1/visitors/shopper/export").json()
        metrics = second.get("/metrics").text
    raw.close()
    assert [m["trigger"] for m in export["messages"]] == ["cart-abandon"]
    assert export["pseudonym"] == key and export["pending_triggers"] == {}
    assert 'tailor_trigger_fired_total{trigger="cart-abandon"} 1.0' in metrics


def test_an_erased_visitors_socket_gets_no_message(root: Path) -> None:
    with TestClient(create_app(settings(root, consent_mode="opt-out"))) as client:
        use(client, [msgspec.structs.replace(CART, wait="0.3s")])
        grant = client.post("/v1/token").json()
        with client.websocket_connect(f"/v1/stream?token={grant['token']}") as ws:
            assert ws.receive_json()["cause"] == "connect"
            client.post(
                "/v1/events", json={"token": grant["token"], "events": [{"event": "add_to_cart", "item": "i1"}]}
            )
            client.delete(f"/v1/visitors/{grant['visitor']}")
            with pytest.raises(WebSocketDisconnect):
                next_message(ws)
        # Real time passes on purpose: the timer's wait (0.3 s) runs on the store's clock, and the test is
        # that nothing fires once it is over.
        time.sleep(0.5)  # past the wait: had the timer survived, it would have fired by now
        assert client.get("/v1/visitors/" + grant["visitor"] + "/export").json()["messages"] == []
