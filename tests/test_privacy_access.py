"""API keys with scopes and per-client rate limits, over HTTP and on the WebSocket."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from gateway.app import create_app
from gateway.privacy import tokens
from gateway.privacy.access import Access, AccessError
from gateway.settings import Settings

PUBLIC, ADMIN = "pk_public_123", "ak_admin_456"


def app_with(root: Path, **changes: Any) -> TestClient:
    base: dict[str, Any] = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "secret": "s",
        "event_log": "",
        "rules_dir": "",
        "catalog_file": "",
        "experiments_dir": "",
    }
    return TestClient(create_app(Settings(**{**base, **changes})))


@pytest.fixture
def keyed(root: Path) -> Any:
    with app_with(root, public_keys=[PUBLIC], admin_keys=[ADMIN]) as client:
        yield client


def error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_without_keys_every_route_is_open(root: Path) -> None:
    with app_with(root) as client:
        assert client.get("/v1/popular").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_public_routes_need_a_known_key_in_a_header_or_the_query(keyed: TestClient) -> None:
    assert error(keyed.get("/v1/popular")) == (401, "unauthorized")
    assert keyed.get("/v1/popular").headers["www-authenticate"].startswith("Bearer")
    assert error(keyed.get("/v1/popular", headers={"x-tailor-key": "pk_wrong"})) == (401, "unauthorized")
    assert keyed.get("/v1/popular", headers={"x-tailor-key": PUBLIC}).status_code == 200
    assert keyed.get("/v1/popular", headers={"authorization": f"Bearer {PUBLIC}"}).status_code == 200
    assert keyed.get("/v1/popular", params={"key": PUBLIC, "n": 3}).status_code == 200  # not an unknown parameter
    assert keyed.get("/v1/popular", headers={"x-tailor-key": ADMIN}).status_code == 200  # admin may do all
    token = keyed.post("/v1/token", params={"key": PUBLIC}).json()["token"]
    batch = {"events": [{"item": "i00001", "event": "view"}], "token": token}
    assert keyed.post("/v1/events", params={"key": PUBLIC}, json=batch).status_code == 202  # sendBeacon's way


def test_admin_routes_refuse_public_keys(keyed: TestClient) -> None:
    assert error(keyed.post("/admin/reload", headers={"x-tailor-key": PUBLIC})) == (403, "forbidden")
    assert error(keyed.get("/metrics", headers={"x-tailor-key": PUBLIC})) == (403, "forbidden")
    assert error(keyed.post("/admin/reload")) == (401, "unauthorized")
    assert keyed.post("/admin/reload", headers={"x-tailor-key": ADMIN}).status_code == 200
    assert keyed.get("/metrics", headers={"x-tailor-key": ADMIN}).status_code == 200


def test_open_routes_stay_open(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/demo", "/demo/catalog.json"):
        assert keyed.get(path).status_code == 200, path


def test_the_stream_needs_a_key_too(keyed: TestClient) -> None:
    token = tokens.mint(b"s", "v", 60)
    for query, code in ((f"token={token}", 4401), (f"token={token}&key=pk_wrong", 4401)):
        with keyed.websocket_connect(f"/v1/stream?{query}") as ws, pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert (closed.value.code, closed.value.reason) == (code, "unauthorized")
    with keyed.websocket_connect(f"/v1/stream?token={token}&key={PUBLIC}") as ws:
        assert ws.receive_json()["cause"] == "connect"


def test_a_client_over_its_rate_gets_429_with_retry_after_and_others_do_not(root: Path) -> None:
    with app_with(root, public_keys=[PUBLIC, "pk_other"], rate_limit_per_s=0.5, rate_limit_burst=3) as client:
        answers = [client.get("/v1/popular", headers={"x-tailor-key": PUBLIC}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[-1].json()["error"]["code"] == "rate-limited"
        assert int(answers[-1].headers["retry-after"]) >= 1
        assert client.get("/v1/popular", headers={"x-tailor-key": "pk_other"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # open routes are not counted


def test_buckets_refill_with_time_and_stay_bounded() -> None:
    access = Access(rate_per_s=2.0, burst=2, max_clients=3)
    access.take("a", 0.0)
    access.take("a", 0.0)
    with pytest.raises(AccessError) as limited:
        access.take("a", 0.1)
    assert limited.value.headers["retry-after"] == "1"
    access.take("a", 0.6)  # 0.5 s later: one more request's worth
    for client in "bcdef":
        access.take(client, 1.0)
    assert len(access._buckets) == 3  # the least recently seen clients were forgotten


def test_key_comparison_does_not_stop_at_the_first_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared whatever matches, so timing does not tell which one did."""
    compared: list[bytes] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # the module gateway.privacy.access calls
    Access(public_keys=["k1", "k2", "k3"]).check("public", "k1")
    assert compared == [b"k1", b"k2", b"k3"]
