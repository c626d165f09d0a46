"""Both experiment ledger backends keep the same contract (gateway.store.ledger)."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from gateway.store import (
    ArmTotals,
    Attributed,
    Exposure,
    Ledger,
    MemoryLedger,
    MemoryStore,
    RedisStore,
    StoreError,
    open_ledger,
)
from gateway.store.ledger import RedisLedger
from tests.conftest import RedisServer
from tests.waiting import wait_until_async

pytestmark = pytest.mark.anyio

DAY = 86_400.0
CELL = "ranker=A,banner=on"  # a factorial cell: arm names may hold "," and "="


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        memory = MemoryLedger()
        try:
            yield memory
        finally:
            await memory.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.start()  # a fault test that failed half-way must not take the next tests down with it
    store = RedisStore(server.url, prefix=f"test:{uuid.uuid4().hex}:")
    shared = store.ledger()
    try:
        yield shared
    finally:
        await shared.close()
        await store.close()


def exposed(visitor: str, arm: str = "A", experiment: str = "exp", phase: int = 1) -> list[Exposure]:
    return [Exposure(visitor, experiment, phase, arm)]


# Exposures.


async def test_an_exposure_counts_once_per_visitor_and_phase(ledger: Ledger) -> None:
    assert await ledger.expose(exposed("v"), ttl=DAY) == [True]
    assert await ledger.expose(exposed("v"), ttl=DAY) == [False]
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=1)}


async def test_the_first_arm_of_a_phase_is_the_one_a_visitor_keeps(ledger: Ledger) -> None:
    assert await ledger.expose(exposed("v", CELL), ttl=DAY) == [True]
    assert await ledger.expose(exposed("v", "ranker=B,banner=on"), ttl=DAY) == [False]
    assert await ledger.totals("exp", 1) == {CELL: ArmTotals(exposures=1)}
    assert await ledger.marks("v") == {"exp@1": CELL}


async def test_a_new_phase_counts_the_visitor_again(ledger: Ledger) -> None:
    assert await ledger.expose(exposed("v", "A", phase=1), ttl=DAY) == [True]
    assert await ledger.expose(exposed("v", "B", phase=2), ttl=DAY) == [True]
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=1)}
    assert await ledger.totals("exp", 2) == {"B": ArmTotals(exposures=1)}
    assert await ledger.marks("v") == {"exp@1": "A", "exp@2": "B"}


async def test_one_batch_exposes_many_visitors(ledger: Ledger) -> None:
    batch = [Exposure(f"v{n}", "exp", 1, "A" if n % 3 else "B") for n in range(300)]
    batch.append(Exposure("v1", "exp", 1, "B"))  # v1 again, in the same batch: already marked (A)
    batch.append(Exposure("v1", "other", 4, "C"))  # v1 in another experiment: new
    assert await ledger.expose(batch, ttl=DAY) == [True] * 300 + [False, True]
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=200), "B": ArmTotals(exposures=100)}
    assert await ledger.totals("other", 4) == {"C": ArmTotals(exposures=1)}
    assert await ledger.marks("v1") == {"exp@1": "A", "other@4": "C"}
    assert await ledger.expose([], ttl=DAY) == []


async def test_concurrent_exposures_of_one_visitor_count_once(ledger: Ledger) -> None:
    flags = await asyncio.gather(*(ledger.expose(exposed("v", "AB"[n % 2]), ttl=DAY) for n in range(20)))
    assert sorted(flag for (flag,) in flags) == [False] * 19 + [True]
    totals = await ledger.totals("exp", 1)
    assert sum(arm.exposures for arm in totals.values()) == 1


async def test_an_experiment_nobody_saw_has_no_totals(ledger: Ledger) -> None:
    await ledger.expose(exposed("v"), ttl=DAY)
    assert await ledger.totals("exp", 2) == {}
    assert await ledger.totals("nothing", 1) == {}


# Conversions.


async def test_conversions_count_visitors_once_per_metric(ledger: Ledger) -> None:
    await ledger.expose([Exposure("v1", "exp", 1, "A"), Exposure("v2", "exp", 1, "A")], ttl=DAY)
    for _ in range(3):
        assert await ledger.convert("v1", ["click"], ttl=DAY) == [Attributed("exp", 1, "A")]
    assert await ledger.convert("v1", ["purchase", "purchase"], ttl=DAY) == [Attributed("exp", 1, "A")]
    assert await ledger.convert("v2", ["click"], ttl=DAY) == [Attributed("exp", 1, "A")]
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=2, conversions={"click": 2, "purchase": 1})}


async def test_an_unexposed_visitor_converts_nothing(ledger: Ledger) -> None:
    await ledger.expose(exposed("v"), ttl=DAY)
    before = await ledger.totals("exp", 1)
    assert await ledger.convert("stranger", ["click", "purchase"], 25.0, ttl=DAY) == []
    assert await ledger.totals("exp", 1) == before == {"A": ArmTotals(exposures=1)}
    assert await ledger.marks("stranger") == {}


async def test_a_conversion_counts_in_every_experiment_each_in_its_own_arm(ledger: Ledger) -> None:
    await ledger.expose(
        [
            Exposure("v", "exp", 1, "A"),
            Exposure("v", "layout", 3, CELL),
            Exposure("w", "exp", 1, "B"),  # another visitor, the other arm: untouched by v's conversion
        ],
        ttl=DAY,
    )
    attributed = await ledger.convert("v", ["purchase"], 10.0, ttl=DAY)
    assert sorted(attributed) == [Attributed("exp", 1, "A"), Attributed("layout", 3, CELL)]
    sale = ArmTotals(exposures=1, conversions={"purchase": 1}, revenue_sum=10.0, revenue_sum_squares=100.0)
    assert await ledger.totals("exp", 1) == {"A": sale, "B": ArmTotals(exposures=1)}
    assert await ledger.totals("layout", 3) == {CELL: sale}


async def test_a_convert_with_nothing_to_count_changes_nothing(ledger: Ledger) -> None:
    await ledger.expose(exposed("v"), ttl=DAY)
    assert await ledger.convert("v", [], ttl=DAY) == []
    assert await ledger.convert("v", [], -5.0, ttl=DAY) == []  # a refund is not revenue
    assert await ledger.convert("v", ["click"], -5.0, ttl=DAY) == [Attributed("exp", 1, "A")]
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=1, conversions={"click": 1})}


async def test_revenue_sums_are_of_per_visitor_totals(ledger: Ledger) -> None:
    rng = random.Random(20240611)
    arms = {f"v{n}": "AB"[n % 2] for n in range(12)}
    await ledger.expose([Exposure(visitor, "exp", 2, arm) for visitor, arm in arms.items()], ttl=DAY)
    purchases = [(visitor, round(rng.uniform(0.5, 300.0), 2)) for visitor in arms for _ in range(rng.randint(0, 6))]
    purchases += [("stranger", 99.0)]  # not exposed: counts nowhere
    rng.shuffle(purchases)
    per_visitor: defaultdict[str, float] = defaultdict(float)
    for visitor, amount in purchases:
        attributed = await ledger.convert(visitor, ["purchase"], amount, ttl=DAY)
        assert attributed == ([Attributed("exp", 2, arms[visitor])] if visitor in arms else [])
        if visitor in arms:
            per_visitor[visitor] += amount

    totals = await ledger.totals("exp", 2)
    assert set(totals) == {"A", "B"}
    for arm in ("A", "B"):
        buyers = [total for visitor, total in per_visitor.items() if arms[visitor] == arm]
        assert buyers, "the seed must give each arm some buyers"
        got = totals[arm]
        assert got.exposures == 6
        assert got.conversions == {"purchase": len(buyers)}
        assert got.revenue_sum == pytest.approx(math.fsum(buyers), rel=1e-9)
        assert got.revenue_sum_squares == pytest.approx(math.fsum(total**2 for total in buyers), rel=1e-9)


# The visitor's own state.


async def test_marks_are_the_visitors_exposures(ledger: Ledger) -> None:
    await ledger.expose(
        [Exposure("v", "exp", 1, "A"), Exposure("v", "exp", 2, "B"), Exposure("v", "layout", 1, CELL)], ttl=DAY
    )
    await ledger.expose(exposed("w", "B"), ttl=DAY)
    assert await ledger.marks("v") == {"exp@1": "A", "exp@2": "B", "layout@1": CELL}
    assert await ledger.marks("w") == {"exp@1": "B"}
    assert await ledger.marks("nobody") == {}


async def test_forget_removes_the_visitor_but_not_the_totals(ledger: Ledger) -> None:
    await ledger.expose(exposed("v"), ttl=DAY)
    await ledger.convert("v", ["purchase"], 20.0, ttl=DAY)
    totals = await ledger.totals("exp", 1)
    assert totals == {"A": ArmTotals(1, {"purchase": 1}, 20.0, 400.0)}

    assert await ledger.forget("v") is True
    assert await ledger.marks("v") == {}
    assert await ledger.convert("v", ["purchase", "click"], 5.0, ttl=DAY) == []
    assert await ledger.totals("exp", 1) == totals
    assert await ledger.forget("v") is False
    assert await ledger.forget("nobody") is False


async def test_visitor_state_expires_after_its_ttl(ledger: Ledger) -> None:
    await ledger.expose(exposed("v"), ttl=0.05)
    await ledger.expose(exposed("w"), ttl=DAY)

    async def expired() -> bool:
        return await ledger.marks("v") == {}

    await wait_until_async(expired, what="v's state to expire")
    assert await ledger.marks("v") == {}
    assert await ledger.convert("v", ["click"], ttl=DAY) == []
    assert await ledger.forget("v") is False
    assert await ledger.marks("w") == {"exp@1": "A"}
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=2)}  # the totals do not expire


async def test_exposures_and_conversions_refresh_the_ttl(ledger: Ledger) -> None:
    # These sleeps are the behaviour under test: Redis expires keys by its own clock, which no fake
    # clock reaches, so real time passes (each 0.3 s, under the 0.5 s TTL it refreshes).
    await ledger.expose(exposed("v"), ttl=0.5)
    await anyio.sleep(0.3)
    assert await ledger.expose(exposed("v"), ttl=0.5) == [False]  # not new, but the visitor is still around
    await anyio.sleep(0.3)
    assert await ledger.convert("v", ["click"], ttl=0.5) == [Attributed("exp", 1, "A")]
    await anyio.sleep(0.3)  # 0.9 s after the first exposure, 0.3 s after the conversion
    assert await ledger.marks("v") == {"exp@1": "A"}


async def test_names_the_stored_layout_cannot_tell_apart_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="arm"):
        await ledger.expose([Exposure("v", "exp", 1, "A"), Exposure("w", "exp", 1, "A|n")], ttl=DAY)
    with pytest.raises(ValueError, match="experiment"):
        await ledger.expose(exposed("v", experiment="exp@2"), ttl=DAY)
    with pytest.raises(ValueError, match="ttl"):
        await ledger.expose(exposed("v"), ttl=0)
    await ledger.expose(exposed("v"), ttl=DAY)
    for revenue in (math.inf, math.nan):
        with pytest.raises(ValueError, match="revenue"):
            await ledger.convert("v", ["purchase"], revenue, ttl=DAY)
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=1)}  # nothing of the refused calls counted


# Each backend's own.


async def test_redis_keeps_the_documented_layout_and_ttls(redis_store: RedisStore, raw: Redis) -> None:
    ledger = redis_store.ledger()
    assert await ledger.expose(exposed("v", CELL), ttl=60.0) == [True]
    visitor_key, totals_key = ledger.visitor_key("v"), ledger.totals_key("exp", 1)
    assert 0 < await raw.pttl(visitor_key) <= 60_000
    assert await raw.pttl(totals_key) == -1  # aggregates never expire
    await ledger.convert("v", ["purchase"], 2.5, ttl=DAY)
    assert await raw.pttl(visitor_key) > 60_000  # the conversion refreshed it
    assert await raw.hgetall(visitor_key) == {
        b"m:exp@1": CELL.encode(),
        b"c:exp@1:purchase": b"1",
        b"r:exp@1": b"2.5",
    }
    assert await raw.hgetall(totals_key) == {
        f"{CELL}|n".encode(): b"1",
        f"{CELL}|c:purchase".encode(): b"1",
        f"{CELL}|r".encode(): b"2.5",
        f"{CELL}|r2".encode(): b"6.25",
    }


async def test_an_unreachable_redis_raises_store_error(anyio_backend: str) -> None:
    client = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)
    ledger = RedisLedger(client)
    try:
        with pytest.raises(StoreError, match="redis ledger expose failed"):
            await ledger.expose(exposed("v"), ttl=DAY)
        with pytest.raises(StoreError, match="redis ledger convert failed"):
            await ledger.convert("v", ["click"], ttl=DAY)
        with pytest.raises(StoreError, match="redis ledger totals failed"):
            await ledger.totals("exp", 1)
        with pytest.raises(StoreError, match="redis ledger marks failed"):
            await ledger.marks("v")
        with pytest.raises(StoreError, match="redis ledger forget failed"):
            await ledger.forget("v")
    finally:
        await ledger.close()
        await client.aclose()


async def test_memory_drops_the_least_recently_touched_visitor_past_its_bound(anyio_backend: str) -> None:
    ledger = MemoryLedger(max_visitors=2)
    await ledger.expose([Exposure("a", "exp", 1, "A"), Exposure("b", "exp", 1, "A")], ttl=DAY)
    await ledger.convert("a", ["click"], ttl=DAY)  # touches a: b is now the oldest
    await ledger.expose(exposed("c"), ttl=DAY)
    assert len(ledger) == 2
    assert await ledger.marks("b") == {}
    assert await ledger.marks("a") == {"exp@1": "A"}
    assert await ledger.totals("exp", 1) == {"A": ArmTotals(exposures=3, conversions={"click": 1})}
    with pytest.raises(ValueError, match="max_visitors"):
        MemoryLedger(max_visitors=0)


async def test_open_ledger_follows_the_store(redis_store: RedisStore) -> None:
    shared = open_ledger(redis_store)
    assert isinstance(shared, RedisLedger)
    assert shared.prefix == redis_store.prefix
    memory_store = MemoryStore()
    try:
        assert isinstance(open_ledger(memory_store), MemoryLedger)
    finally:
        await memory_store.close()
