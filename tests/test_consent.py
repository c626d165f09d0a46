"""Consent, pseudonyms and who may act for a visitor, through the gateway, on both stores.

The Redis runs use a real redis-server and look at what it holds afterwards, key by key."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis import Redis
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from gateway.app import create_app
from gateway.privacy import tokens
from gateway.settings import Settings
from gateway.store import Consent, MemoryStore
from gateway.store.log import FileLog
from tests.conftest import RedisServer

SECRET = "consent-test-secret"
PUBLIC, ADMIN = "pk_consent", "ak_consent"
RAW_ID = "alice@example.com"  # a raw id that must never reach the store, the log or the logs
BOTH = {"analytics": "granted", "personalization": "granted"}


class Backend:
    """A gateway on one store, and a way to see everything that store holds."""

    def __init__(self, client: TestClient, dump: Any) -> None:
        self.client = client
        self.dump = dump

    @property
    def gateway(self) -> Any:
        app: Any = self.client.app
        return app.state.gateway

    def pseudonym(self, visitor: str) -> str:
        return str(self.gateway.pseudonym(visitor))


def settings(root: Path, tmp_path: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "secret": SECRET,
        "event_log": str(tmp_path / "events"),
        "rules_dir": "",
        "catalog_file": "",
        "experiments_dir": "",
        "push_debounce_ms": 10,
    }
    return Settings(**{**values, **changes})


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, root: Path, tmp_path: Path) -> Iterator[Backend]:
    changes: dict[str, Any] = {}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()
        prefix = f"test:{uuid.uuid4().hex}:"
        changes["store"] = f"{server.url}?prefix={prefix}"
        raw: Any = Redis.from_url(server.url)  # redis-py's sync types are loose; what it returns is checked here

        def dump() -> bytes:
            """Every key of this test's prefix and every value in them, as one blob."""
            out = []
            for key in raw.scan_iter(match=f"{prefix}*"):
                out.append(key)
                kind = raw.type(key)
                if kind == b"list":
                    out.extend(raw.lrange(key, 0, -1))
                elif kind == b"hash":
                    out.extend(b"%s=%s" % pair for pair in raw.hgetall(key).items())
                elif kind == b"zset":
                    out.extend(raw.zrange(key, 0, -1))
                elif kind == b"stream":
                    out.extend(msgspec.json.encode(fields) for _, fields in raw.xrange(key))
            return b"\n".join(out)

        with TestClient(create_app(settings(root, tmp_path, **changes))) as client:
            yield Backend(client, dump)
        raw.close()
    else:
        logs = tmp_path / "events"
        store = MemoryStore(log=FileLog(logs), audit=FileLog(logs, prefix="consent"))
        with TestClient(create_app(settings(root, tmp_path), store=store)) as client:

            def dump() -> bytes:
                """Every visitor the store holds, with all their state, and its log files."""
                for log in (store._log, store._audit):
                    assert log is not None
                    client.portal.call(log.flush)  # type: ignore[union-attr]
                held = [
                    msgspec.json.encode([key, state.recent, [list(k) for k in state.counters], state.consent])
                    for key, state in store._visitors.items()
                ]
                return b"\n".join(held + [path.read_bytes() for path in sorted(logs.glob("*.jsonl"))])

            yield Backend(client, dump)


def view(client: TestClient, visitor: str, item: str = "i00003", **extra: Any) -> Any:
    return client.post("/v1/events", json={"visitor": visitor, "item": item, "event": "view", **extra})


def recommend(client: TestClient, **params: Any) -> Any:
    response = client.get("/v1/recommend", params={"n": 5, **params})
    assert response.status_code == 200, response.text
    return response.json()


