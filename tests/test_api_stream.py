"""WS /v1/stream in process: tokens, the first list, pushes after events and swaps, refusals, slow sockets."""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gateway.api.push import TOO_SLOW, Hub
from gateway.app import create_app
from gateway.privacy import tokens
from gateway.settings import Settings
from tests.snapshots import republish
from tests.waiting import wait_until_async

SECRET = "test-secret"


def settings(root: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "secret": SECRET,
        "push_debounce_ms": 10,
        "event_log": "",
        "rules_dir": "",
        "catalog_file": "",
        "experiments_dir": "",
        "consent_mode": "opt-out",  # pushes here; consent and the stream: test_consent.py
    }
    return Settings(**{**values, **changes})


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(root))) as test_client:
        yield test_client


def token_for(visitor: str, ttl: float = 60, now: float | None = None) -> str:
    return tokens.mint(SECRET.encode(), visitor, ttl, now=now)


def ids(message: dict[str, Any]) -> list[str]:
    return [item["id"] for item in message["recommendations"]["items"]]


def click(client: TestClient, visitor: str, item: str) -> None:
    response = client.post("/v1/events", json={"events": [{"visitor": visitor, "item": item, "event": "click"}]})
    assert response.status_code == 202, response.text


def test_token_round_trip_and_tampering() -> None:
    token = token_for("visitor-a")
    assert tokens.verify(SECRET.encode(), token)[0] == "visitor-a"
    version, payload = token.split(".")
    sealed = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sealed[-20] ^= 1  # one bit of the sealed visitor id changed
    forged = f"{version}.{base64.urlsafe_b64encode(bytes(sealed)).rstrip(b'=').decode()}"
    with pytest.raises(tokens.TokenError, match="signature") as refused:
        tokens.verify(SECRET.encode(), forged)
    assert refused.value.code == "bad-token"
    with pytest.raises(tokens.TokenError) as other_key:
        tokens.verify(b"another secret", token)
    assert other_key.value.code == "bad-token"
    with pytest.raises(tokens.TokenError) as expired:
        tokens.verify(SECRET.encode(), token_for("visitor-a", ttl=10, now=time.time() - 20))
    assert expired.value.code == "expired-token"
    for garbage in ("", "v1.a.b", "v2.x.1.y", "v1.!!.notanumber.sig", "v2.!!", "v2.", "v2.AAAA", "v2.a.b"):
        with pytest.raises(tokens.TokenError):
            tokens.verify(SECRET.encode(), garbage)


def test_a_token_does_not_show_its_visitor() -> None:
    visitor = "user-42@shop.example"
    first, second = token_for(visitor), token_for(visitor)
    assert first != second  # a fresh nonce each time: two tokens of one visitor cannot be linked
    for token in (first, second):
        assert tokens.verify(SECRET.encode(), token)[0] == visitor
        readable = [token, *(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split("."))]
        for encoding in (visitor.encode(), base64.urlsafe_b64encode(visitor.encode()).rstrip(b"=")):
            assert not any(encoding in (text.encode() if isinstance(text, str) else text) for text in readable)


def test_a_v1_token_with_a_readable_visitor_is_refused() -> None:
    signed = "v1." + base64.urlsafe_b64encode(b"visitor-a").rstrip(b"=").decode() + f".{int(time.time()) + 60}"
    signature = base64.urlsafe_b64encode(hmac.digest(SECRET.encode(), signed.encode(), "sha256")).rstrip(b"=")
    with pytest.raises(tokens.TokenError, match="v1") as refused:
        tokens.verify(SECRET.encode(), f"{signed}.{signature.decode()}")
    assert refused.value.code == "bad-token"


def test_anonymous_token_names_a_fresh_visitor(client: TestClient) -> None:
    first, second = client.post("/v1/token").json(), client.post("/v1/token").json()
    assert first["visitor"] != second["visitor"]
    assert tokens.verify(SECRET.encode(), first["token"])[0] == first["visitor"]
    assert first["expires_at"] > time.time() + 3000


def test_connect_gets_the_list_then_a_push_after_each_event_that_changes_it(client: TestClient) -> None:
    grant = client.post("/v1/token").json()
    visitor = grant["visitor"]
    with client.websocket_connect(f"/v1/stream?token={grant['token']}&n=5") as ws:
        hello = ws.receive_json()
        assert (hello["type"], hello["cause"], hello["seq"]) == ("recommendations", "connect", 1)
        assert len(ids(hello)) == 5
        assert hello["recommendations"]["fallback"] == "cold-start"
        expected = client.get("/v1/recommend", params={"user": visitor, "n": 5}).json()
        assert ids(hello) == [item["id"] for item in expected["items"]]

        clicked = ids(hello)[0]
        click(client, visitor, clicked)
        pushed = ws.receive_json()
        assert (pushed["cause"], pushed["seq"]) == ("events", 2)
        assert clicked not in ids(pushed)
        assert pushed["recommendations"]["profile"] == "live"
        again = client.get("/v1/recommend", params={"user": visitor, "n": 5}).json()
        assert ids(pushed) == [item["id"] for item in again["items"]]


