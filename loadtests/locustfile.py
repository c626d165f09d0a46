"""A realistic traffic mix against a running Tailor gateway, for Locust.

Visitors are drawn from a synthetic shop (`tailor synth`): known users from users.csv (or, when
TAILOR_SNAPSHOTS names a snapshot root, exactly the users the current snapshot knows), items and
categories from items.jsonl. Every response is checked (2xx and the documented JSON shape); anything
else is a failure in Locust's statistics. Requests are named by route so the stats group by it.

    TAILOR_SHOP=var/demo/shop .venv/bin/locust -f loadtests/locustfile.py --headless \
        -u 20 -r 10 -t 60s --host http://127.0.0.1:8000 --only-summary

Environment:
    TAILOR_SHOP        shop directory with items.jsonl and users.csv (default var/demo/shop)
    TAILOR_SNAPSHOTS   optional snapshot root; its CURRENT users.json narrows the known users
    TAILOR_WAIT        "MIN,MAX" think time in seconds between tasks (default "0.5,2")
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from locust import FastHttpUser, between, task

EVENT_TYPES = ("view", "click")


@dataclass(frozen=True)
class Shop:
    users: list[str]
    items: list[str]
    categories: list[str]
    by_category: dict[str, list[str]] = field(repr=False)


def _known_users(shop_dir: Path) -> list[str]:
    snapshots = os.environ.get("TAILOR_SNAPSHOTS")
    if snapshots:
        root = Path(snapshots)
        version = (root / "CURRENT").read_text(encoding="utf-8").strip()
        users: list[str] = json.loads((root / version / "users.json").read_bytes())
        return users
    with (shop_dir / "users.csv").open(newline="", encoding="utf-8") as handle:
        return [row["user_id"] for row in csv.DictReader(handle)]


class Checked(Protocol):
    """What the checks need of Locust's response context manager (whose success/failure are untyped)."""

    @property
    def status_code(self) -> int: ...
    @property
    def content(self) -> bytes | None: ...
    def success(self) -> None: ...
    def failure(self, exc: Any) -> None: ...


def load_shop(shop_dir: Path) -> Shop:
    items: list[str] = []
    by_category: dict[str, list[str]] = {}
    with (shop_dir / "items.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            item_id = str(record["item_id"])
            items.append(item_id)
            # "fashion/knitwear" files the item under both "fashion/knitwear" and "fashion"
            names = {str(c) for c in record.get("categories") or []}
            names |= {name.partition("/")[0] for name in names}
            for name in names:
                by_category.setdefault(name, []).append(item_id)
    users = _known_users(shop_dir)
    if not users or not items:
        raise RuntimeError(f"{shop_dir}: no users or no items; run `tailor synth --out {shop_dir}` first")
    return Shop(users=users, items=items, categories=sorted(by_category), by_category=by_category)


SHOP = load_shop(Path(os.environ.get("TAILOR_SHOP", "var/demo/shop")))


def _wait_range() -> tuple[float, float]:
    low, _, high = os.environ.get("TAILOR_WAIT", "0.5,2").partition(",")
    return float(low), float(high or low)


def _json_body(response: Checked) -> tuple[bool, Any]:
    """(True, the decoded body) for a 2xx JSON response; else marks it failed and gives (False, None)."""
    status = response.status_code
    if not 200 <= status < 300:
        response.failure(f"HTTP {status}: {(response.content or b'')[:200]!r}")
        return False, None
    try:
        return True, json.loads(response.content or b"")
    except ValueError:
        response.failure(f"not JSON: {(response.content or b'')[:200]!r}")
        return False, None


def check_items(response: Checked) -> None:
    """Mark the response failed unless it is 2xx JSON with an `items` list of well-formed items."""
    ok, body = _json_body(response)
    if not ok:
        return
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list):
        response.failure(f"no items list: {(response.content or b'')[:200]!r}")
    elif not all(isinstance(item, dict) and "id" in item and "score" in item for item in items):
        response.failure(f"malformed item: {(response.content or b'')[:200]!r}")
    else:
        response.success()