def test_until_consent_events_are_only_counted_and_answers_say_they_are_not_personal(backend: Backend) -> None:
    client = backend.client
    answer = view(client, "v1").json()
    assert (answer["accepted"], answer["unconsented"]) == (0, 1)
    assert b"i00003" not in backend.dump()  # nothing of it stored, in the store or the event log
    body = recommend(client, visitor="v1")
    assert (body["fallback"], body["profile"]) == ("no-consent", "none")
    assert all(item["reasons"][-1] == "no-consent:personalization" for item in body["items"])
    metrics = client.get("/metrics").text
    assert 'tailor_events_unconsented_total{event="view"} 1.0' in metrics
    assert 'tailor_fallbacks_total{cause="no-consent"} 1.0' in metrics

    assert client.put("/v1/consent", json={"visitor": "v1", "choices": BOTH}).status_code == 200
    assert view(client, "v1").json()["accepted"] == 1
    assert b"i00003" in backend.dump()
    body = recommend(client, visitor="v1")
    assert (body["fallback"], body["profile"]) == (None, "live")
    assert "i00003" not in [item["id"] for item in body["items"]]  # seen: the profile was read


def test_personalization_and_analytics_are_separate_purposes(backend: Backend) -> None:
    client = backend.client
    client.put("/v1/consent", json={"visitor": "v2", "choices": {"analytics": "granted"}})
    assert view(client, "v2").json()["accepted"] == 1
    assert recommend(client, visitor="v2")["fallback"] == "no-consent"  # stored, but not used to personalise
    client.put("/v1/consent", json={"visitor": "v2", "choices": {"personalization": "granted"}})
    assert recommend(client, visitor="v2")["profile"] == "live"
    client.put("/v1/consent", json={"visitor": "v2", "choices": {"analytics": "revoked", "personalization": "denied"}})
    assert view(client, "v2", "i00004").json()["unconsented"] == 1
    assert b"i00004" not in backend.dump()  # a denied visitor's event: nowhere in the store or its log
    assert recommend(client, visitor="v2")["fallback"] == "no-consent"


def test_a_known_user_without_consent_gets_no_snapshot_vector_either(backend: Backend, small_shop: Path) -> None:
    client = backend.client
    user = next(iter(backend.gateway.recommender.snap.user_row))
    assert recommend(client, user=user)["fallback"] == "no-consent"
    client.put("/v1/consent", json={"visitor": user, "choices": {"personalization": "granted"}})
    assert recommend(client, user=user)["profile"] == "snapshot"


def test_expired_consent_counts_as_not_granted(backend: Backend) -> None:
    client = backend.client
    key = backend.pseudonym("v3")
    # recorded a minute ago, valid until a second ago (the API refuses an expiry in the past)
    lapsed = Consent("granted", time.time() - 60, "banner", expires_at=time.time() - 1)
    choices = {"analytics": lapsed, "personalization": lapsed}
    record = functools.partial(backend.gateway.store.set_consent, key, choices, ttl=3600.0, now=time.time())
    client.portal.call(record)  # type: ignore[union-attr]
    assert view(client, "v3").json()["unconsented"] == 1
    assert recommend(client, visitor="v3")["fallback"] == "no-consent"
    state = client.get("/v1/consent", params={"visitor": "v3"}).json()["purposes"]["analytics"]
    assert (state["state"], state["allowed"]) == ("granted", False)


def test_the_opt_out_model_allows_until_denied(root: Path, tmp_path: Path) -> None:
    with TestClient(create_app(settings(root, tmp_path, consent_mode="opt-out"))) as client:
        assert view(client, "v4").json()["accepted"] == 1
        assert recommend(client, visitor="v4")["profile"] == "live"
        client.put("/v1/consent", json={"visitor": "v4", "choices": {"personalization": "denied"}})
        assert recommend(client, visitor="v4")["fallback"] == "no-consent"
        shown = client.get("/v1/consent", params={"visitor": "v4"}).json()
        assert shown["mode"] == "opt-out"
        assert shown["purposes"]["analytics"] == {"allowed": True}  # no choice: the model's default
        assert shown["purposes"]["personalization"]["allowed"] is False