def test_a_reconnecting_client_gets_the_latest_list(client: TestClient) -> None:
    token = token_for("returning")
    with client.websocket_connect(f"/v1/stream?token={token}") as ws:
        first = ws.receive_json()
    for item in ids(first)[:2]:  # clicks while disconnected
        click(client, "returning", item)
    with client.websocket_connect(f"/v1/stream?token={token}") as ws:
        again = ws.receive_json()
    assert (again["cause"], again["seq"]) == ("connect", 1)
    assert again["recommendations"]["profile"] == "live"
    assert not set(ids(first)[:2]) & set(ids(again))
    current = client.get("/v1/recommend", params={"user": "returning"}).json()
    assert ids(again) == [item["id"] for item in current["items"]]


def test_a_visitor_never_receives_another_visitors_updates(client: TestClient) -> None:
    with (
        client.websocket_connect(f"/v1/stream?token={token_for('alice')}") as alice,
        client.websocket_connect(f"/v1/stream?token={token_for('bob')}") as bob,
    ):
        alice_first, bob_first = alice.receive_json(), bob.receive_json()
        click(client, "bob", ids(bob_first)[0])
        click(client, "alice", ids(alice_first)[1])
        # Alice's next message is the push for her own click, not one for Bob's.
        alice_next, bob_next = alice.receive_json(), bob.receive_json()
        assert alice_next["seq"] == bob_next["seq"] == 2
        assert ids(alice_first) == ids(bob_first)  # both started from the same popular list
        for name, message in (("alice", alice_next), ("bob", bob_next)):
            own = client.get("/v1/recommend", params={"user": name}).json()
            assert ids(message) == [item["id"] for item in own["items"]]
        assert ids(alice_next) != ids(bob_next)
        assert ids(alice_first)[1] not in ids(alice_next) and ids(bob_first)[0] not in ids(bob_next)


def test_a_burst_of_events_gives_one_push_and_a_swap_pushes_too(root: Path) -> None:
    with (
        TestClient(create_app(settings(root, push_debounce_ms=300))) as client,
        client.websocket_connect(f"/v1/stream?token={token_for('burst')}") as ws,
    ):
        first = ws.receive_json()
        for item in ids(first)[:3]:
            click(client, "burst", item)
        pushed = ws.receive_json()
        assert (pushed["cause"], pushed["seq"]) == ("events", 2)
        assert not set(ids(first)[:3]) & set(ids(pushed))
        republish(root)
        assert client.post("/admin/reload").json()["changed"] is True
        swapped = ws.receive_json()  # a second push for the burst would have come first
        assert (swapped["cause"], swapped["seq"]) == ("snapshot", 3)
        assert swapped["recommendations"]["snapshot"] != first["recommendations"]["snapshot"]


def test_quiet_socket_gets_heartbeats(root: Path) -> None:
    with (
        TestClient(create_app(settings(root, heartbeat_s=0.05))) as client,
        client.websocket_connect(f"/v1/stream?token={token_for('quiet')}") as ws,
    ):
        assert ws.receive_json()["cause"] == "connect"
        ping = ws.receive_json()
        assert ping["type"] == "ping" and abs(ping["ts"] - time.time()) < 5


@pytest.mark.parametrize(
    ("query", "code", "reason"),
    [
        ("token=nonsense", 4401, "bad-token"),
        ("token=" + tokens.mint(b"wrong secret", "x", 60), 4401, "bad-token"),
        ("token=" + tokens.mint(SECRET.encode(), "x", 10, now=time.time() - 60), 4401, "expired-token"),
        ("", 4400, "invalid-parameter"),
        # minted when the tests are collected, maybe minutes before this runs: valid for a day
        ("token=" + tokens.mint(SECRET.encode(), "x", 24 * 3600) + "&n=0", 4400, "invalid-parameter"),
        ("token=" + tokens.mint(SECRET.encode(), "x", 24 * 3600) + "&category=nope", 4400, "unknown-category"),
        ("token=" + tokens.mint(SECRET.encode(), "x", 24 * 3600) + "&colour=red", 4400, "unknown-parameter"),
    ],
)
def test_refusals_close_with_a_code_and_reason(client: TestClient, query: str, code: int, reason: str) -> None:
    with client.websocket_connect(f"/v1/stream?{query}") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    assert closed.value.code == code
    assert closed.value.reason.startswith(reason)


def test_no_snapshot_yet_closes_with_try_again_later(tmp_path: Path) -> None:
    with (
        TestClient(create_app(settings(tmp_path))) as client,
        client.websocket_connect(f"/v1/stream?token={token_for('early')}") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_json()
    assert closed.value.code == 1013


# -- the hub on its own: a slow socket is dropped, the others are not delayed ---------------------


class FakeSocket:
    """Enough of a Starlette WebSocket for the hub: sends can be held up, receive waits for close."""

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None
        self._gone = asyncio.Event()
        self.application_state = WebSocketState.CONNECTED

    async def send_text(self, text: str) -> None:
        if self.stuck:
            await asyncio.Event().wait()  # a client that stopped reading: the send never completes
        self.sent.append(text)

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason or "")
        self._gone.set()


