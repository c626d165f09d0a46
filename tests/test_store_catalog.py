"""Live catalog changes, one contract for both backends (gateway.store.catalog): the file beside the
rules and Redis (on the session's real redis-server)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store import RedisStore
from gateway.store.catalog import CatalogChanges, LocalCatalog
from tests.conftest import RedisServer
from tests.waiting import wait_until_async

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["file", "redis"])
async def changes(request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str) -> AsyncIterator[CatalogChanges]:
    if request.param == "file":
        local = LocalCatalog(tmp_path / "catalog.jsonl")
        yield local
        await local.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.start()
    store = RedisStore(server.url, prefix=f"test:{uuid.uuid4().hex}:")
    shared = store.catalog()
    try:
        yield shared
    finally:
        await shared.close()
        await store.close()


async def test_changes_are_numbered_in_order_and_read_back_after_a_number(changes: CatalogChanges) -> None:
    assert await changes.put([("a", b'{"v": 1}'), ("b", b'{"v": 2}')]) == 2
    assert await changes.put([("c", b'{"v": 3}')]) == 3
    assert await changes.since(0) == [(1, "a", b'{"v": 1}'), (2, "b", b'{"v": 2}'), (3, "c", b'{"v": 3}')]
    assert await changes.since(2) == [(3, "c", b'{"v": 3}')]
    assert await changes.since(3) == []
    assert await changes.size() == 3


async def test_only_the_latest_record_of_an_item_is_read_at_its_number(changes: CatalogChanges) -> None:
    await changes.put([("a", b"1"), ("b", b"2")])
    await changes.put([("a", b"3")])
    assert await changes.since(0) == [(2, "b", b"2"), (3, "a", b"3")]
    assert await changes.size() == 2


async def test_a_long_catch_up_is_read_in_chunks(changes: CatalogChanges) -> None:
    await changes.put([(f"i{n}", b"{}") for n in range(25)])
    first = await changes.since(0, limit=10)
    assert [seq for seq, _, _ in first] == list(range(1, 11))
    rest = await changes.since(first[-1][0], limit=100)
    assert [seq for seq, _, _ in rest] == list(range(11, 26))


async def test_a_change_is_announced_to_the_watchers(changes: CatalogChanges) -> None:
    heard: list[int] = []
    changes.watch(lambda: heard.append(1))
    subscribed = getattr(changes, "subscribed", None)
    if subscribed is not None:  # Redis: the subscription is live before the change is made
        await wait_until_async(subscribed.is_set, what="the subscription")
    await changes.put([("a", b"1")])
    await wait_until_async(lambda: heard, what="the announcement")


async def test_the_file_keeps_the_changes_across_a_restart_compacted(tmp_path: Path) -> None:
    path = tmp_path / "catalog.jsonl"
    first = LocalCatalog(path)
    await first.put([("a", b'{"v": 1}'), ("b", b'{"v": 2}')])
    await first.put([("a", b'{"v": 3}')])
    await first.close()
    with path.open("ab") as handle:
        handle.write(b'[4, "c", {"v"')  # a line cut short by a crash mid-write
    again = LocalCatalog(path)
    assert await again.since(0) == [(2, "b", b'{"v": 2}'), (3, "a", b'{"v": 3}')]
    assert len(path.read_bytes().splitlines()) == 2  # compacted to the latest of each item
    assert await again.put([("d", b"{}")]) == 4