def test_raw_ids_never_reach_the_store_the_event_log_or_the_logs(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    client = backend.client
    client.put("/v1/consent", json={"visitor": RAW_ID, "choices": BOTH})
    assert view(client, RAW_ID, id="e-1").json()["accepted"] == 1
    assert recommend(client, visitor=RAW_ID)["profile"] == "live"
    export = client.get(f"/v1/visitors/{RAW_ID}/export").json()
    assert export["visitor"] == RAW_ID and export["pseudonym"] == backend.pseudonym(RAW_ID)
    assert [event["user_id"] for event in export["events"]] == [backend.pseudonym(RAW_ID)]
    assert set(export["consent"]) == {"analytics", "personalization"}
    client.delete(f"/v1/visitors/{RAW_ID}")
    held = backend.dump()
    assert RAW_ID.encode() not in held and b"alice" not in held
    assert RAW_ID not in caplog.text
    assert backend.pseudonym(RAW_ID) != backend.pseudonym("alice@example.org")
    assert len(backend.pseudonym(RAW_ID)) == 34


def test_the_visitor_sets_and_reads_their_consent_with_their_token(backend: Backend) -> None:
    client = backend.client
    grant = client.post("/v1/token").json()
    answer = client.put("/v1/consent", json={"token": grant["token"], "choices": {"personalization": "granted"}})
    assert answer.status_code == 200, answer.text
    shown = client.get("/v1/consent", headers={"x-tailor-token": grant["token"]}).json()
    assert shown["visitor"] == grant["visitor"]
    assert shown["purposes"]["personalization"]["source"] == "visitor"
    assert shown["purposes"]["personalization"]["allowed"] is True
    assert shown["purposes"]["analytics"] == {"allowed": False}
    expiring = {"token": grant["token"], "choices": {"analytics": "granted"}, "expires_at": time.time() + 3600}
    assert client.put("/v1/consent", json=expiring).json()["purposes"]["analytics"]["expires_at"] > time.time()
    late = {**expiring, "expires_at": time.time() - 1}
    assert client.put("/v1/consent", json=late).json()["error"]["field"] == "expires_at"
    forged = {"token": grant["token"], "choices": {"analytics": "granted"}, "source": "site"}
    assert client.put("/v1/consent", json=forged).status_code == 400  # a visitor cannot pose as the site


def test_every_change_is_in_the_audit_log(root: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    redis_server.start()
    prefix = f"test:{uuid.uuid4().hex}:"
    with TestClient(create_app(settings(root, tmp_path, store=f"{redis_server.url}?prefix={prefix}"))) as client:
        client.put("/v1/consent", json={"visitor": "v5", "choices": BOTH, "source": "crm"})
        client.put("/v1/consent", json={"visitor": "v5", "choices": {"analytics": "revoked"}})
        key = client.app.state.gateway.pseudonym("v5")  # type: ignore[attr-defined]
    raw: Any = Redis.from_url(redis_server.url)
    lines = [msgspec.json.decode(fields[b"e"]) for _, fields in raw.xrange(f"{prefix}consent-audit")]
    raw.close()
    assert [(line["visitor"], line["purpose"], line["state"], line["source"]) for line in lines] == [
        (key, "analytics", "granted", "crm"),
        (key, "personalization", "granted", "crm"),
        (key, "analytics", "revoked", "site"),
    ]


# -- who may act for whom, with API keys configured ------------------------------------------------


@pytest.fixture
def keyed(root: Path, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(settings(root, tmp_path, public_keys=[PUBLIC], admin_keys=[ADMIN]))
    with TestClient(app, headers={"x-tailor-key": PUBLIC}) as client:
        yield client


def token_of(client: TestClient) -> tuple[str, str]:
    grant = client.post("/v1/token").json()
    return grant["visitor"], grant["token"]


def test_a_token_reaches_only_its_own_visitor(keyed: TestClient) -> None:
    (a, token_a), (b, token_b) = token_of(keyed), token_of(keyed)
    for token in (token_a, token_b):
        assert keyed.put("/v1/consent", json={"token": token, "choices": BOTH}).status_code == 200
    assert (
        keyed.post("/v1/events", json={"events": [{"item": "i00007", "event": "view"}], "token": token_b}).json()[
            "accepted"
        ]
        == 1
    )
    # A reads B: refused, whichever way it names B
    refused = keyed.get("/v1/recommend", params={"visitor": b, "token": token_a})
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "not-your-visitor")
    assert keyed.get("/v1/recommend", params={"visitor": b}).json()["error"]["code"] == "token-required"
    assert keyed.get("/v1/consent", params={"visitor": b}).json()["error"]["code"] == "token-required"
    assert keyed.get("/v1/consent", params={"visitor": b, "token": token_a}).status_code == 403
    assert keyed.get(f"/v1/visitors/{b}/export").status_code == 403
    assert keyed.delete(f"/v1/visitors/{b}").status_code == 403
    # A writes as B: the event is rejected, B's profile unchanged
    batch = {"events": [{"visitor": b, "item": "i00009", "event": "view"}], "token": token_a}
    answer = keyed.post("/v1/events", json=batch)
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid-events")  # its only event
    assert "not-your-visitor" in answer.json()["error"]["problems"][0]
    assert keyed.post("/v1/events", json={"visitor": b, "item": "i00009", "event": "view"}).status_code == 401
    assert keyed.put("/v1/consent", json={"visitor": b, "choices": {"analytics": "denied"}}).status_code == 401
    assert keyed.post("/v1/token", json={"visitor": b}).status_code == 403  # only the site mints for an id
    own = keyed.get("/v1/recommend", params={"token": token_b}).json()
    assert own["profile"] == "live"
    assert "i00007" not in [item["id"] for item in own["items"]]
    export = keyed.get(f"/v1/visitors/{b}/export", headers={"x-tailor-key": ADMIN}).json()
    assert [event["item_id"] for event in export["events"]] == ["i00007"]  # nothing of A's attempts
    # The site's backend (admin key) may name any visitor.
    admin = {"x-tailor-key": ADMIN}
    assert keyed.get("/v1/recommend", params={"visitor": b}, headers=admin).json()["profile"] == "live"
    minted = keyed.post("/v1/token", json={"visitor": "user-42"}, headers=admin).json()
    assert minted["visitor"] == "user-42"
    assert tokens.verify(SECRET.encode(), minted["token"])[0] == "user-42"
    # A's stream is A's: B's events never reach it
    with keyed.websocket_connect(f"/v1/stream?token={token_a}&key={PUBLIC}") as ws:
        first = ws.receive_json()
        assert first["cause"] == "connect"
        keyed.post("/v1/events", json={"events": [{"item": "i00011", "event": "click"}], "token": token_b})
        keyed.post("/v1/events", json={"events": [{"item": "i00012", "event": "click"}], "token": token_a})
        pushed = ws.receive_json()
        assert pushed["cause"] == "events" and a != b


def test_the_stream_follows_consent_live(backend: Backend) -> None:
    client = backend.client
    visitor, token = token_of(client)
    with client.websocket_connect(f"/v1/stream?token={token}&n=5") as ws:
        hello = ws.receive_json()
        assert hello["recommendations"]["fallback"] == "no-consent"
        client.put("/v1/consent", json={"token": token, "choices": BOTH})
        granted = ws.receive_json()  # the change is pushed: now cold-start, no longer no-consent
        assert granted["recommendations"]["fallback"] == "cold-start"
        assert view(client, visitor, "i00005").json()["accepted"] == 1
        live = ws.receive_json()
        assert live["recommendations"]["profile"] == "live"
        client.put("/v1/consent", json={"token": token, "choices": {"personalization": "revoked"}})
        revoked = ws.receive_json()
        assert revoked["recommendations"]["fallback"] == "no-consent"
        client.delete(f"/v1/visitors/{visitor}")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4410
