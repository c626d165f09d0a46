"""Helpers of the store contract tests (test_store_*_contract.py, test_store_contract.py)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

from gateway.store import Interaction, Profile, Recorded, Retention, Store

HOUR = 3600.0
T0 = HOUR * 472_222  # the first second of a window, so T0 + a few seconds stays in it
DAY = 24 * HOUR

Elapse = Callable[[float], Awaitable[None]]


def seen(item: str, ts: float = T0) -> Interaction:
    return Interaction(item=item, event="view", ts=ts)


def items(profile: Profile) -> list[str]:
    return [interaction.item for interaction in profile.recent]


async def remember(
    store: Store,
    visitor: str,
    *names: str,
    now: float = T0,
    keep: int = 100,
    ttl: float = DAY,
    event: str = "view",
    ids: Sequence[str | None] | None = None,
    categories: tuple[str, ...] = (),
    windows: tuple[float, ...] = (HOUR,),
    max_counters: int = 500,
    id_memory: int = 1000,
) -> list[bool]:
    """Record one `event` per item name at `now` (or, with no names, one item-less `event`)."""
    events = [
        Recorded(event, now, item=name or None, id=ids[number] if ids else None, categories=categories)
        for number, name in enumerate(names or ("",))
    ]
    retention = Retention(keep=keep, ttl=ttl, ids=id_memory, windows=windows, max_counters=max_counters)
    stored = await store.record(visitor, events, retention=retention, now=now)
    assert stored is not None  # None only when a consent requirement is not met, and none is asked for here
    return stored


async def tally(store: Store, visitor: str, event: str, times: int, *, now: float = T0, ttl: float = DAY) -> None:
    """`times` item-less events of one type (counted, not listed in `recent`)."""
    retention = Retention(ttl=ttl, windows=(HOUR,))
    await store.record(visitor, [Recorded(event, now)] * times, retention=retention, now=now)


def totals(profile: Profile) -> dict[str, int]:
    """The per-type counters, without the per-item and per-category ones."""
    return {name: count for name, count in profile.counters.items() if "@" not in name}


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"
