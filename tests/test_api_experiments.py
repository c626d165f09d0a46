"""Experiments through the gateway: `/admin/experiments` versions and phases, arms applied to answers
and named in every item's reasons, exposures once per visitor per phase, conversions attributed
(a click via its request id, add-to-cart, purchase, revenue), the report, on the memory store and
across two nodes sharing a real Redis."""

from __future__ import annotations

import math
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from scipy import stats
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from gateway.store.ledger import Exposure, Ledger
from tests.apps import quiet_settings
from tests.conftest import RedisServer
from tests.waiting import wait_until

SECRET = "experiments"


def settings(root: Path, **changes: Any) -> Settings:
    return quiet_settings(root, SECRET, **changes)


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(root))) as test_client:
        yield test_client


def plan(*experiments: dict[str, Any]) -> dict[str, Any]:
    return {"experiments": list(experiments)}


AB = {"id": "ranker", "variants": [{"name": "A"}, {"name": "B"}], "min_sample": 10}


def put(client: TestClient, doc: dict[str, Any], *, activate: bool = True) -> dict[str, Any]:
    answer = client.put("/admin/experiments", params={"activate": str(activate).lower()}, json=doc)
    assert answer.status_code == 201, answer.text
    stored: dict[str, Any] = answer.json()
    return stored


def recommend(client: TestClient, visitor: str, **params: Any) -> dict[str, Any]:
    answer = client.get("/v1/recommend", params={"visitor": visitor, **params})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def arm_of(body: dict[str, Any], experiment: str = "ranker") -> str:
    found: list[str] = [reason for reason in body["experiments"] if reason.startswith(f"experiment:{experiment}@")]
    assert len(found) == 1, body["experiments"]
    return found[0].rsplit(":", 1)[1]


def report(client: TestClient, experiment: str = "ranker", **params: Any) -> dict[str, Any]:
    answer = client.get(f"/admin/experiments/{experiment}/report", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def exposures(body: dict[str, Any]) -> dict[str, int]:
    return {row["name"]: row["exposures"] for row in body["report"]["variants"]}


def estimate(body: dict[str, Any], arm: str, metric: str) -> float | None:
    row = next(row for row in body["report"]["variants"] if row["name"] == arm)
    value: float | None = next(e["value"] for e in row["estimates"] if e["metric"] == metric)
    return value


def test_an_invalid_plan_is_a_422_naming_experiment_and_field(client: TestClient) -> None:
    broken = {"id": "broken", "variants": [{"name": "A", "weight": -1}, {"name": "B"}]}
    answer = client.put("/admin/experiments", json=plan(AB, broken))
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert (error["code"], error["experiment"], error["field"]) == (
        "invalid-experiments",
        "broken",
        "experiments[1].variants[0].weight",
    )
    one_arm = {"id": "lonely", "variants": [{"name": "A"}]}
    assert client.put("/admin/experiments", json=plan(one_arm)).json()["error"]["experiment"] == "lonely"
    assert client.put("/admin/experiments", content=b"{not json").status_code == 422
    assert client.get("/admin/experiments").json()["versions"] == []


def test_an_arm_serving_a_rule_set_never_stored_is_refused(client: TestClient) -> None:
    arms = {"id": "rules-test", "variants": [{"name": "A"}, {"name": "B", "overrides": {"rules_version": 7}}]}
    answer = client.put("/admin/experiments", json=plan(arms))
    assert answer.status_code == 422
    assert answer.json()["error"]["experiment"] == "rules-test"
    assert "rule-set version 7" in answer.json()["error"]["message"]


def test_every_item_names_the_experiment_and_arm_and_assignment_is_sticky(root: Path) -> None:
    with TestClient(create_app(settings(root))) as node_a, TestClient(create_app(settings(root))) as node_b:
        put(node_a, plan(AB))
        put(node_b, plan(AB))
        seen: dict[str, str] = {}
        for k in range(40):
            body = recommend(node_a, f"v{k}")
            arm = arm_of(body)
            seen[f"v{k}"] = arm
            assert body["experiments"] == [f"experiment:ranker@1:{arm}"]
            assert body["items"]
            assert all(item["reasons"][-1] == f"experiment:ranker@1:{arm}" for item in body["items"])
        assert set(seen.values()) == {"A", "B"}
        for visitor, arm in seen.items():  # the same on every request and on another node
            assert arm_of(recommend(node_a, visitor)) == arm
            assert arm_of(recommend(node_b, visitor)) == arm
        assert "experiments" not in recommend(node_a, "v1", n=1)["items"][0]  # reasons, not a field per item
        assert node_a.get("/v1/recommend").json()["experiments"] == []  # nobody named: nobody assigned


def test_assignment_proportions_follow_the_weights(client: TestClient) -> None:
    weighted = {"id": "ranker", "variants": [{"name": "A", "weight": 3}, {"name": "B", "weight": 1}]}
    put(client, plan(weighted))
    counts = Counter(arm_of(recommend(client, f"w{k}", n=1)) for k in range(800))
    # A binomial test of the share of A against 3/4: a wrong split of a few points would fail it.
    assert stats.binomtest(counts["A"], 800, 0.75).pvalue > 0.001
    assert counts["A"] + counts["B"] == 800


def test_an_arm_serves_its_rule_set_version_and_another_popular_items(client: TestClient) -> None:
    items = client.get("/v1/popular", params={"n": 60}).json()["items"]
    pinned = items[50]["id"]
    rules = {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]}
    stored = client.put("/admin/rules", json=rules)  # stored, not active: only the arm serves it
    assert stored.status_code == 201
    version = stored.json()["version"]
    arms = {
        "id": "ranker",
        "variants": [
            {"name": "control"},
            {"name": "pinned", "overrides": {"rules_version": version}},
            {"name": "baseline", "overrides": {"settings": {"ranking": "popular"}}},
        ],
    }
    put(client, plan(arms))
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for k in range(60):
        client.post("/v1/events", json={"event": "view", "visitor": f"r{k}", "item": items[k % 7]["id"]})
        body = recommend(client, f"r{k}")
        by_arm.setdefault(arm_of(body), []).append(body)
    assert set(by_arm) == {"control", "pinned", "baseline"}
    for body in by_arm["pinned"]:
        assert body["items"][0]["id"] == pinned
        assert body["rules"] == [f"rule:hero@{version}"]
    for body in by_arm["control"]:
        assert body["rules"] == []
        assert body["profile"] == "live"
    for body in by_arm["baseline"]:
        assert (body["profile"], body["fallback"]) == ("none", None)
        assert all(item["reasons"][0].startswith("popular") for item in body["items"])


