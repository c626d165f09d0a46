"""Both store backends keep the same contract: recent events, counters, expiry, erasure, the event
log and opening a store by URL (consent: test_store_consent_contract.py; triggers:
test_store_triggers_contract.py; the Redis one's own behaviour: test_store_redis.py)."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from gateway.store import (
    EMPTY_PROFILE,
    Consent,
    CounterKey,
    MemoryStore,
    Profile,
    Recorded,
    RedisStore,
    Retention,
    Store,
    open_store,
    window_label,
)
from gateway.store.log import FileLog, file_for
from index_builder import schema
from index_builder.readers import interaction_rows
from tests.conftest import RedisServer
from tests.stores import DAY, HOUR, T0, Elapse, items, remember, seen, tally, totals, unique_prefix
from tests.waiting import wait_until_async

pytestmark = pytest.mark.anyio


# The contract, for both backends.


async def test_an_unknown_visitor_has_an_empty_profile(store: Store) -> None:
    assert await store.profile("nobody", limit=10, now=T0) == EMPTY_PROFILE


async def test_recorded_interactions_come_back_oldest_first(store: Store) -> None:
    await remember(store, "v", "a", "b")
    await remember(store, "v", "c", now=T0 + 1)
    profile = await store.profile("v", limit=10, now=T0 + 2)
    assert profile.recent == [seen("a"), seen("b"), seen("c", T0 + 1)]
    assert profile.last_seen == T0 + 1


async def test_only_the_newest_keep_interactions_survive(store: Store) -> None:
    await remember(store, "v", "a", "b", "c", keep=3)
    await remember(store, "v", "d", "e", keep=3)
    assert items(await store.profile("v", limit=10, now=T0)) == ["c", "d", "e"]


async def test_a_batch_longer_than_keep_keeps_its_newest(store: Store) -> None:
    await remember(store, "v", "a", "b", "c", "d", keep=2)
    assert items(await store.profile("v", limit=10, now=T0)) == ["c", "d"]


async def test_limit_returns_the_newest_limit_interactions(store: Store) -> None:
    await remember(store, "v", "a", "b", "c", "d")
    assert items(await store.profile("v", limit=2, now=T0)) == ["c", "d"]


async def test_limit_zero_returns_counters_but_no_interactions(store: Store) -> None:
    await remember(store, "v", "a")
    assert await store.profile("v", limit=0, now=T0) == Profile(
        recent=[], counters={"view/1h": 1, "view@item:a/1h": 1}, last_seen=T0
    )


async def test_a_read_without_counters_leaves_them_out(store: Store) -> None:
    await remember(store, "v", "a", "b", now=T0 + 5)
    full = await store.profile("v", limit=10, now=T0 + 5)
    lean = await store.profile("v", limit=10, now=T0 + 5, counters=False)
    assert lean == Profile(recent=full.recent, counters={}, last_seen=T0 + 5)
    assert full.counters
    assert await store.profile("nobody", limit=10, now=T0, counters=False) == EMPTY_PROFILE


async def test_a_read_of_chosen_counters_returns_only_those(store: Store) -> None:
    await remember(store, "v", "a", "b", now=T0 + 5)
    await remember(store, "v", "a", event="purchase", now=T0 + 5)
    wanted = [
        CounterKey("view@item:a/1h", "view@item:a", HOUR),
        CounterKey("purchase/1h", "purchase", HOUR),
        CounterKey("purchase/1d", "purchase", DAY),  # a window this store does not count: absent
        CounterKey("click/1h", "click", HOUR),  # never happened: absent
    ]
    chosen = await store.profile("v", limit=10, now=T0 + 5, counters=wanted)
    full = await store.profile("v", limit=10, now=T0 + 5)
    assert chosen.counters == {"view@item:a/1h": 1, "purchase/1h": 1}
    assert {k: full.counters[k] for k in chosen.counters} == chosen.counters
    assert chosen.recent == full.recent and chosen.last_seen == full.last_seen
    assert (await store.profile("v", limit=10, now=T0 + 5, counters=[])).counters == {}


async def test_every_event_counts_by_type_item_and_category_in_every_window(store: Store) -> None:
    windows = (HOUR, DAY, 7 * DAY)
    await remember(store, "v", "a", categories=("shoes", "shoes/boots"), windows=windows)
    await remember(store, "v", "a", "b", event="click", windows=windows)
    await remember(store, "v", event="search", windows=windows)
    counters = (await store.profile("v", limit=10, now=T0 + 1)).counters
    per_window = {
        "view": 1,
        "view@item:a": 1,
        "view@category:shoes": 1,
        "view@category:shoes/boots": 1,
        "click": 2,
        "click@item:a": 1,
        "click@item:b": 1,
        "search": 1,
    }
    assert counters == {f"{name}/{label}": n for name, n in per_window.items() for label in ("1h", "1d", "7d")}


async def test_item_less_events_are_counted_but_not_listed(store: Store) -> None:
    await tally(store, "v", "search", 3)
    profile = await store.profile("v", limit=10, now=T0)
    assert (profile.recent, profile.counters, profile.last_seen) == ([], {"search/1h": 3}, T0)


async def test_a_counter_slides_with_time(store: Store) -> None:
    await tally(store, "v", "search", 2)
    await tally(store, "v", "search", 3, now=T0 + HOUR - 1)
    assert totals(await store.profile("v", limit=10, now=T0 + HOUR - 1)) == {"search/1h": 5}
    # A quarter of an hour into the next window, three quarters of the last one still count.
    assert totals(await store.profile("v", limit=10, now=T0 + HOUR + HOUR / 4)) == {"search/1h": 4}
    assert totals(await store.profile("v", limit=10, now=T0 + 2 * HOUR)) == {}


async def test_a_counter_adds_the_new_window_to_what_is_left_of_the_old(store: Store) -> None:
    await tally(store, "v", "search", 4)
    await tally(store, "v", "search", 1, now=T0 + HOUR)
    assert totals(await store.profile("v", limit=10, now=T0 + HOUR + HOUR / 4)) == {"search/1h": 4}  # 1 + 4 x 3/4
    await tally(store, "v", "search", 1, now=T0 + 5 * HOUR)  # long after: starts over
    assert totals(await store.profile("v", limit=10, now=T0 + 5 * HOUR)) == {"search/1h": 1}


async def test_an_event_older_than_the_last_two_windows_is_listed_but_not_counted(store: Store) -> None:
    await remember(store, "v", "new", now=T0 + 5 * HOUR)
    await remember(store, "v", "old", now=T0)  # a client clock hours behind
    profile = await store.profile("v", limit=10, now=T0 + 5 * HOUR)
    assert items(profile) == ["new", "old"]
    assert totals(profile) == {"view/1h": 1}
    assert profile.last_seen == T0 + 5 * HOUR


async def test_an_event_id_is_counted_once_per_visitor(store: Store) -> None:
    assert await remember(store, "v", "a", "b", ids=["e1", "e2"]) == [True, True]
    assert await remember(store, "v", "a", "c", ids=["e1", None]) == [False, True]  # a retry, and an id-less one
    assert await remember(store, "v", "x", "x", ids=["e3", "e3"]) == [True, False]  # twice in one batch
    assert await remember(store, "w", "a", ids=["e1"]) == [True]  # ids are per visitor
    profile = await store.profile("v", limit=10, now=T0)
    assert items(profile) == ["a", "b", "c", "x"]
    assert totals(profile) == {"view/1h": 4}


async def test_only_the_newest_ids_are_remembered(store: Store) -> None:
    await remember(store, "v", "a", "b", "c", ids=["e1", "e2", "e3"], id_memory=2)
    assert await remember(store, "v", "a", "c", ids=["e1", "e3"], id_memory=2) == [True, False]


async def test_without_id_memory_nothing_is_a_duplicate(store: Store) -> None:
    await remember(store, "v", "a", ids=["e1"], id_memory=0)
    assert await remember(store, "v", "a", ids=["e1"], id_memory=0) == [True]


async def test_past_max_counters_only_the_totals_keep_counting(store: Store) -> None:
    await remember(store, "v", "a", "b", max_counters=3)
    await remember(store, "v", "c", event="click", max_counters=3)
    await remember(store, "v", "a", "d", max_counters=3)
    counters = (await store.profile("v", limit=10, now=T0)).counters
    assert totals(await store.profile("v", limit=10, now=T0)) == {"view/1h": 4, "click/1h": 1}
    assert counters["view@item:a/1h"] == 2  # existing details still count
    assert "view@item:d/1h" not in counters and "click@item:c/1h" not in counters
    assert len([name for name in counters if "@" in name]) <= 3


async def test_different_visitors_are_independent(store: Store) -> None:
    await remember(store, "v", "a")
    await remember(store, "w", "b", "c", event="click")
    assert totals(await store.profile("v", limit=10, now=T0)) == {"view/1h": 1}
    profile = await store.profile("w", limit=10, now=T0)
    assert (items(profile), totals(profile)) == (["b", "c"], {"click/1h": 2})


async def test_odd_item_and_category_names_stay_intact(store: Store) -> None:
    await remember(store, "v", "a|b:c", "🛒", "3600.0|1", categories=("x|y", "@"))
    counters = (await store.profile("v", limit=10, now=T0)).counters
    for name in (
        "view@item:a|b:c/1h",
        "view@item:🛒/1h",
        "view@item:3600.0|1/1h",
        "view@category:x|y/1h",
        "view@category:@/1h",
    ):
        assert name in counters, name
    assert counters["view/1h"] == 3


async def test_a_visitor_expires_ttl_after_the_last_write(store: Store, elapse: Elapse) -> None:
    await remember(store, "v", "a", ttl=0.3)
    assert items(await store.profile("v", limit=10, now=T0 + 0.1)) == ["a"]
    await elapse(0.4)
    assert await store.profile("v", limit=10, now=T0 + 0.4) == EMPTY_PROFILE


async def test_every_write_renews_the_ttl(store: Store, elapse: Elapse) -> None:
    await remember(store, "v", "a", ttl=0.6)
    await elapse(0.4)
    await tally(store, "v", "search", 1, ttl=0.6, now=T0 + 0.4)
    await elapse(0.4)
    profile = await store.profile("v", limit=10, now=T0 + 0.8)
    assert (items(profile), totals(profile)) == (["a"], {"view/1h": 1, "search/1h": 1})


async def test_a_write_after_expiry_starts_from_empty(store: Store, elapse: Elapse) -> None:
    await remember(store, "v", "a", ttl=0.3, ids=["e1"])
    await elapse(0.4)
    assert await remember(store, "v", "b", now=T0 + 0.4, ids=["e1"]) == [True]  # forgotten with the rest
    profile = await store.profile("v", limit=10, now=T0 + 0.4)
    assert (items(profile), totals(profile)) == (["b"], {"view/1h": 1})


async def test_a_write_of_nothing_stores_nothing(store: Store) -> None:
    assert await store.record("v", [], retention=Retention(), now=T0) == []
    assert await store.profile("v", limit=10, now=T0) == EMPTY_PROFILE


async def test_forget_deletes_that_visitor_only(store: Store) -> None:
    await remember(store, "v", "a", ids=["e1"])
    await remember(store, "w", "b")
    await store.forget("v")
    await store.forget("never-seen")
    assert await store.profile("v", limit=10, now=T0) == EMPTY_PROFILE
    assert items(await store.profile("w", limit=10, now=T0)) == ["b"]
    assert await remember(store, "v", "a", ids=["e1"]) == [True]


async def test_odd_visitor_ids_neither_collide_nor_break(store: Store) -> None:
    visitors = ["a", "a:recent", "a:counters", "a:ids", "v:a", "a b", "", " ", "🙂", "a|b", "a\nb", "{a}", "x" * 1000]
    for number, visitor in enumerate(visitors):
        await remember(store, visitor, str(number))
    for number, visitor in enumerate(visitors):
        profile = await store.profile(visitor, limit=10, now=T0)
        assert (items(profile), totals(profile)) == ([str(number)], {"view/1h": 1}), visitor


async def test_concurrent_writes_to_one_visitor_lose_nothing(store: Store) -> None:
    async def one(number: int) -> None:
        await remember(store, "v", str(number), ids=[f"e{number}"])

    async with anyio.create_task_group() as group:
        for number in range(50):
            group.start_soon(one, number)
            group.start_soon(one, number)  # and each sent twice, as a retrying browser would
    profile = await store.profile("v", limit=100, now=T0)
    assert sorted(items(profile), key=int) == [str(n) for n in range(50)]
    assert totals(profile) == {"view/1h": 50}


async def test_a_returned_profile_is_the_callers_to_change(store: Store) -> None:
    await remember(store, "v", "a")
    (await store.profile("v", limit=10, now=T0)).recent.clear()
    assert items(await store.profile("v", limit=10, now=T0)) == ["a"]


@pytest.mark.parametrize(
    "arguments",
    [{"keep": 0}, {"ttl": 0.0}, {"ttl": -1.0}, {"windows": ()}, {"windows": (0.0,)}, {"ids": -1}, {"max_counters": 0}],
    ids=["keep=0", "ttl=0", "ttl<0", "no windows", "window=0", "ids<0", "max_counters=0"],
)
def test_a_retention_out_of_range_is_refused(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"retention|windows"):
        Retention(**arguments)


async def test_a_negative_limit_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.profile("v", limit=-1, now=T0)


def test_window_labels() -> None:
    assert [window_label(s) for s in (60, 3600, 86400, 604800, 2592000, 90, 5400)] == [
        "1m",
        "1h",
        "1d",
        "7d",
        "30d",
        "90s",
        "90m",
    ]


# The memory backend's bounds.


async def test_memory_evicts_the_least_recently_used_visitor_beyond_max_visitors(anyio_backend: str) -> None:
    store = MemoryStore(max_visitors=2)
    await remember(store, "a", "1")
    await remember(store, "b", "2")
    await store.profile("a", limit=10, now=T0)  # a read counts as use
    await remember(store, "c", "3")
    assert len(store) == 2
    assert await store.profile("b", limit=10, now=T0) == EMPTY_PROFILE
    assert items(await store.profile("a", limit=10, now=T0)) == ["1"]
    assert items(await store.profile("c", limit=10, now=T0)) == ["3"]


async def test_memory_evicts_the_least_recently_used_visitors_beyond_its_byte_budget(anyio_backend: str) -> None:
    store = MemoryStore(max_mb=0.01)  # about 10 KB: a handful of visitors with a few events each
    for number in range(100):
        await remember(store, f"v{number}", *(f"item-{n}" for n in range(5)))
    held = len(store)
    assert 1 < held < 100
    assert store.bytes <= 0.01 * 1024 * 1024
    assert await store.profile("v0", limit=10, now=T0) == EMPTY_PROFILE
    assert len(items(await store.profile("v99", limit=10, now=T0))) == 5
    # One visitor larger than the whole budget is still kept: it is the one just written.
    await remember(store, "big", *(f"item-{n}" for n in range(100)))
    assert len(store) == 1
    assert len(items(await store.profile("big", limit=100, now=T0))) == 100


async def test_memory_byte_estimate_follows_writes_and_erasures(anyio_backend: str) -> None:
    store = MemoryStore()
    await remember(store, "a", "1")
    one = store.bytes
    await remember(store, "a", "2", "3")
    await remember(store, "b", "4")
    assert store.bytes > one
    await store.forget("a")
    await store.forget("b")
    assert store.bytes == 0


async def test_memory_retires_expired_visitors_that_are_never_read_again(anyio_backend: str) -> None:
    store = MemoryStore()
    for visitor in "abcd":
        await remember(store, visitor, "1", ttl=10)
    for visitor in "efgh":
        await remember(store, visitor, "1", ttl=10, now=T0 + 10)
    assert len(store) == 4


async def test_memory_prunes_counters_that_left_their_window(anyio_backend: str) -> None:
    store = MemoryStore()
    for number in range(100):
        await remember(store, "v", f"i{number}", now=T0 + HOUR * number)
    counters = (await store.profile("v", limit=10, now=T0 + HOUR * 99)).counters
    # At the very start of hour 99 the sliding hour still covers all of hour 98.
    assert counters == {"view/1h": 2, "view@item:i99/1h": 1, "view@item:i98/1h": 1}
    assert len(store._visitors["v"].counters) == 3  # hours 0-97 pruned: nothing of them is in the window


async def test_memory_visitor_state_is_invisible_to_the_garbage_collector(anyio_backend: str) -> None:
    # A full collection walks every tracked object: held by hundreds of thousands of visitors, that
    # was a pause of about a second, so nothing a visitor keeps may stay tracked.
    store = MemoryStore()
    await remember(store, "v", "a", "b", ids=["e1", "e2"], categories=("shoes",))
    await store.set_consent("v", {"marketing": Consent("granted", T0, "banner")}, ttl=DAY, now=T0)
    assert await store.fire("v", "cart", b"offer", period=DAY, keep=5, ttl=DAY, now=T0)
    gc.collect()
    state = store._visitors["v"]
    held = [state, state.recent, *state.recent, state.counters, state.ids, state.consent, state.fired, state.inbox]
    assert [gc.is_tracked(value) for value in held] == [False] * len(held)
    assert items(await store.profile("v", limit=10, now=T0)) == ["a", "b"]  # and it still reads back


async def test_memory_event_log_is_build_input(tmp_path: Path, anyio_backend: str) -> None:
    store = MemoryStore(log=FileLog(tmp_path / "events"))
    await remember(store, "v", "a", "b", ids=["e1", "e2"])
    await remember(store, "v", "a", ids=["e1"])  # a duplicate is not logged again
    await tally(store, "v", "search", 1)
    await store.close()
    (log_file,) = (tmp_path / "events").glob("events-*.jsonl")
    # read and validated the way `tailor build` reads its --events files
    rows = [msgspec.convert(row, schema.Interaction, strict=False) for _, row in interaction_rows(log_file)]
    assert [(r.user_id, r.item_id, r.event, r.event_id) for r in rows] == [
        ("v", "a", "view", "e1"),
        ("v", "b", "view", "e2"),
        ("v", None, "search", None),
    ]
    assert all(r.timestamp.timestamp() == T0 for r in rows)


async def test_redis_log_entries_older_than_log_ttl_are_trimmed(redis_server: RedisServer, anyio_backend: str) -> None:
    server = redis_server
    server.start()
    store = RedisStore(server.url, prefix=unique_prefix())
    try:
        now = time.time()  # the stream's entry ids are the server's clock
        retention = Retention(windows=(HOUR,), log_ttl=60.0)
        await store.record("v", [Recorded("view", now, item="a")], retention=retention, now=now)
        await store.record("w", [Recorded("view", now, item="b")], retention=retention, now=now)
        assert [line.item_id for line in await store.logged("v")] == ["a"]
        later = now + 120  # both are older than a minute by then
        await store.record("v", [Recorded("view", later, item="c")], retention=retention, now=later)
        assert [line.item_id for line in await store.logged("v")] == ["c"]
        assert await store.logged("w") == []
    finally:
        await store.close()


def test_log_files_of_days_past_the_retention_are_deleted(tmp_path: Path) -> None:
    log = FileLog(tmp_path, keep_s=2 * DAY)
    now = T0
    for days_ago in range(5):
        file_for(tmp_path, now - days_ago * DAY).write_text("{}\n")
    consent = file_for(tmp_path, now - 4 * DAY, "consent")
    consent.write_text("{}\n")
    log._write([b'{"user_id": "v", "event": "view", "timestamp": 1}'], now)
    kept = sorted(path.name for path in tmp_path.glob("events-*.jsonl"))
    # today, yesterday and the day before: the day that ended more than two days ago is gone
    assert kept == sorted(file_for(tmp_path, now - d * DAY).name for d in range(3))
    assert consent.exists()  # another log's files are not this one's to delete


# Change announcements (what WebSocket pushes are made from).


async def test_a_record_is_announced_to_subscribers(store: Store) -> None:
    heard: list[str] = []
    store.subscribe(heard.append)
    if isinstance(store, RedisStore):
        await asyncio.wait_for(store.subscribed.wait(), 5)
    await remember(store, "v1", "a")
    await tally(store, "v2", "search", 1)
    await wait_until_async(lambda: len(heard) >= 2, what="both announcements")
    assert heard == ["v1", "v2"]


async def test_redis_a_record_by_another_process_is_announced(redis_server: RedisServer) -> None:
    """Two store objects on one Redis stand for two gateway processes: one records, the other hears."""
    redis_server.start()
    prefix = unique_prefix()
    listening, recording, elsewhere = (
        RedisStore(redis_server.url, prefix=p) for p in (prefix, prefix, unique_prefix())
    )
    heard: list[str] = []
    try:
        listening.subscribe(heard.append)
        await asyncio.wait_for(listening.subscribed.wait(), 5)
        await remember(elsewhere, "not-ours", "x")  # another prefix: another deployment on the same server
        await remember(recording, "v", "a")
        await wait_until_async(lambda: heard, what="the announcement")
        # Nothing to wait for after it: the other prefix's record was published first, and Redis delivers
        # in order, so had it been heard it would be in `heard` already.
        assert heard == ["v"]
    finally:
        for backend in (listening, recording, elsewhere):
            await backend.close()


async def test_redis_the_subscription_comes_back_after_a_restart(redis_server: RedisServer) -> None:
    redis_server.start()
    prefix = unique_prefix()
    listening, recording = RedisStore(redis_server.url, prefix=prefix), RedisStore(redis_server.url, prefix=prefix)
    heard: list[str] = []
    try:
        listening.subscribe(heard.append)
        await asyncio.wait_for(listening.subscribed.wait(), 5)
        redis_server.stop()
        redis_server.start()

        async def heard_again() -> bool:  # records until one is heard (the resubscription takes a moment)
            await remember(recording, "v", "a")
            return bool(heard)

        await wait_until_async(heard_again, interval=0.05, what="a record heard after the restart")
        assert heard and set(heard) == {"v"}
    finally:
        await listening.close()
        await recording.close()


# open_store.


@pytest.mark.parametrize("url", ["", "memory:", "memory://", "MEMORY://", "memory://?max_visitors=5"])
async def test_open_store_gives_a_memory_store_for_memory_urls(url: str) -> None:
    store = open_store(url)
    assert isinstance(store, MemoryStore)
    await store.close()


async def test_open_store_honours_max_visitors() -> None:
    store = open_store("memory://?max_visitors=1")
    await remember(store, "a", "1")
    await remember(store, "b", "2")
    assert await store.profile("a", limit=10, now=T0) == EMPTY_PROFILE
    assert items(await store.profile("b", limit=10, now=T0)) == ["2"]


def test_open_store_bounds_a_memory_store_by_default_and_honours_max_mb() -> None:
    assert isinstance(default := open_store("memory://"), MemoryStore)
    assert default.max_mb == 512
    assert isinstance(chosen := open_store("memory://?max_mb=64.5&max_visitors=10"), MemoryStore)
    assert (chosen.max_mb, chosen.max_visitors) == (64.5, 10)


async def test_open_store_gives_a_working_redis_store_with_the_prefix_asked_for(
    redis_server: RedisServer, raw: Redis
) -> None:
    redis_server.start()
    prefix = unique_prefix()
    store = open_store(f"{redis_server.url}?prefix={prefix}&socket_timeout=0.5")
    try:
        assert isinstance(store, RedisStore)
        await remember(store, "v", "a")
        assert await raw.exists(f"{prefix}v:v:recent") == 1
    finally:
        await store.close()


@pytest.mark.parametrize("url", ["rediss://cache.example:6380/1", "unix:///run/redis/redis.sock?db=2"])
async def test_open_store_accepts_tls_and_unix_socket_redis_urls(url: str) -> None:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert store.prefix == "tailor:"
    await store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://db/tailor", "accepted: memory://, redis://"),
        ("localhost:6379", "unknown scheme"),
        ("memory://somewhere", "no host or path"),
        ("memory://?max_visitors=many", "integer"),
        ("memory://?max_visitors=0", "at least 1"),
        ("memory://?max_mb=lots", "a number"),
        ("memory://?max_mb=0", "positive"),
        ("memory://?size=10", "unknown option"),
        ("redis://127.0.0.1:6379/0?sockettimeout=1", "does not know"),
    ],
)
async def test_open_store_refuses_what_it_cannot_open(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)
