"""The per-visitor state every gateway process reads on the hot path, behind one async protocol.

Two backends implement it, chosen by URL (`open_store` in `gateway.store`): `memory://` keeps the
state in this process; `redis://host:port/db` shares it between processes and hosts. The contract
tests in `tests/test_store_contract.py` run the same behaviours against both.

Every method is at most one round trip to the backend: `profile` is what a recommendation request
reads, `record` is what an event batch writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec

Listener = Callable[[str], None]


class StoreError(Exception):
    """The store is unreachable or answered with an error; the caller degrades, it does not crash."""


class StoreTimeoutError(StoreError, TimeoutError):
    """The store did not answer in time."""


class Interaction(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One remembered interaction, stored compactly as [item, event, ts].

    gc=False: it holds only strings and a float, so it can never be part of a reference cycle, and
    an in-process store holding millions of them must not make every full collection walk them."""

    item: str
    event: str
    ts: float  # Unix seconds, UTC


class Profile(msgspec.Struct, frozen=True):
    """What the store knows of one visitor right now."""

    recent: list[Interaction]  # oldest first, the newest `limit` at most
    counters: dict[str, int]  # counter name -> count within its current window; absent = 0


EMPTY_PROFILE = Profile(recent=[], counters={})


def check_record(*, keep: int, ttl: float, window: float) -> None:
    """The argument rules every backend's `record` shares."""
    if keep < 1 or ttl <= 0 or window <= 0:
        raise ValueError(f"keep, ttl and window must be positive, not keep={keep} ttl={ttl} window={window}")


class Store(Protocol):
    async def profile(self, visitor: str, *, limit: int, now: float) -> Profile:
        """The visitor's newest `limit` interactions (oldest first) and their live counters."""
        ...

    async def record(
        self,
        visitor: str,
        interactions: Sequence[Interaction],
        *,
        keep: int,
        ttl: float,
        counters: Mapping[str, int] | None = None,
        window: float = 3600.0,
        now: float,
    ) -> None:
        """Append interactions (kept in the order given, the newest `keep` survive), add to the
        named counters in the fixed window of `window` seconds containing `now`, and let the
        visitor's state expire `ttl` seconds after this write. One round trip."""
        ...

    async def forget(self, visitor: str) -> None:
        """Delete everything stored for the visitor."""
        ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(visitor)` after every `record` for that visitor, by this store object or,
        for a shared backend, by any process using the same one. Listeners run on the event loop
        and must not block. Announcements are best effort: a shared backend's subscriber that lost
        its connection misses what was recorded until it is back."""
        ...

    async def ping(self) -> None:
        """Raise StoreError unless the backend answers."""
        ...

    async def close(self) -> None: ...