def test_exposures_are_counted_once_per_visitor_per_phase(client: TestClient) -> None:
    put(client, plan(AB))
    arms = {}
    for _ in range(3):
        for k in range(30):
            arms[f"x{k}"] = arm_of(recommend(client, f"x{k}"))
    first = report(client)
    assert first["phase"] == 1
    assert exposures(first) == dict(Counter(arms.values()))
    assert sum(exposures(first).values()) == 30
    # New weights: a new phase, a new draw, counted from zero; phase 1 stays readable.
    reweighted = {**AB, "variants": [{"name": "A", "weight": 1}, {"name": "B", "weight": 3}]}
    stored = put(client, plan(reweighted))
    assert stored["experiments"] == [{"id": "ranker", "phase": 2, "new_phase": True}]
    assert report(client)["phase"] == 2
    assert sum(exposures(report(client)).values()) == 0
    for k in range(10):
        assert recommend(client, f"x{k}")["experiments"][0].startswith("experiment:ranker@2:")
    assert sum(exposures(report(client)).values()) == 10
    earlier = report(client, phase=1)
    assert exposures(earlier) == exposures(first)
    # Read against phase 1's weights (1:1), not the current ones (1:3).
    assert [row["expected_share"] for row in earlier["report"]["variants"]] == [0.5, 0.5]
    assert [row["expected_share"] for row in report(client)["report"]["variants"]] == [0.25, 0.75]
    # A description changes nothing of the design: same phase, same arms.
    described = {**reweighted, "description": "B is the new ranker"}
    assert put(client, plan(described))["experiments"] == [{"id": "ranker", "phase": 2, "new_phase": False}]


