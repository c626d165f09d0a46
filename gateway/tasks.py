"""Background tasks the gateway's parts start and, on shutdown, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("tailor.gateway")

# How long a cancelled task may take to end. A task that swallows its cancellation (a library
# catching CancelledError inside a retry loop, say) must not hang the whole shutdown.
STOP_TIMEOUT_S = 5.0


async def stop(task: asyncio.Task[Any] | None, *, timeout: float = STOP_TIMEOUT_S) -> None:
    """Cancel `task` (None: nothing to do) and wait until it has ended, or `timeout` seconds."""
    if task is None:
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning("background task %s did not end within %.0f s of its cancellation", task.get_name(), timeout)
        return
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
