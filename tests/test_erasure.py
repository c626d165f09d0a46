"""Erasure and export of one visitor's data, on both stores; on Redis a scan finds nothing left."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from gateway.app import create_app
from gateway.privacy import tokens
from gateway.settings import Settings
from tests.conftest import RedisServer

VICTIM, BYSTANDER = "visitor-to-erase", "visitor-who-stays"


@pytest.fixture(params=["memory", "redis"])
def setup(request: pytest.FixtureRequest, root: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    changes: dict[str, Any] = {"event_log": str(tmp_path / "events")}
    raw: Any = tmp_path / "events"
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()
        prefix = f"test:{uuid.uuid4().hex}:"
        changes["store"] = f"{server.url}?prefix={prefix}"
        raw = (Redis.from_url(server.url), prefix)
    settings = Settings(
        snapshots=str(root),
        watch_interval_s=0,
        secret="erase",
        consent_mode="opt-out",
        rules_dir="",
        catalog_file="",
        experiments_dir="",
        **changes,
    )
    with TestClient(create_app(settings)) as client:
        yield client, raw


def events_of(visitor: str, count: int) -> list[dict[str, Any]]:
    return [
        {"visitor": visitor, "item": f"i{number:05d}", "event": "view", "id": f"{visitor}-{number}"}
        for number in range(1, count + 1)
    ]


def test_erasure_removes_everything_about_the_visitor_and_only_them(setup: tuple[TestClient, Any]) -> None:
    client, raw = setup
    assert client.post("/v1/events", json=events_of(VICTIM, 5) + events_of(BYSTANDER, 3)).json()["accepted"] == 8
    exported = client.get(f"/v1/visitors/{VICTIM}/export").json()
    assert [i["item"] for i in exported["recent"]] == [f"i{n:05d}" for n in range(1, 6)]
    assert exported["counters"]["view/1h"] == 5
    assert [e["event_id"] for e in exported["events"]] == [f"{VICTIM}-{n}" for n in range(1, 6)]
    assert exported["last_seen"] is not None

    with client.websocket_connect(f"/v1/stream?token={tokens.mint(b'erase', VICTIM, 60)}") as ws:
        assert ws.receive_json()["cause"] == "connect"
        receipt = client.delete(f"/v1/visitors/{VICTIM}").json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4410
    assert (receipt["visitor"], receipt["profile"], receipt["log_events"], receipt["streams_closed"]) == (
        VICTIM,
        True,
        5,
        1,
    )
    assert len(receipt["receipt"]) == 32 and abs(receipt["erased_at"] - time.time()) < 60

    gone = client.get(f"/v1/visitors/{VICTIM}/export").json()
    assert (gone["recent"], gone["counters"], gone["last_seen"], gone["events"]) == ([], {}, None, [])
    assert client.get("/v1/recommend", params={"visitor": VICTIM}).json()["fallback"] == "cold-start"
    # A retried event after the erasure is new again: the ids went too.
    assert client.post("/v1/events", json=events_of(VICTIM, 1)).json()["accepted"] == 1
    assert client.delete(f"/v1/visitors/{VICTIM}").json()["log_events"] == 1

    stays = client.get(f"/v1/visitors/{BYSTANDER}/export").json()
    assert len(stays["recent"]) == 3 and len(stays["events"]) == 3

    if isinstance(raw, tuple):  # Redis: nothing anywhere mentions the visitor
        redis, prefix = raw
        keys = [key.decode() for key in redis.scan_iter(f"{prefix}*")]
        assert not [key for key in keys if VICTIM in key]
        for key in keys:
            kind = redis.type(key).decode()
            contents: Any = {
                "list": lambda k: redis.lrange(k, 0, -1),
                "hash": redis.hgetall,
                "zset": lambda k: redis.zrange(k, 0, -1),
                "stream": redis.xrange,
            }[kind](key)
            assert VICTIM.encode() not in repr(contents).encode(), key
    else:  # the event log files
        text = b"".join(path.read_bytes() for path in Path(raw).glob("events-*.jsonl"))
        assert VICTIM.encode() not in text and BYSTANDER.encode() in text


def test_erasing_an_unknown_visitor_is_a_receipt_of_nothing(setup: tuple[TestClient, Any]) -> None:
    client, _ = setup
    receipt = client.delete("/v1/visitors/never-seen").json()
    assert (receipt["profile"], receipt["log_events"], receipt["streams_closed"]) == (False, 0, 0)