def test_conversions_are_attributed_to_the_arm_that_served_the_visitor(client: TestClient) -> None:
    put(client, plan(AB))
    served = {f"c{k}": recommend(client, f"c{k}") for k in range(20)}
    arm = {visitor: arm_of(body) for visitor, body in served.items()}
    clicked = ["c0", "c1", "c2", "c3"]
    for visitor in clicked:
        body = served[visitor]
        item = body["items"][0]["id"]
        events = [
            {"event": "click", "visitor": visitor, "item": item, "request_id": body["request_id"]},
            {"event": "click", "visitor": visitor, "item": item, "request_id": body["request_id"]},  # twice: once
        ]
        assert client.post("/v1/events", json=events).status_code == 202
    # A click not on a recommendation (no request id) is not the `click` conversion.
    client.post("/v1/events", json={"event": "click", "visitor": "c4", "item": served["c4"]["items"][0]["id"]})
    revenue = {"c5": [10.0, 30.0], "c6": [25.0]}
    for visitor, values in revenue.items():
        item = served[visitor]["items"][0]["id"]
        client.post("/v1/events", json={"event": "add_to_cart", "visitor": visitor, "item": item})
        for value in values:
            client.post("/v1/events", json={"event": "purchase", "visitor": visitor, "item": item, "value": value})
    # Someone never served a recommendation converts: attributed to nothing.
    client.post("/v1/events", json={"event": "purchase", "visitor": "outsider", "item": "i00001", "value": 99.0})
    body = report(client)
    exposed = exposures(body)
    for name in ("A", "B"):
        members = [v for v, a in arm.items() if a == name]
        assert exposed[name] == len(members)
        clicks = sum(1 for v in clicked if arm[v] == name)
        assert estimate(body, name, "click") == pytest.approx(clicks / len(members))
        carts = sum(1 for v in revenue if arm[v] == name)
        assert estimate(body, name, "add_to_cart") == pytest.approx(carts / len(members))
        assert estimate(body, name, "purchase") == pytest.approx(carts / len(members))
        spent = sum(sum(values) for v, values in revenue.items() if arm[v] == name)
        assert estimate(body, name, "revenue_per_visitor") == pytest.approx(spent / len(members))
    metrics = {(c["metric"], c["test"]) for c in body["report"]["comparisons"]}
    assert metrics == {
        ("click", "chi2"),
        ("add_to_cart", "chi2"),
        ("purchase", "chi2"),
        ("revenue_per_visitor", "welch"),
    }
    assert all(c["p_adjusted"] is None or c["p_adjusted"] >= c["p_value"] for c in body["report"]["comparisons"])
    assert any("minimum sample" in note for note in body["report"]["notes"])


def test_an_injected_uplift_is_detected_after_holm(client: TestClient) -> None:
    put(client, plan({**AB, "min_sample": 100}))
    arm = {f"u{k}": arm_of(recommend(client, f"u{k}", n=1)) for k in range(600)}
    # B's visitors buy three times as often: the report must say so, after Holm.
    for k, (visitor, name) in enumerate(arm.items()):
        if k % (4 if name == "B" else 12) == 0:
            client.post("/v1/events", json={"event": "purchase", "visitor": visitor, "item": "i00001", "value": 20})
    body = report(client)
    purchase = next(c for c in body["report"]["comparisons"] if c["metric"] == "purchase")
    assert purchase["significant"] and purchase["difference"] > 0
    assert not body["report"]["srm"]["flagged"]


