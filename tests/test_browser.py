"""The demo shop in a real headless Chromium (Debian's package, driven by Playwright) against a real
`tailor serve`: live panel changes over the WebSocket, events stored, consent denied stores nothing,
a gateway restart is caught up with. A screenshot of the page goes to test-artifacts/."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.test_gateway_live import REPO, Server

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "the browser tests need Debian's chromium: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def server(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("TAILOR_SECRET", "browser-test-secret")
    running = Server(root, tmp_path / "serve.log")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    try:
        yield opened
    finally:
        context.close()


def pushes(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("window.demo.pushes")
    return found


def wait_for_push(page: Page, cause: str, after: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """The first push with `cause` among those after the first `after` ones."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for push in pushes(page)[after:]:
            if push["cause"] == cause:
                return push
        page.wait_for_timeout(50)
    raise AssertionError(f"no {cause!r} push within {timeout_s}s; got {pushes(page)}")


def open_demo(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/demo")
    page.wait_for_selector(".product")


def visitor_of(page: Page) -> str:
    who: dict[str, str] = page.evaluate("Tailor.visitor()")
    return who["visitor"]


def test_browsing_changes_the_panel_live_and_the_events_are_stored(page: Page, server: Server) -> None:
    open_demo(page, server)
    assert page.is_visible("#consent")
    page.click("#consent-accept")
    first = wait_for_push(page, "connect", 0)
    assert page.get_attribute("#recs-status", "data-cause") == "connect"
    assert page.locator("#recs [data-tailor-item]").count() == 6
    # Each pick says why it was picked.
    assert "popular" in (page.locator("#recs details").first.text_content() or "")

    page.locator(".product").nth(2).click()
    page.click("#add-to-cart")
    page.locator(".product").nth(5).click()
    before = len(pushes(page))
    pushed = wait_for_push(page, "events", before - 1 if before else 0)
    assert pushed["items"] != first["items"]
    page.wait_for_function("document.querySelector('#recs-status').dataset.cause === 'events'")
    assert page.locator("#recs [data-tailor-item]").first.get_attribute("data-tailor-request") == pushed["request_id"]
    assert "user-vector" in (page.locator("#recs details").first.text_content() or "")

    visitor = visitor_of(page)
    answer = httpx.get(f"{server.url}/v1/recommend", params={"visitor": visitor, "n": 6}).json()
    assert answer["profile"] == "live"  # the store has the events the page sent
    assert [item["id"] for item in answer["items"]] == pushed["items"]

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-shop.png"), full_page=True)
    assert (ARTIFACTS / "demo-shop.png").stat().st_size > 10_000


def test_after_consent_is_denied_no_event_leaves_the_page(page: Page, server: Server) -> None:
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    open_demo(page, server)
    page.click("#consent-decline")
    for number in range(3):
        page.locator(".product").nth(number).click()
        page.click("#add-to-cart")
    page.evaluate("Tailor.flush()")
    page.wait_for_timeout(1500)  # past the client's flush timer (flushMs 1000)
    assert not [url for url in sent if "/v1/events" in url or "/v1/token" in url or "/v1/stream" in url]
    assert page.evaluate("localStorage.getItem('tailor:q')") in (None, "[]")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "tailor_events_accepted_total{" not in metrics
    # The panel still shows something: popular items, asked for without any visitor id.
    assert page.locator("#recs [data-tailor-item]").count() == 6
    assert any("/v1/recommend" in url and "visitor" not in url for url in sent)


def test_a_restarted_gateway_is_reconnected_to_and_caught_up_with(
    page: Page, server: Server, root: Path, tmp_path: Path
) -> None:
    open_demo(page, server)
    page.click("#consent-accept")
    wait_for_push(page, "connect", 0)
    visitor = visitor_of(page)
    server.stop()
    # While the gateway is down the visitor keeps browsing: the events wait in localStorage.
    page.locator(".product").nth(1).click()
    page.click("#add-to-cart")
    page.wait_for_timeout(1200)
    waiting = page.evaluate("JSON.parse(localStorage.getItem('tailor:q') || '[]').length")
    assert waiting >= 2
    before = len(pushes(page))
    restarted = Server(root, tmp_path / "restarted.log", port=server.port)
    try:
        wait_for_push(page, "connect", before, timeout_s=30)  # the socket is back (jittered reconnect)
        # The events sent while it was down arrive with the retries, and the panel follows them.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = httpx.get(f"{restarted.url}/v1/recommend", params={"visitor": visitor}).json()
            if answer["profile"] == "live":
                break
            page.wait_for_timeout(200)
        assert answer["profile"] == "live"
        assert visitor_of(page) == visitor
        after = len(pushes(page))
        page.locator(".product").nth(3).click()
        assert wait_for_push(page, "events", after, timeout_s=15)["items"]
    finally:
        restarted.stop()