@pytest.mark.anyio
async def test_a_slow_socket_is_dropped_without_delaying_the_others() -> None:
    version = 0

    async def answer(
        visitor: str, user: str, n: int | None, categories: list[str]
    ) -> tuple[object, bytes, frozenset[str]]:
        return version, b'{"items": [], "v": %d}' % version, frozenset()

    hub = Hub(answer, debounce_s=0, queue_size=3, heartbeat_s=60, max_streams=10)
    slow, fast = FakeSocket(stuck=True), FakeSocket()
    serving = [
        asyncio.create_task(hub.serve(slow, "slow", n=None, categories=[])),  # type: ignore[arg-type]
        asyncio.create_task(hub.serve(fast, "fast", n=None, categories=[])),  # type: ignore[arg-type]
    ]
    await wait_until_async(lambda: len(fast.sent) == 1, what="the connect message")
    for change in range(1, 6):
        version = change
        hub.changed("slow")
        hub.changed("fast")
        await wait_until_async(lambda: len(fast.sent) == 1 + change, what=f"change {change}")  # noqa: B023
    await wait_until_async(lambda: slow.closed is not None, what="the stuck socket to be dropped")
    assert slow.closed == (TOO_SLOW, "too-slow")
    assert "slow" not in hub and hub.open == 1
    assert len(fast.sent) == 6  # connect + five changes, none held up by the stuck one
    assert '"v": 5' in fast.sent[-1]
    await fast.close()
    await asyncio.wait_for(asyncio.gather(*serving), 5)
    assert hub.open == 0


@pytest.mark.anyio
async def test_streams_beyond_the_limit_are_refused() -> None:
    async def answer(
        visitor: str, user: str, n: int | None, categories: list[str]
    ) -> tuple[object, bytes, frozenset[str]]:
        return 0, b"{}", frozenset()

    hub = Hub(answer, debounce_s=0, queue_size=3, heartbeat_s=60, max_streams=1)
    first, second = FakeSocket(), FakeSocket()
    serving = asyncio.create_task(hub.serve(first, "a", n=None, categories=[]))  # type: ignore[arg-type]
    await wait_until_async(lambda: hub.open == 1, what="the first stream")
    await hub.serve(second, "b", n=None, categories=[])  # type: ignore[arg-type]
    assert second.closed is not None and second.closed[0] == 1013
    await first.close()
    await asyncio.wait_for(serving, 5)


def test_a_token_is_renewed_for_the_same_visitor_even_shortly_after_it_expired(client: TestClient) -> None:
    grant = client.post("/v1/token").json()
    renewed = client.post("/v1/token", json={"token": grant["token"]}).json()
    assert renewed["visitor"] == grant["visitor"]
    stale = token_for(grant["visitor"], ttl=10, now=time.time() - 300)  # expired five minutes ago
    assert client.post("/v1/token", json={"token": stale}).json()["visitor"] == grant["visitor"]
    old = token_for(grant["visitor"], ttl=10, now=time.time() - 3600)  # an hour ago: past token_renew_s
    response = client.post("/v1/token", json={"token": old})
    assert (response.status_code, response.json()["error"]["code"]) == (401, "expired-token")
    forged = tokens.mint(b"not our secret", grant["visitor"], 60)
    assert client.post("/v1/token", json={"token": forged}).json()["error"]["code"] == "bad-token"
    assert client.post("/v1/token", content=b"{not json").status_code == 400


def test_a_public_key_renews_an_expired_token_only_within_the_grace(root: Path) -> None:
    public = {"x-tailor-key": "pk_test_renewal"}
    keyed = settings(root, public_keys=["pk_test_renewal"], admin_keys=["ak_test_renewal"])
    assert keyed.token_renew_s <= 3600  # the default: a short grace, not the month it once was
    with TestClient(create_app(keyed)) as client:
        grace = keyed.token_renew_s
        within = token_for("visitor-r", ttl=10, now=time.time() - 10 - grace / 2)
        renewed = client.post("/v1/token", json={"token": within}, headers=public)
        assert (renewed.status_code, renewed.json()["visitor"]) == (200, "visitor-r")
        for days in (1, 29):
            past = token_for("visitor-r", ttl=10, now=time.time() - 10 - grace - days * 24 * 3600)
            refused = client.post("/v1/token", json={"token": past}, headers=public)
            assert (refused.status_code, refused.json()["error"]["code"]) == (401, "expired-token")


def test_cors_only_for_configured_origins(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        plain = client.get("/v1/popular", headers={"origin": "https://shop.example"})
        assert "access-control-allow-origin" not in plain.headers
    with TestClient(create_app(settings(root, cors_origins=["https://shop.example"]))) as client:
        allowed = client.get("/v1/popular", headers={"origin": "https://shop.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
        assert "x-request-id" in allowed.headers["access-control-expose-headers"]
        other = client.get("/v1/popular", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = client.options(
            "/v1/events",
            headers={"origin": "https://shop.example", "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 200
