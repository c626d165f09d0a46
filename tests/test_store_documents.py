"""Follower: an announcement that comes while a refresh runs is not lost (that refresh may have read
the state before the change), and announcements during one refresh make one more, not many."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store.documents import Follower, LocalDocuments
from tests.waiting import wait_until_async

pytestmark = pytest.mark.anyio


class Slow(Follower):
    def __init__(self) -> None:
        super().__init__(LocalDocuments("test"), poll_s=0)
        self.refreshes = 0
        self.release = asyncio.Event()

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.refreshes == 1:
            await self.release.wait()


async def test_an_announcement_during_a_refresh_brings_one_more_refresh() -> None:
    follower = Slow()
    follower.changed()
    await asyncio.sleep(0)  # the first refresh is running and waiting
    assert follower.refreshes == 1
    follower.changed()
    follower.changed()  # folded into the same second refresh
    follower.release.set()
    await wait_until_async(lambda: follower.refreshes >= 2, what="the second refresh")
    assert follower.refreshes == 2
    follower.changed()
    await wait_until_async(lambda: follower.refreshes >= 3, what="the third refresh")
    assert follower.refreshes == 3
    await follower.stop()
