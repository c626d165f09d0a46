"""The live catalog across nodes: two `tailor serve` processes on one real Redis. A change taken
by node A is served by node B within a second (the bar of docs/catalog.md), and a restarted node
replays the changes over its snapshot."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest
from websockets.sync.client import connect as ws_connect

from gateway.privacy import tokens
from gateway.snapshot import Snapshot, load
from tailor.cli import main
from tests.conftest import RedisServer
from tests.snapshots import current_dir
from tests.test_gateway_live import Server
from tests.waiting import wait_until

SECRET = "catalog-nodes-secret"
BAR_S = 1.0  # the bar: every node serves a change within a second


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    return load(current_dir(small_snapshots))


@pytest.fixture
def nodes(
    root: Path, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Server, Server, str]]:
    monkeypatch.setenv("TAILOR_SECRET", SECRET)
    monkeypatch.setenv("TAILOR_CONSENT_MODE", "opt-out")
    store = f"{redis_server.url}?prefix=catalog-{uuid.uuid4().hex[:8]}:"  # this test's keys only
    node_a = Server(root, tmp_path / "a.log", "--store", store)
    node_b = Server(root, tmp_path / "b.log", "--store", store)
    try:
        yield node_a, node_b, store
    finally:
        node_a.stop()
        node_b.stop()


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def served_anywhere(node: Server, item: str, *, similar_of: str, user: str) -> list[str]:
    """The routes of `node` whose answer holds `item` (long lists, so anything served would show)."""
    answers = {
        "popular": httpx.get(f"{node.url}/v1/popular", params={"n": 100}),
        "similar": httpx.get(f"{node.url}/v1/items/{similar_of}/similar", params={"n": 100}),
        "recommend-user": httpx.get(f"{node.url}/v1/recommend", params={"user": user, "n": 100}),
        "recommend-visitor": httpx.get(f"{node.url}/v1/recommend", params={"visitor": "walker", "n": 100}),
    }
    return [route for route, answer in answers.items() if item in ids(answer)]


def related_to(snap: Snapshot, categories: list[str], tags: list[str]) -> str:
    """A built item whose precomputed similar items a new item of this content would enter in the top 3."""
    assert snap.content is not None and snap.neighbour_scores is not None
    vector = snap.content.vectors([(categories, tags)])[0]
    cosine = snap.unit_vectors @ (vector / np.linalg.norm(vector))
    beats = np.flatnonzero(cosine > snap.neighbour_scores[:, 2] + 1e-3)
    return snap.item_ids[int(beats[np.argmax(cosine[beats])])]


def test_a_new_item_made_on_one_node_is_similar_to_a_related_item_on_another_within_a_second(
    nodes: tuple[Server, Server, str], snap: Snapshot
) -> None:
    node_a, node_b, _ = nodes
    categories, tags = snap.categories[21], sorted(snap.item_tags[21])
    related = related_to(snap, categories, tags)
    assert "fresh" not in ids(httpx.get(f"{node_b.url}/v1/items/{related}/similar", params={"n": 5}))
    body = {"title": "Fresh", "categories": categories, "tags": tags, "stock": 4, "price": 9.5}
    assert httpx.put(f"{node_a.url}/v1/items/fresh", json=body).status_code == 200
    wait_until(
        lambda: "fresh" in ids(httpx.get(f"{node_b.url}/v1/items/{related}/similar", params={"n": 5})),
        timeout=BAR_S,
        what="node B to show the new item among the similar items",
    )
    seen = httpx.get(f"{node_b.url}/v1/items/fresh").json()
    assert (seen["source"], seen["served"], seen["price"]) == ("live", True, 9.5)
    metrics = httpx.get(f"{node_b.url}/metrics").text
    assert "tailor_catalog_changes_applied_total 1.0" in metrics
    assert "tailor_catalog_lag_seconds_count 1.0" in metrics


def test_stock_zero_on_one_node_is_served_by_no_route_of_another_with_or_without_an_in_stock_rule(
    nodes: tuple[Server, Server, str], snap: Snapshot
) -> None:
    node_a, node_b, _ = nodes
    user = next(iter(snap.user_row))
    similar_of = snap.item_ids[7]

    def shown_everywhere() -> str:
        """An item node B serves on every route now."""
        lists = [
            ids(httpx.get(f"{node_b.url}/v1/popular", params={"n": 100})),
            ids(httpx.get(f"{node_b.url}/v1/items/{similar_of}/similar", params={"n": 100})),
            ids(httpx.get(f"{node_b.url}/v1/recommend", params={"user": user, "n": 100})),
            ids(httpx.get(f"{node_b.url}/v1/recommend", params={"visitor": "walker", "n": 100})),
        ]
        common = set(lists[0]).intersection(*lists[1:])
        assert common, "no item on every route"
        return next(item for item in lists[0] if item in common)

    for with_rule in (False, True):
        if with_rule:
            rules = {"rules": [{"id": "in-stock", "actions": [{"type": "filter", "items": {"in_stock": False}}]}]}
            stored = httpx.put(f"{node_a.url}/admin/rules", params={"activate": "true"}, json=rules)
            assert stored.status_code == 201, stored.text
            wait_until(lambda: httpx.get(f"{node_b.url}/admin/rules").json()["serving"] is not None)
        item = shown_everywhere()
        assert httpx.patch(f"{node_a.url}/v1/items/{item}", json={"stock": 0}).status_code == 200
        wait_until(
            lambda: not served_anywhere(node_b, item, similar_of=similar_of, user=user),  # noqa: B023
            timeout=BAR_S,
            what=f"node B to stop serving {item} (rule: {with_rule})",
        )
        assert httpx.get(f"{node_b.url}/v1/items/{item}").json()["served"] is False


def test_a_retired_item_is_pushed_out_of_a_visitors_list_on_another_node(
    nodes: tuple[Server, Server, str],
) -> None:
    node_a, node_b, _ = nodes
    token = tokens.mint(SECRET.encode(), "listener", 60)
    with ws_connect(f"ws://127.0.0.1:{node_b.port}/v1/stream?token={token}&n=5", open_timeout=10) as ws:
        hello: dict[str, Any] = json.loads(ws.recv(timeout=10))
        shown = hello["recommendations"]["items"][0]["id"]
        assert httpx.delete(f"{node_a.url}/v1/items/{shown}").status_code == 200
        pushed = json.loads(ws.recv(timeout=10))
        while pushed["type"] != "recommendations":
            pushed = json.loads(ws.recv(timeout=10))
    assert pushed["cause"] == "catalog"
    assert shown not in [item["id"] for item in pushed["recommendations"]["items"]]


def test_a_restarted_node_replays_the_changes_over_its_snapshot(
    nodes: tuple[Server, Server, str], root: Path, tmp_path: Path
) -> None:
    node_a, node_b, store = nodes
    node_b.stop()
    rows = [{"item_id": f"while-away-{n}", "title": "Away", "stock": 1} for n in range(3)]
    catalog = tmp_path / "away.jsonl"
    catalog.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["catalog", "import", str(catalog), "--url", node_a.url, "--batch", "2"]) == 0
    again = Server(root, tmp_path / "b2.log", "--store", store)
    try:
        for row in rows:
            item = httpx.get(f"{again.url}/v1/items/{row['item_id']}").json()
            assert (item["source"], item["served"]) == ("live", True)
    finally:
        again.stop()
