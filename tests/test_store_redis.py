"""The Redis store beyond the shared contract: round trips, keys, the hot-path connection, faults."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import msgspec
import pytest
import uvloop
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from gateway.store import Profile, RedisStore, StoreError
from gateway.store.resp import Multiplexed, _Link
from tests.conftest import RedisServer
from tests.stores import (
    HOUR,
    T0,
    items,
    remember,
    seen,
    tally,
    totals,
    unique_prefix,
)

pytestmark = pytest.mark.anyio


# The Redis backend: round trips, keys, faults.


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every write to a Redis socket, by redis-py or by the multiplexed hot-path connection; a pipeline
    is one write, and so is a health-check PING."""
    sent: list[object] = []
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sent.append(command)
        await original(self, command, check_health)

    original_flush = _Link._flush

    def counting_flush(self: _Link) -> None:
        if self._unsent:
            sent.append(list(self._unsent))
        original_flush(self)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    monkeypatch.setattr(_Link, "_flush", counting_flush)
    return sent


async def test_redis_record_is_one_round_trip(redis_store: RedisStore, round_trips: list[object]) -> None:
    await remember(redis_store, "w", "x")  # connects and loads the script: neither is part of a record
    round_trips.clear()
    await remember(redis_store, "v", "a", "b", ids=["e1", "e2"], categories=("shoes",))
    assert len(round_trips) == 1


async def test_redis_profile_is_one_round_trip(redis_store: RedisStore, round_trips: list[object]) -> None:
    await remember(redis_store, "v", "a", "b")
    await redis_store.profile("w", limit=1, now=T0)  # connects and loads the script: neither is part of a read
    round_trips.clear()
    profile = await redis_store.profile("v", limit=10, now=T0)
    assert len(round_trips) == 1
    assert profile == Profile(
        recent=[seen("a"), seen("b")], counters={"view/1h": 2, "view@item:a/1h": 1, "view@item:b/1h": 1}, last_seen=T0
    )


async def test_redis_concurrent_profiles_share_writes_and_each_gets_its_own_answer(
    redis_store: RedisStore, round_trips: list[object]
) -> None:
    for number in range(20):
        await remember(redis_store, f"v{number}", f"item{number}")
        await tally(redis_store, f"v{number}", "search", number + 1)
    await redis_store.profile("v0", limit=10, now=T0)  # connected
    round_trips.clear()
    profiles = await asyncio.gather(*(redis_store.profile(f"v{number}", limit=10, now=T0) for number in range(20)))
    assert [items(p) for p in profiles] == [[f"item{number}"] for number in range(20)]
    assert [totals(p)["search/1h"] for p in profiles] == [number + 1 for number in range(20)]
    assert len(round_trips) == 1  # twenty calls made in one turn of the loop: one write


@pytest.mark.parametrize("busy_in", ["a task", "an I/O callback"])
def test_redis_a_reply_that_waited_while_the_loop_was_busy_is_not_a_timeout(
    redis_server: RedisServer, busy_in: str
) -> None:
    """A gateway busy past a read's deadline must not take the reply that reached its socket
    meanwhile for a slow store. Run on uvloop, the server's loop, which runs expired timers first
    in each turn: after work in a task (a timer per call would cancel the caller whose reply is
    already in) and after work in an I/O callback (the next socket read comes after the timers)."""
    redis_server.start()

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        store = RedisStore(redis_server.url, prefix=unique_prefix())
        ours, theirs = socket.socketpair()
        try:
            await remember(store, "v", "a")
            await store.profile("v", limit=10, now=T0)  # connected
            assert store.bound_reads(0.05)
            redis_server.pause()  # so the reply comes while the loop is busy, not before

            def busy() -> None:
                redis_server.resume()
                time.sleep(0.2)  # 4x the timeout; Redis answers meanwhile

            task = asyncio.create_task(store.profile("v", limit=10, now=T0))
            await asyncio.sleep(0)  # the task queues its command; the write is due at the end of this turn
            if busy_in == "a task":
                loop.call_soon(busy)  # right after that write
            else:
                theirs.send(b"x")

                def readable() -> None:  # runs while the loop handles socket events
                    loop.remove_reader(ours.fileno())
                    busy()

                loop.add_reader(ours.fileno(), readable)
            return items(await task)
        finally:
            ours.close()
            theirs.close()
            await store.close()

    assert uvloop.run(scenario()) == ["a"]


async def test_redis_keys_are_namespaced_and_carry_the_ttl(redis_store: RedisStore, raw: Redis) -> None:
    await remember(redis_store, "v", "a", ttl=60, ids=["e1"])
    stem = f"{redis_store.prefix}v:v:"
    per_visitor = [f"{stem}recent", f"{stem}counters", f"{stem}ids"]
    assert sorted(await raw.keys(f"{redis_store.prefix}*")) == sorted(
        k.encode() for k in [*per_visitor, redis_store.log_key]
    )
    for key in per_visitor:
        assert 59_000 < await raw.pttl(key) <= 60_000


async def test_redis_a_counter_is_one_field_per_name_and_window(redis_store: RedisStore, raw: Redis) -> None:
    for hour in range(10):
        await tally(redis_store, "v", "search", 1, now=T0 + hour * HOUR)
    fields = await raw.hgetall(f"{redis_store.prefix}v:v:counters")
    assert fields == {b"search|3600.0": f"{472_231}:1:1".encode(), b"@last_seen": b"%d" % (T0 + 9 * HOUR)}