def check_accepted(response: Checked, sent: int) -> None:
    ok, body = _json_body(response)
    if not ok:
        return
    # Stored, or (a visitor who has not allowed analytics) counted only: either way none was refused.
    taken = body.get("accepted", 0) + body.get("unconsented", 0) if isinstance(body, dict) else None
    if taken != sent:
        response.failure(f"expected accepted + unconsented = {sent}: {(response.content or b'')[:200]!r}")
    else:
        response.success()


class ShopVisitor(FastHttpUser):
    """One simulated browser; each task is one step a real visitor or client would take."""

    wait_time = between(*_wait_range())

    def _items(self, path: str, name: str) -> None:
        with self.client.get(path, name=name, catch_response=True) as response:
            check_items(response)

    def _recommend(self, query: str, name: str) -> None:
        self._items(f"/v1/recommend?{query}", name)

    def _post_events(self, events: list[dict[str, Any]], name: str) -> None:
        with self.client.post("/v1/events", json={"events": events}, name=name, catch_response=True) as response:
            check_accepted(response, len(events))

    @task(30)
    def recommend_known(self) -> None:
        user = random.choice(SHOP.users)
        self._recommend(f"user={user}&n=10&page=home&device=mobile", "/v1/recommend [known]")

    @task(10)
    def recommend_known_in_category(self) -> None:
        user = random.choice(SHOP.users)
        category = random.choice(SHOP.categories)
        self._recommend(f"user={user}&n=10&category={category}&page=category", "/v1/recommend [known+category]")

    @task(15)
    def new_visitor_clicks_then_recommend(self) -> None:
        """An anonymous visitor accepts the consent banner, browses a few items (mostly within one
        category), then gets a shelf."""
        visitor = f"v-{uuid.uuid4().hex[:16]}"
        choices = {"analytics": "granted", "personalization": "granted"}
        with self.client.put(
            "/v1/consent", json={"visitor": visitor, "choices": choices}, name="/v1/consent", catch_response=True
        ) as response:
            ok, body = _json_body(response)
            if ok and not (isinstance(body, dict) and body["purposes"]["personalization"]["allowed"]):
                response.failure(f"consent not applied: {(response.content or b'')[:200]!r}")
            elif ok:
                response.success()
        pool = SHOP.by_category[random.choice(SHOP.categories)]
        now = int(time.time())
        count = random.randint(1, 3)
        events: list[dict[str, Any]] = [
            {"visitor": visitor, "item": random.choice(pool), "event": random.choice(EVENT_TYPES), "ts": now - k}
            for k in range(count - 1, -1, -1)
        ]
        self._post_events(events, "/v1/events [new visitor]")
        seen = ",".join(e["item"] for e in events)
        self._recommend(f"visitor={visitor}&n=10&exclude={seen}&page=product", "/v1/recommend [new visitor]")

    @task(10)
    def unknown_visitor(self) -> None:
        visitor = f"v-{uuid.uuid4().hex[:16]}"
        self._recommend(f"visitor={visitor}&n=10&page=home&referrer=search", "/v1/recommend [unknown visitor]")

    @task(15)
    def similar_items(self) -> None:
        self._items(f"/v1/items/{random.choice(SHOP.items)}/similar?n=10", "/v1/items/[id]/similar")

    @task(5)
    def popular(self) -> None:
        self._items("/v1/popular?n=10", "/v1/popular")

    @task(5)
    def popular_in_category(self) -> None:
        self._items(f"/v1/popular?n=10&category={random.choice(SHOP.categories)}", "/v1/popular [category]")

    @task(10)
    def event_batch(self) -> None:
        """A client flushing its buffered events: a known user's views, clicks, sometimes a cart add."""
        user = random.choice(SHOP.users)
        now = int(time.time())
        kinds = ("view", "view", "click", "add_to_cart")
        events: list[dict[str, Any]] = [
            {"user": user, "item": random.choice(SHOP.items), "event": random.choice(kinds), "ts": now}
            for _ in range(random.randint(1, 5))
        ]
        self._post_events(events, "/v1/events")
