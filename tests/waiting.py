"""Waiting for something to happen, by polling against a deadline instead of sleeping a fixed time.

A fixed sleep is either too short on a loaded machine (a flaky test) or longer than needed
everywhere (a slow suite); a poll returns as soon as the condition holds and fails with a message
when it never does. The timeouts are generous on purpose: they bound a hang, they time nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

TIMEOUT = 10.0
INTERVAL = 0.01


def wait_until(
    predicate: Callable[[], object], *, timeout: float = TIMEOUT, interval: float = INTERVAL, what: str = ""
) -> None:
    """Return once `predicate()` is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], object | Awaitable[object]],
    *,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
    what: str = "",
) -> None:
    """`wait_until` for async tests: the event loop runs meanwhile; `predicate` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        await anyio.sleep(interval)