def test_a_split_broken_by_lost_exposures_is_flagged(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # A deliberately broken pipeline: a third of arm B's exposures never reach the ledger.
    ledger: Ledger = client.app.state.gateway.experiments.ledger  # type: ignore[attr-defined]
    expose = ledger.expose

    async def lossy(batch: Sequence[Exposure], *, ttl: float) -> list[bool]:
        kept = [e for e in batch if not (e.arm == "B" and zlib.crc32(e.visitor.encode()) % 3 == 0)]
        return await expose(kept, ttl=ttl)

    monkeypatch.setattr(ledger, "expose", lossy)
    put(client, plan(AB))
    for k in range(600):
        recommend(client, f"s{k}", n=1)
    body = report(client)
    assert body["report"]["srm"]["flagged"]
    assert body["report"]["srm"]["p_value"] < 0.001
    assert any("sample ratio mismatch" in note for note in body["report"]["notes"])


def test_a_stopped_experiment_serves_the_default_and_keeps_its_report(client: TestClient) -> None:
    put(client, plan(AB))
    recommend(client, "s1")
    assert client.post("/admin/experiments/ranker/stop").status_code == 200
    overview = client.get("/admin/experiments").json()
    assert [(e["id"], e["status"], e["phase"]) for e in overview["experiments"]] == [("ranker", "stopped", 1)]
    body = recommend(client, "s1")
    assert body["experiments"] == []
    assert not any(r.startswith("experiment:") for item in body["items"] for r in item["reasons"])
    assert sum(exposures(report(client)).values()) == 1
    assert client.post("/admin/experiments/ranker/start").status_code == 200
    assert recommend(client, "s1")["experiments"][0].startswith("experiment:ranker@1:")
    assert client.post("/admin/experiments/nope/stop").status_code == 404
    assert client.get("/admin/experiments/nope/report").status_code == 404
    assert client.get("/admin/experiments/ranker/report", params={"phase": 9}).status_code == 404
    assert client.get("/admin/experiments/ranker/report", params={"alpha": 2}).status_code == 400


def test_versions_rollback_and_deactivate(client: TestClient) -> None:
    put(client, plan(AB))
    other = {"id": "banner", "variants": [{"name": "off"}, {"name": "on"}]}
    put(client, plan(other))
    assert arm_of(recommend(client, "r1"), "banner") in {"off", "on"}
    rolled = client.post("/admin/experiments/rollback").json()
    assert (rolled["active"], [e["id"] for e in rolled["experiments"]]) == (1, ["ranker"])
    assert client.get("/admin/experiments/versions/2").json()["experiments"][0]["id"] == "banner"
    assert client.get("/admin/experiments/versions/9").status_code == 404
    assert client.post("/admin/experiments/versions/2/activate").json()["active"] == 2
    assert client.post("/admin/experiments/deactivate").json()["experiments"] == []
    assert recommend(client, "r1")["experiments"] == []


def test_without_analytics_consent_nothing_is_counted(root: Path) -> None:
    with TestClient(create_app(settings(root, consent_mode="opt-in"))) as client:
        put(client, plan(AB))
        body = recommend(client, "quiet")
        assert body["fallback"] == "no-consent"
        assert body["experiments"]  # the arm is computed, not stored
        assert sum(exposures(report(client)).values()) == 0
        client.put("/v1/consent", json={"visitor": "quiet", "choices": {"analytics": "granted"}})
        recommend(client, "quiet")
        assert sum(exposures(report(client)).values()) == 1


def test_erasure_removes_the_visitors_arms_and_export_shows_them(client: TestClient) -> None:
    put(client, plan(AB))
    arm = arm_of(recommend(client, "gone"))
    report(client)  # writes the exposure
    exported = client.get("/v1/visitors/gone/export").json()
    assert exported["experiments"] == {"ranker@1": arm}
    assert client.delete("/v1/visitors/gone").status_code == 200
    assert client.get("/v1/visitors/gone/export").json()["experiments"] == {}
    assert sum(exposures(report(client)).values()) == 1  # the anonymous total stays


def test_two_nodes_share_the_plan_and_count_a_visitor_once(root: Path, redis_server: RedisServer) -> None:
    redis_server.start()
    store = f"{redis_server.url}?prefix=exp-{uuid.uuid4().hex[:8]}:"
    # A read that times out serves popular items and counts no exposure: on a busy test machine the
    # default 50 ms could drop one of the 20 this test counts.
    slow_ok = settings(root, store=store, store_timeout_ms=2000)
    with TestClient(create_app(slow_ok)) as node_a, TestClient(create_app(slow_ok)) as node_b:
        put(node_a, plan(AB))
        wait_until(lambda: node_b.get("/admin/experiments").json()["serving"] == 1, what="node B to run version 1")
        for k in range(20):
            assert arm_of(recommend(node_a, f"n{k}")) == arm_of(recommend(node_b, f"n{k}"))
        body_b = recommend(node_b, "n0")
        node_b.post(
            "/v1/events",
            json={
                "event": "click",
                "visitor": "n0",
                "item": body_b["items"][0]["id"],
                "request_id": body_b["request_id"],
            },
        )
        report(node_b)  # node B's queue written
        counted = report(node_a)
        assert sum(exposures(counted).values()) == 20
        clicks = [estimate(counted, name, "click") for name in ("A", "B")]
        members = exposures(counted)[arm_of(body_b)]
        assert estimate(counted, arm_of(body_b), "click") == pytest.approx(1 / members)
        assert sum(1 for c in clicks if c and not math.isclose(c, 0)) == 1


def test_a_click_of_an_earlier_snippet_carries_its_request_id_in_query(client: TestClient) -> None:
    put(client, plan(AB))
    body = recommend(client, "old-snippet")
    item = body["items"][0]["id"]
    legacy = {"event": "click", "visitor": "old-snippet", "item": item, "query": "rec:" + body["request_id"]}
    assert client.post("/v1/events", json=legacy).status_code == 202
    assert estimate(report(client), arm_of(body), "click") == 1.0
