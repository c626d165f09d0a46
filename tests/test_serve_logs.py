"""`tailor serve`'s log, at its most verbose, on a real socket: no API key, visitor token or raw
visitor id in any line, whether they came in a query string, a header or a path."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import httpx2 as httpx
import pytest
from websockets.sync.client import connect as ws_connect

from gateway.privacy import tokens
from tests.test_gateway_live import Server

PUBLIC, ADMIN, SECRET = "pk_logtest_public_0123456789", "ak_logtest_admin_9876543210", "log-test-secret-abcdef"
VISITOR = "alice@shop.example"


@pytest.mark.parametrize("level", ["debug", "trace"])
def test_no_key_token_or_visitor_id_reaches_the_log(
    level: str, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAILOR_SECRET", SECRET)
    monkeypatch.setenv("TAILOR_PUBLIC_KEYS", json.dumps([PUBLIC]))
    monkeypatch.setenv("TAILOR_ADMIN_KEYS", json.dumps([ADMIN]))
    monkeypatch.setenv("TAILOR_CONSENT_MODE", "opt-out")
    log = tmp_path / "gateway.log"
    server = Server(root, log, "--log-level", level, "--access-log")
    token = tokens.mint(SECRET.encode(), VISITOR, 600)
    try:
        ws = f"ws://127.0.0.1:{server.port}/v1/stream"
        with ws_connect(f"{ws}?token={token}&key={PUBLIC}&n=3", open_timeout=10) as socket:
            assert json.loads(socket.recv(timeout=10))["cause"] == "connect"
        with ws_connect(f"{ws}?token={token}", additional_headers={"X-Tailor-Key": PUBLIC}, open_timeout=10) as socket:
            assert json.loads(socket.recv(timeout=10))["cause"] == "connect"
        anonymous = httpx.post(f"{server.url}/v1/token", params={"key": PUBLIC}).json()
        renewed = httpx.post(
            f"{server.url}/v1/token", headers={"X-Tailor-Key": PUBLIC}, json={"token": anonymous["token"]}
        )
        assert renewed.status_code == 200
        calls = [
            ("/v1/recommend", {"user": VISITOR, "key": ADMIN}, {}),
            ("/v1/recommend", {"token": token}, {"Authorization": f"Bearer {PUBLIC}"}),
            ("/v1/recommend", {}, {"X-Tailor-Token": token, "X-Tailor-Key": PUBLIC}),
            (f"/v1/visitors/{quote(VISITOR)}/export", {}, {"X-Tailor-Key": ADMIN}),
            ("/metrics", {"key": ADMIN}, {}),
        ]
        for path, params, headers in calls:
            assert httpx.get(f"{server.url}{path}", params=params, headers=headers).status_code == 200
    finally:
        server.stop()
    text = log.read_text()
    # The requests were logged, only without what identifies anyone.
    assert '"WebSocket /v1/stream?token=' in text
    assert "GET /v1/visitors/" in text
    assert "GET /metrics?key=" in text
    secrets = {
        "public key": PUBLIC,
        "admin key": ADMIN,
        "secret": SECRET,
        "token": token,
        "anonymous token": anonymous["token"],
        "renewed token": renewed.json()["token"],
        "visitor": VISITOR,
        "visitor, URL-encoded": quote(VISITOR),
        "anonymous visitor": anonymous["visitor"],
        **{f"token part {i}": part for i, part in enumerate(token.split(".")) if len(part) > 8},
    }
    found = {name: text.count(value) for name, value in secrets.items() if value in text}
    assert not found, f"in the {level} log: {found}"
