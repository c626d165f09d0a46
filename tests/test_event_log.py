"""Captured behaviour feeds the next rebuild: the gateway's event log is `tailor build --event-log` input."""

from __future__ import annotations

import csv
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.privacy import keys as privacy
from gateway.settings import Settings
from index_builder import snapshot
from tailor.cli import main
from tests.conftest import RedisServer
from tests.snapshots import current_dir


def shop_events(shop: Path) -> list[dict[str, Any]]:
    """The synthetic shop's history, as a site would send it to POST /v1/events."""
    with (shop / "events.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    events = []
    for row in rows:
        event = {"user": row["user_id"], "item": row["item_id"], "event": row["event"], "ts": row["timestamp"]}
        event.update(id=row["event_id"], query=row["query"])
        events.append({key: value for key, value in event.items() if value})
    return events


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_event_log_rebuilds_the_same_model_as_the_original_history(
    backend: str,
    *,
    small_snapshots: Path,
    small_shop: Path,
    root: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    common: dict[str, Any] = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "secret": "log",
        "consent_mode": "opt-out",
        "rules_dir": "",
        "catalog_file": "",
        "experiments_dir": "",
    }
    if backend == "memory":
        settings = Settings(**common, event_log=str(tmp_path / "events"))
        source = str(tmp_path / "events")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()
        prefix = f"test:{uuid.uuid4().hex}:"
        settings = Settings(**common, store=f"{server.url}?prefix={prefix}")
        source = f"{server.url}?prefix={prefix}"
    events = shop_events(small_shop)
    with TestClient(create_app(settings)) as client:
        accepted = 0
        for start in range(0, len(events), 500):
            response = client.post("/v1/events", json=events[start : start + 500])
            assert response.status_code == 202, response.text
            assert response.json()["rejected"] == []
            accepted += response.json()["accepted"]
        assert accepted == len(events)
        # a client retrying a batch adds nothing to the log either
        assert client.post("/v1/events", json=events[:500]).json()["duplicates"] == 500

    out = tmp_path / "rebuilt"
    build = ["build", "--event-log", source, "--items", str(small_shop / "items.jsonl"), "--out", str(out)]
    assert main([*build, "--quiet", "--max-trials", "2"]) == 0
    original, rebuilt = current_dir(small_snapshots), current_dir(out)
    # The same history: the same users (by pseudonym: the log never held a raw id) and items, the
    # same interactions counted (the log's order within a batch is per visitor, so rows may be
    # numbered differently).
    pseudonym = privacy.Pseudonyms(privacy.keys(settings)[1])
    users = [msgspec.json.decode((directory / "users.json").read_bytes()) for directory in (original, rebuilt)]
    assert sorted(pseudonym(user) for user in users[0]) == sorted(users[1])
    assert not set(users[0]) & set(users[1])
    items = [msgspec.json.decode((directory / "items.json").read_bytes()) for directory in (original, rebuilt)]
    assert sorted(map(repr, items[0])) == sorted(map(repr, items[1]))
    counts = [snapshot.load_manifest(directory).counts for directory in (original, rebuilt)]
    assert counts[0] == counts[1]
    assert counts[1]["duplicates"] == 0 and counts[1]["rejected"] == 0


def test_build_refuses_an_event_log_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["build", "--event-log", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "no events-*.jsonl" in capsys.readouterr().err
    assert main(["build", "--event-log", "redis://127.0.0.1:1/0", "--out", str(tmp_path / "out")]) == 1
    assert main(["build", "--out", str(tmp_path / "out")]) == 2
    assert "--events FILE or --event-log" in capsys.readouterr().err
