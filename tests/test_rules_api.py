"""`/admin/rules` through the gateway: versions, activation on every node, rollback, runtime flags,
validity, preview, reasons and hit counters in answers, on the memory store and a real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import Settings
from tests.apps import quiet_settings
from tests.conftest import RedisServer
from tests.snapshots import republish

SECRET = "rules"


def settings(root: Path, **changes: Any) -> Settings:
    return quiet_settings(root, SECRET, **changes)


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(root))) as test_client:
        yield test_client


def catalog(client: TestClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get("/v1/popular", params={"n": 100}).json()["items"]
    return items


def put(client: TestClient, doc: dict[str, Any], *, activate: bool = True) -> dict[str, Any]:
    answer = client.put("/admin/rules", params={"activate": str(activate).lower()}, json=doc)
    assert answer.status_code == 201, answer.text
    stored: dict[str, Any] = answer.json()
    return stored


def top(item: dict[str, Any]) -> str:
    return str(item["categories"][0].split("/")[0])


def test_an_invalid_rule_set_is_a_422_naming_rule_and_field(client: TestClient) -> None:
    doc = {
        "rules": [
            {"id": "ok", "actions": [{"type": "cap", "per_category": 1}]},
            {"id": "broken", "actions": [{"type": "pin", "item": "x", "position": 0}]},
        ]
    }
    answer = client.put("/admin/rules", json=doc)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert (error["code"], error["rule"], error["field"]) == ("invalid-rules", "broken", "rules[1].actions[0].position")
    assert client.get("/admin/rules").json()["versions"] == []


def test_a_pin_of_an_unknown_item_is_refused_before_it_is_stored(client: TestClient) -> None:
    doc = {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": "no-such-item", "position": 1}]}]}
    answer = client.put("/admin/rules", json=doc)
    assert answer.status_code == 422
    assert answer.json()["error"]["rule"] == "hero"
    assert client.get("/admin/rules").json()["versions"] == []


def test_a_stored_version_serves_only_once_activated(client: TestClient) -> None:
    items = catalog(client)
    pinned = items[40]["id"]
    doc = {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]}
    stored = put(client, doc, activate=False)
    assert stored["version"] == 1 and stored["active"] is False
    assert client.get("/v1/recommend", params={"visitor": "v1"}).json()["items"][0]["id"] != pinned
    overview = client.post("/admin/rules/1/activate").json()
    assert overview["active"] == overview["serving"] == 1
    body = client.get("/v1/recommend", params={"visitor": "v1"}).json()
    assert body["items"][0]["id"] == pinned
    assert body["items"][0]["reasons"] == ["rule:hero@1"]
    assert body["rules"] == ["rule:hero@1"]
    assert client.get("/admin/rules/1").json() == doc


def test_rollback_serves_the_previously_active_version(client: TestClient) -> None:
    items = catalog(client)
    first, second = items[40]["id"], items[41]["id"]
    put(client, {"rules": [{"id": "a", "actions": [{"type": "pin", "item": first, "position": 1}]}]})
    put(client, {"rules": [{"id": "b", "actions": [{"type": "pin", "item": second, "position": 1}]}]})
    assert client.get("/v1/popular").json()["items"][0]["id"] == second
    overview = client.post("/admin/rules/rollback").json()
    assert overview["active"] == 1
    assert client.get("/v1/popular").json()["items"][0]["id"] == first
    history = client.get("/admin/rules").json()
    assert [v["version"] for v in history["versions"]] == [1, 2]
    assert [a["version"] for a in history["activations"]] == [1, 2, 1]


def test_rollback_without_history_is_a_409(client: TestClient) -> None:
    answer = client.post("/admin/rules/rollback")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "nothing-to-roll-back"


def test_deactivate_serves_no_rules(client: TestClient) -> None:
    pinned = catalog(client)[40]["id"]
    put(client, {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]})
    assert client.post("/admin/rules/deactivate").json()["active"] is None
    assert client.get("/v1/popular").json()["items"][0]["id"] != pinned


def test_a_flag_switches_a_rule_off_and_back_at_runtime(client: TestClient) -> None:
    pinned = catalog(client)[40]["id"]
    put(client, {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]})
    assert client.put("/admin/rules/flags/hero", json={"enabled": False}).json()["flags"] == {"hero": False}
    assert client.get("/v1/popular").json()["items"][0]["id"] != pinned
    assert client.put("/admin/rules/flags/hero", json={"enabled": None}).json()["flags"] == {}
    assert client.get("/v1/popular").json()["items"][0]["id"] == pinned
    assert client.put("/admin/rules/flags/hero", json={"enabled": "yes"}).status_code == 400


def test_filters_hold_in_personal_answers_and_in_fallbacks(client: TestClient) -> None:
    banned = top(catalog(client)[0])
    put(client, {"rules": [{"id": "no-" + banned, "actions": [{"type": "filter", "items": {"categories": [banned]}}]}]})
    visitor = f"v-{uuid.uuid4().hex[:8]}"
    cold = client.get("/v1/recommend", params={"visitor": visitor, "n": 20}).json()
    assert cold["fallback"] == "cold-start" and len(cold["items"]) == 20
    assert all(top(item) != banned for item in cold["items"])
    seen = [item["id"] for item in catalog(client)[1:4] if top(item) != banned]
    events = [{"event": "view", "visitor": visitor, "item": item} for item in seen]
    assert client.post("/v1/events", json=events).status_code == 202
    live = client.get("/v1/recommend", params={"visitor": visitor, "n": 20}).json()
    assert live["profile"] == "live" and len(live["items"]) == 20
    assert all(top(item) != banned for item in live["items"])
    similar = client.get(f"/v1/items/{seen[0]}/similar", params={"n": 20}).json()
    assert all(top(item) != banned for item in similar["items"])


def test_segments_and_attached_content_are_in_the_answer(client: TestClient) -> None:
    visitor = f"v-{uuid.uuid4().hex[:8]}"
    doc = {
        "segments": [{"id": "browsers", "when": {"counter": {"event": "view", "window": "1d", "at_least": 2}}}],
        "rules": [
            {
                "id": "banner",
                "when": {"segment": "browsers"},
                "actions": [{"type": "attach", "slot": "top", "content": {"text": "Welcome back"}}],
            }
        ],
    }
    put(client, doc)
    assert client.get("/v1/recommend", params={"visitor": visitor}).json()["content"] == []
    items = [item["id"] for item in catalog(client)[:2]]
    client.post("/v1/events", json=[{"event": "view", "visitor": visitor, "item": i} for i in items])
    body = client.get("/v1/recommend", params={"visitor": visitor}).json()
    assert "browsers" in body["segments"]
    assert body["content"] == [{"slot": "top", "rule": "rule:banner@1", "content": {"text": "Welcome back"}}]


def test_context_rules_see_device_and_the_cdn_country_header(client: TestClient) -> None:
    doc = {
        "rules": [
            {
                "id": "de-mobile",
                "when": {"context": {"device": ["mobile"], "country": ["DE"]}},
                "actions": [{"type": "attach", "slot": "s", "content": {}}],
            }
        ]
    }
    put(client, doc)
    hit = client.get("/v1/recommend", params={"visitor": "x", "device": "mobile"}, headers={"cf-ipcountry": "DE"})
    assert hit.json()["rules"] == ["rule:de-mobile@1"]
    miss = client.get("/v1/recommend", params={"visitor": "x", "device": "mobile", "country": "FR"})
    assert miss.json()["rules"] == []


def test_the_preview_shows_the_list_without_and_with_a_candidate(client: TestClient) -> None:
    pinned = catalog(client)[40]["id"]
    candidate = {
        "rules": [
            {"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 2}]},
            {
                "id": "never",
                "when": {"context": {"device": ["watch"]}},
                "actions": [{"type": "cap", "per_category": 1}],
            },
        ]
    }
    answer = client.post("/admin/rules/preview", json={"visitors": ["a", "b"], "rules": candidate, "n": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["active"] is None and [v["visitor"] for v in body["visitors"]] == ["a", "b"]
    for visitor in body["visitors"]:
        assert visitor["without"]["rules"] == []
        assert pinned not in [item["id"] for item in visitor["without"]["items"]]
        assert visitor["with"]["items"][1]["id"] == pinned
        assert visitor["with"]["fired"] == ["rule:hero@candidate"]
    assert client.get("/admin/rules").json()["versions"] == []  # nothing stored


def test_an_invalid_candidate_in_a_preview_names_its_rule(client: TestClient) -> None:
    candidate = {"rules": [{"id": "bad", "actions": [{"type": "boost", "items": {}, "weight": 2}]}]}
    answer = client.post("/admin/rules/preview", json={"visitors": ["a"], "rules": candidate})
    assert answer.status_code == 422
    assert answer.json()["error"]["rule"] == "bad"
    assert answer.json()["error"]["field"] == "rules.rules[0].actions[0].items"


def test_rule_hits_are_counted_per_rule_in_metrics(client: TestClient) -> None:
    pinned = catalog(client)[40]["id"]
    put(client, {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]})
    for _ in range(3):
        client.get("/v1/recommend", params={"visitor": "m"})
    text = client.get("/metrics").text
    assert 'tailor_rule_hits_total{rule="hero"} 3.0' in text
    assert "tailor_rules_version 1.0" in text


def test_rule_hits_sum_each_rule_over_the_different_lists_it_was_in() -> None:
    """The hot path counts answers per list of rules; a flush sums them per rule."""
    metrics = Metrics()
    for refs in (["rule:a@1", "rule:b@1"], ["rule:a@1", "rule:b@1"], ["rule:a@1"], [], ["rule:c@2", "rule:a@1"]):
        metrics.rules_changed(refs)
    metrics.flush()
    metrics.rules_changed(["rule:b@1"])
    metrics.flush()
    hits = {
        sample.labels["rule"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "tailor_rule_hits"
        for sample in family.samples
        if sample.name == "tailor_rule_hits_total"
    }
    assert hits == {"a": 4.0, "b": 3.0, "c": 1.0}


def test_versions_survive_a_restart_with_the_memory_store(root: Path, tmp_path: Path) -> None:
    rules_dir = str(tmp_path / "rules")
    with TestClient(create_app(settings(root, rules_dir=rules_dir))) as first:
        pinned = catalog(first)[40]["id"]
        put(first, {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]})
        first.put("/admin/rules/flags/hero", json={"enabled": True})
    with TestClient(create_app(settings(root, rules_dir=rules_dir))) as second:
        overview = second.get("/admin/rules").json()
        assert overview["serving"] == 1 and overview["flags"] == {"hero": True}
        assert second.get("/v1/popular").json()["items"][0]["id"] == pinned


def test_a_snapshot_swap_keeps_the_active_rules(root: Path) -> None:
    with TestClient(create_app(settings(root))) as client:
        pinned = catalog(client)[40]["id"]
        put(client, {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]})
        republish(root)
        assert client.post("/admin/reload").json()["changed"] is True
        assert client.get("/v1/popular").json()["items"][0]["id"] == pinned
        assert client.get("/admin/rules").json()["serving"] == 1


def test_activation_on_one_node_reaches_another_through_redis(root: Path, redis_server: RedisServer) -> None:
    redis_server.start()
    store = f"{redis_server.url}?prefix=rules-{uuid.uuid4().hex[:8]}:"
    with (
        TestClient(create_app(settings(root, store=store))) as node_a,
        TestClient(create_app(settings(root, store=store))) as node_b,
    ):
        pinned = catalog(node_a)[40]["id"]
        put(node_a, {"rules": [{"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 1}]}]})
        deadline = time.monotonic() + 10
        while node_b.get("/admin/rules").json()["serving"] != 1:
            assert time.monotonic() < deadline, "node B never served version 1"
            time.sleep(0.05)
        assert node_b.get("/v1/popular").json()["items"][0]["id"] == pinned
        node_b.put("/admin/rules/flags/hero", json={"enabled": False})
        while node_a.get("/v1/popular").json()["items"][0]["id"] == pinned:
            assert time.monotonic() < deadline + 10, "node A never saw the flag"
            time.sleep(0.05)


def test_the_active_rule_sets_triggers_fire_and_show_in_the_next_answer(client: TestClient) -> None:
    item = catalog(client)[5]["id"]
    trigger = {
        "id": "third-look",
        "on": "view",
        "count": 3,
        "window": "1d",
        "same_item": True,
        "message": {"title": "Still thinking about it?"},
    }
    put(client, {"triggers": [trigger]})
    views = [{"event": "view", "visitor": "t1", "item": item, "id": f"e{i}"} for i in range(3)]
    assert client.post("/v1/events", json=views[:2]).status_code == 202
    assert client.get("/v1/recommend", params={"visitor": "t1"}).json()["messages"] == []
    assert client.post("/v1/events", json=views[2:]).status_code == 202
    messages = client.get("/v1/recommend", params={"visitor": "t1"}).json()["messages"]
    assert [(m["trigger"], m["version"], m["message"]["title"]) for m in messages] == [
        ("third-look", 1, "Still thinking about it?")
    ]


def test_an_invalid_trigger_is_a_422_naming_it(client: TestClient) -> None:
    trigger = {"id": "odd", "on": "add_to_cart", "unless": "purchase", "message": {"title": "x"}}
    answer = client.put("/admin/rules", json={"triggers": [trigger]})
    assert answer.status_code == 422
    assert (answer.json()["error"]["rule"], answer.json()["error"]["field"]) == ("odd", "triggers[0]")
    counted = {"id": "weekly", "on": "view", "count": 2, "window": "3d", "message": {"title": "x"}}
    answer = client.put("/admin/rules", json={"triggers": [counted]})
    assert answer.status_code == 422
    assert answer.json()["error"]["rule"] == "weekly"


def test_a_preview_time_beyond_the_calendar_is_a_400(client: TestClient) -> None:
    asked = {"visitors": ["a"], "rules": {}, "context": {"at": 253_402_300_799}}
    answer = client.post("/admin/rules/preview", json=asked)
    assert answer.status_code == 400
    assert answer.json()["error"]["field"] == "context.at"


def test_a_remembered_ruled_answer_is_only_reused_for_the_same_inputs(client: TestClient) -> None:
    items = catalog(client)
    pinned, boosted = items[30]["id"], items[3]["id"]
    put(
        client,
        {
            "rules": [
                {"id": "hero", "actions": [{"type": "pin", "item": pinned, "position": 2}]},
                {"id": "lift", "actions": [{"type": "boost", "items": {"ids": [boosted]}, "weight": 5}]},
            ]
        },
    )
    first = client.get("/v1/recommend", params={"visitor": "cold-1"}).json()
    again = client.get("/v1/recommend", params={"visitor": "cold-2"}).json()
    assert [(i["id"], i["reasons"]) for i in again["items"]] == [(i["id"], i["reasons"]) for i in first["items"]]
    assert again["rules"] == first["rules"] == ["rule:hero@1", "rule:lift@1"]
    assert first["items"][1]["id"] == pinned
    # The same plan, but the request excludes what the first answer showed: not the first answer.
    shown = [i["id"] for i in first["items"]]
    other = client.get("/v1/recommend", params={"visitor": "cold-3", "exclude": shown[0]}).json()
    assert shown[0] not in [i["id"] for i in other["items"]]
    # A visitor who viewed the boosted item is not shown it again, whatever was remembered.
    client.post("/v1/events", json={"event": "view", "visitor": "warm", "item": boosted})
    warm = client.get("/v1/recommend", params={"visitor": "warm"}).json()
    assert boosted not in [i["id"] for i in warm["items"]]
    # A shorter list asked for is its own answer, not a slice of a remembered longer one by accident.
    three = client.get("/v1/recommend", params={"visitor": "cold-4", "n": 3}).json()
    assert [i["id"] for i in three["items"]] == shown[:3]
