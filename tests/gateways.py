"""Helpers of the gateway's HTTP tests (test_gateway.py, test_gateway_faults.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from gateway.settings import Settings


def pseudonym(client: TestClient, visitor: str) -> str:
    """What the gateway stores a visitor under."""
    app: Any = client.app
    return str(app.state.gateway.pseudonym(visitor))


def settings(root: Path, **changes: Any) -> Settings:
    """Ranking, events and faults, with every visitor counting as consenting (opt-out, no choice
    made): consent itself is test_consent.py's."""
    values = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "event_log": "",
        "secret": "gw",
        "consent_mode": "opt-out",
        "rules_dir": "",
        "catalog_file": "",
        "experiments_dir": "",
    }
    return Settings(**{**values, **changes})


def ids(body: dict[str, Any]) -> list[str]:
    return [item["id"] for item in body["items"]]


def post_events(client: TestClient, visitor: str, events: Sequence[tuple[str, str]]) -> None:
    batch = [
        {"visitor": visitor, "item": item, "event": event, "ts": 1_700_000_000 + i}
        for i, (item, event) in enumerate(events)
    ]
    response = client.post("/v1/events", json={"events": batch})
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": len(events), "duplicates": 0, "rejected": [], "unconsented": 0}