async def test_redis_event_log_is_a_stream_of_build_input_lines(redis_store: RedisStore, raw: Redis) -> None:
    await remember(redis_store, "v", "a", "b", ids=["e1", "e2"])
    await remember(redis_store, "v", "a", ids=["e1"])  # a duplicate is not logged again
    entries: Any = await raw.xrange(redis_store.log_key)
    lines = [msgspec.json.decode(fields[b"e"]) for _, fields in entries]
    assert lines == [
        {"user_id": "v", "event": "view", "timestamp": T0, "item_id": "a", "event_id": "e1"},
        {"user_id": "v", "event": "view", "timestamp": T0, "item_id": "b", "event_id": "e2"},
    ]


async def test_redis_undecodable_data_is_a_store_error(redis_store: RedisStore, raw: Redis) -> None:
    await raw.rpush(f"{redis_store.prefix}v:v:recent", b"\xc1not msgpack")
    with pytest.raises(StoreError):
        await redis_store.profile("v", limit=10, now=T0)


async def test_redis_a_wrongly_typed_key_is_a_store_error(redis_store: RedisStore, raw: Redis) -> None:
    await raw.set(f"{redis_store.prefix}v:v:recent", b"a string, not a list")
    with pytest.raises(StoreError):
        await remember(redis_store, "v", "a")


async def test_redis_down_fails_fast_with_store_error_then_recovers(
    redis_server: RedisServer, redis_store: RedisStore
) -> None:
    await remember(redis_store, "v", "a")
    redis_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"redis profile failed: (ConnectionError|RespError): .*connect"):
            await redis_store.profile("v", limit=10, now=T0)
        with pytest.raises(StoreError):
            await remember(redis_store, "v", "b")
        with pytest.raises(StoreError):
            await redis_store.ping()
        with pytest.raises(StoreError):
            await redis_store.forget("v")
        assert time.monotonic() - started < 2
    finally:
        redis_server.start()
    # The server came back empty (no persistence); what matters is that the same object works again.
    await remember(redis_store, "v", "c")
    assert items(await redis_store.profile("v", limit=10, now=T0)) == ["c"]
    await redis_store.ping()


async def test_redis_a_restart_between_calls_goes_unnoticed(redis_server: RedisServer, redis_store: RedisStore) -> None:
    await remember(redis_store, "v", "a")  # leaves a pooled connection that the restart kills
    redis_server.stop()
    redis_server.start()
    await remember(redis_store, "v", "b")
    assert items(await redis_store.profile("v", limit=10, now=T0)) == ["b"]


async def test_redis_a_hung_server_is_a_store_error_within_the_timeout(redis_server: RedisServer) -> None:
    redis_server.start()
    store = RedisStore(redis_server.url, prefix=unique_prefix(), connect_timeout=0.2, timeout=0.2)
    try:
        await remember(store, "v", "a")
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.profile("v", limit=10, now=T0)
            with pytest.raises(StoreError):
                await store.ping()
            # A timeout plus one retry (reconnect and handshake also time out) and the backoff between.
            assert time.monotonic() - started < 2.5
        finally:
            redis_server.resume()
        assert items(await store.profile("v", limit=10, now=T0)) == ["a"]
    finally:
        await store.close()


async def test_redis_concurrent_reads_each_get_their_own_visitor(redis_store: RedisStore) -> None:
    """Reads from many requests share one pipelined connection; replies must reach the right caller."""
    for number in range(40):
        await remember(redis_store, f"v{number}", f"item-{number}")
    profiles = await asyncio.gather(*(redis_store.profile(f"v{n % 40}", limit=5, now=T0) for n in range(400)))
    assert [items(p) for p in profiles] == [[f"item-{n % 40}"] for n in range(400)]


async def test_redis_a_reader_that_gives_up_does_not_shift_the_replies_of_the_others(
    redis_store: RedisStore,
) -> None:
    await remember(redis_store, "first", "a")
    await remember(redis_store, "second", "b")
    assert items(await redis_store.profile("second", limit=5, now=T0)) == ["b"]  # connected
    abandoned = asyncio.create_task(redis_store.profile("first", limit=5, now=T0))
    await asyncio.sleep(0)  # its commands are written; now its caller goes away before the reply
    abandoned.cancel()
    assert items(await redis_store.profile("second", limit=5, now=T0)) == ["b"]
    assert items(await redis_store.profile("first", limit=5, now=T0)) == ["a"]


async def test_redis_hot_path_commands_leave_out_none_arguments(redis_server: RedisServer) -> None:
    """Commands go to hiredis as they are, or without their None arguments (optional ones)."""
    fast = Multiplexed(port=redis_server.port)
    key = unique_prefix() + "none-args"
    try:
        assert await fast.execute(("SET", key, "one", None), ("GET", key)) == [b"OK", b"one"]
        assert await fast.execute(("SET", key, "two"), ("GET", key), ("DEL", key)) == [b"OK", b"two", 1]
    finally:
        fast.close()
        await asyncio.sleep(0)  # the transport's close is the next callback of the loop (call_soon)


async def test_redis_an_erasure_is_answered_by_every_store_sharing_the_redis(redis_server: RedisServer) -> None:
    redis_server.start()
    prefix = unique_prefix()
    here, there, elsewhere = (RedisStore(redis_server.url, prefix=prefix) for _ in range(3))
    heard: list[tuple[str, str]] = []

    def closer(name: str, sockets: int) -> Any:
        async def close(visitor: str) -> int:
            heard.append((name, visitor))
            return sockets

        return close

    here.subscribe_erasures(closer("here", 0))
    there.subscribe_erasures(closer("there", 2))
    elsewhere.subscribe_erasures(closer("elsewhere", 1))
    try:
        async with asyncio.timeout(10):
            for store in (here, there, elsewhere):
                await store.subscribed.wait()
        assert await here.announce_erasure("gone", wait=5) == 3
        assert sorted(heard) == [("elsewhere", "gone"), ("here", "gone"), ("there", "gone")]
    finally:
        for store in (here, there, elsewhere):
            await store.close()
