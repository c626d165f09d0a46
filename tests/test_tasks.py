"""Stopping background tasks on shutdown."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.tasks import stop


async def test_stop_cancels_a_task_and_waits_for_its_end(anyio_backend: str) -> None:
    ended = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    await stop(task)
    assert task.cancelled() and ended.is_set()


async def test_stop_gives_up_on_a_task_that_swallows_its_cancellation(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # what a careless retry loop does

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="tailor.gateway"):
        await stop(task, timeout=0.05)
    assert not task.done()
    assert "stubborn did not end" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()


async def test_stop_reraises_what_the_task_failed_with(anyio_backend: str) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await stop(task)
