"""The store contract on consent: choices per purpose, their audit log, and what a read or a
record may do without them. For both backends (the `store` fixture)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from gateway.store import (
    EMPTY_PROFILE,
    Consent,
    MemoryStore,
    Profile,
    Recorded,
    RedisStore,
    Requirement,
    Retention,
    Store,
)
from gateway.store.log import FileLog
from tests.conftest import RedisServer
from tests.stores import DAY, HOUR, T0, Elapse, items, remember, unique_prefix
from tests.waiting import wait_until_async

pytestmark = pytest.mark.anyio


# Consent.


async def test_consent_choices_are_kept_per_purpose_and_read_with_the_profile(store: Store) -> None:
    granted = Consent("granted", T0, "banner")
    await store.set_consent("v", {"analytics": granted, "personalization": granted}, ttl=DAY, now=T0)
    later = Consent("revoked", T0 + 5, "settings page", expires_at=None)
    await store.set_consent("v", {"personalization": later}, ttl=DAY, now=T0 + 5)
    for counters in (True, False):
        profile = await store.profile("v", limit=10, now=T0 + 6, counters=counters)
        assert profile.consent == {"analytics": granted, "personalization": later}
        assert (profile.recent, profile.last_seen) == ([], None)
    await remember(store, "v", "a", now=T0 + 7)  # events keep the choices
    assert (await store.profile("v", limit=10, now=T0 + 7)).consent["analytics"] == granted


def test_a_choice_allows_only_while_granted_and_unexpired() -> None:
    assert Consent("granted", T0, "x").allows(T0 + 10**9)
    assert not Consent("granted", T0, "x", expires_at=T0 + 60).allows(T0 + 60)
    assert not Consent("denied", T0, "x").allows(T0)
    assert not Consent("revoked", T0, "x").allows(T0)


async def test_consent_expires_with_the_visitor_and_goes_with_an_erasure(store: Store, elapse: Elapse) -> None:
    await store.set_consent("v", {"analytics": Consent("granted", T0, "b")}, ttl=0.3, now=T0)
    await store.set_consent("w", {"analytics": Consent("granted", T0, "b")}, ttl=DAY, now=T0)
    await elapse(0.4)
    assert (await store.profile("v", limit=10, now=T0 + 0.4)).consent == {}
    await store.forget("w")
    assert (await store.profile("w", limit=10, now=T0 + 0.4)).consent == {}


async def test_every_consent_change_is_appended_to_the_audit_log(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    changes = [
        ("v", "analytics", Consent("granted", T0, "banner")),
        ("v", "analytics", Consent("revoked", T0 + 1, "settings", expires_at=None)),
        ("w", "marketing", Consent("denied", T0 + 2, "banner", expires_at=T0 + DAY)),
    ]
    expected = [{"visitor": v, "purpose": p, **msgspec.to_builtins(c)} for v, p, c in changes]
    memory = MemoryStore(audit=FileLog(tmp_path, prefix="consent"))
    server: RedisServer = request.getfixturevalue("redis_server")
    server.start()
    redis = RedisStore(server.url, prefix=unique_prefix())
    try:
        for backend in (memory, redis):
            for visitor, purpose, choice in changes:
                await backend.set_consent(visitor, {purpose: choice}, ttl=DAY, now=choice.at)
        await memory.close()
        (path,) = tmp_path.glob("consent-*.jsonl")
        assert [msgspec.json.decode(line) for line in path.read_bytes().splitlines()] == expected
        raw = Redis.from_url(server.url)
        entries: Any = await raw.xrange(redis.audit_key)
        assert [msgspec.json.decode(fields[b"e"]) for _, fields in entries] == expected
        await raw.aclose()
    finally:
        await redis.close()


OPT_IN = Requirement("analytics", default=False)
OPT_OUT = Requirement("analytics", default=True)


async def test_without_the_consent_a_record_needs_nothing_is_stored(store: Store) -> None:
    events = [Recorded("view", T0, item="a", id="e1")]
    retention = Retention(windows=(HOUR,))
    assert await store.record("v", events, retention=retention, now=T0, requires=OPT_IN) is None
    assert await store.profile("v", limit=10, now=T0) == EMPTY_PROFILE
    assert await store.record("v", events, retention=retention, now=T0, requires=OPT_OUT) == [True]  # no choice made
    await store.set_consent("v", {"analytics": Consent("denied", T0, "banner")}, ttl=DAY, now=T0)
    events2 = [Recorded("view", T0, item="b", id="e2")]
    assert await store.record("v", events2, retention=retention, now=T0, requires=OPT_OUT) is None  # a choice decides
    assert items(await store.profile("v", limit=10, now=T0)) == ["a"]


async def test_a_grant_lets_events_in_until_it_expires(store: Store) -> None:
    grant = Consent("granted", T0, "banner", expires_at=T0 + 60)
    await store.set_consent("v", {"analytics": grant}, ttl=DAY, now=T0)
    retention = Retention(windows=(HOUR,))
    assert await store.record("v", [Recorded("view", T0, item="a")], retention=retention, now=T0, requires=OPT_IN)
    late = [Recorded("view", T0 + 60, item="b")]
    assert await store.record("v", late, retention=retention, now=T0 + 60, requires=OPT_IN) is None
    assert items(await store.profile("v", limit=10, now=T0 + 60)) == ["a"]


async def test_a_read_that_needs_consent_reads_nothing_else_without_it(store: Store) -> None:
    await remember(store, "v", "a", "b")
    personal = Requirement("personalization", default=False)
    for counters in (True, False):
        withheld = await store.profile("v", limit=10, now=T0, counters=counters, requires=personal)
        assert withheld == Profile(recent=[], counters={}, withheld=True)
    assert (await store.profile("v", limit=10, now=T0, requires=personal._replace(default=True))).recent != []
    choice = Consent("granted", T0, "banner")
    await store.set_consent("v", {"personalization": choice}, ttl=DAY, now=T0)
    allowed = await store.profile("v", limit=10, now=T0, requires=personal)
    assert (items(allowed), allowed.withheld, allowed.consent) == (["a", "b"], False, {"personalization": choice})
    revoked = Consent("revoked", T0 + 1, "settings")
    await store.set_consent("v", {"personalization": revoked}, ttl=DAY, now=T0 + 1)
    gone = await store.profile("v", limit=10, now=T0 + 1, requires=personal)
    assert (gone.recent, gone.counters, gone.last_seen, gone.withheld) == ([], {}, None, True)
    assert gone.consent == {"personalization": revoked}


async def test_an_unknown_visitor_is_withheld_only_under_opt_in(store: Store) -> None:
    assert (await store.profile("nobody", limit=5, now=T0, requires=OPT_IN)).withheld
    assert await store.profile("nobody", limit=5, now=T0, requires=OPT_OUT) == EMPTY_PROFILE


async def test_a_consent_change_is_announced_to_subscribers(store: Store) -> None:
    heard: list[str] = []
    store.subscribe(heard.append)
    if isinstance(store, RedisStore):
        await asyncio.wait_for(store.subscribed.wait(), 5)
    await store.set_consent("v", {"personalization": Consent("granted", T0, "banner")}, ttl=DAY, now=T0)
    await wait_until_async(lambda: heard, what="the announcement")
    assert heard == ["v"]
