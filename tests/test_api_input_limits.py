"""Bounds on what callers send, through the real app: how deep a JSON body nests, when an event may
have happened, where CURRENT may point, what X-Request-ID may say, how many items and events, and
that the OpenAPI document states these limits as the server enforces them."""

from __future__ import annotations

import http.client
import json
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.api.http import MAX_JSON_DEPTH, nesting_exceeds
from gateway.app import create_app
from index_builder import snapshot
from tests.apps import quiet_settings
from tests.snapshots import republish
from tests.test_gateway_live import Server

BODY_ROUTES = [
    ("POST", "/v1/events"),
    ("PUT", "/admin/rules"),
    ("POST", "/admin/rules/preview"),
    ("PUT", "/admin/experiments"),
]
# Routes whose bodies may be only a few KB (4 KB for a flag): deep, yet under their limit.
SMALL_BODY_ROUTES = [("PUT", "/v1/consent"), ("POST", "/v1/token"), ("PUT", "/admin/rules/flags/hero")]


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    # A 500 must come back as a 500 here, not as the exception it was raised by.
    with TestClient(create_app(quiet_settings(root, "limits")), raise_server_exceptions=False) as test_client:
        yield test_client


def nested(levels: int, inner: str = "1") -> str:
    return '{"a":' * levels + inner + "}" * levels


def rules_when(condition: str) -> str:
    return attach("{}", ',"when":' + condition)


def attach(content: str, more: str = "") -> str:
    return '{"rules":[{"id":"r","actions":[{"type":"attach","slot":"s","content":' + content + "}]" + more + "}]}"


DEEP = 5000
DEEP_BODIES = {
    "array": "[" * DEEP + "]" * DEEP,
    "object": nested(DEEP),
    "events": '{"events":[' + "[" * DEEP + "]" * DEEP + "]}",
    "condition": rules_when('{"not":' * DEEP + '{"segment":"x"}' + "}" * DEEP),
    "content": attach(nested(DEEP)),
    "preview": '{"visitors":["v"],"rules":' + rules_when('{"any":[' * DEEP + '{"segment":"x"}' + "]}" * DEEP) + "}",
}


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("shape", DEEP_BODIES)
def test_a_body_nested_5000_levels_deep_is_a_400(client: TestClient, method: str, path: str, shape: str) -> None:
    answer = client.request(method, path, content=DEEP_BODIES[shape], headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == {
        "code": "invalid-body",
        "message": f"JSON nested more than {MAX_JSON_DEPTH} levels deep",
    }


@pytest.mark.parametrize(("method", "path"), SMALL_BODY_ROUTES)
def test_a_small_body_nested_1500_levels_deep_is_a_400(client: TestClient, method: str, path: str) -> None:
    answer = client.request(method, path, content="[" * 1500 + "]" * 1500)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid-body"


def test_conditions_nested_as_deep_as_allowed_are_stored(client: TestClient) -> None:
    # rules[0].when is three levels down, each `not` one more, the innermost condition three.
    levels = MAX_JSON_DEPTH - 6
    condition = '{"not":' * levels + '{"context":{"device":["mobile"]}}' + "}" * levels
    answer = client.put("/admin/rules", content=rules_when(condition))
    assert answer.status_code == 201, answer.text


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def test_nesting_is_measured_outside_strings_only() -> None:
    # Brackets, quotes and backslashes inside strings (keys too) are text, not structure.
    tricky = ['a"[{\\', "x\\\\", "]]}}", '\\"[', "[[[[", "", 1, None]
    rnd = random.Random(7)

    def value(levels: int) -> Any:
        if levels == 0 or rnd.random() < 0.2:
            return rnd.choice(tricky)
        if rnd.random() < 0.5:
            return [value(levels - 1) for _ in range(rnd.randint(0, 3))]
        return {f"{rnd.choice(tricky)}{i}": value(levels - 1) for i in range(rnd.randint(0, 3))}

    for _ in range(500):
        document = value(rnd.randint(0, 10))
        body = json.dumps(document).encode()
        for limit in range(12):
            assert nesting_exceeds(body, limit) == (depth(document) > limit), (body, limit)


@pytest.mark.parametrize(
    ("ts", "code"),
    [
        (0, "ts-too-old"),
        (-5, "ts-too-old"),
        (946_684_799, "ts-too-old"),  # 1999-12-31T23:59:59Z
        (946_684_799_999, "ts-too-old"),  # the same in milliseconds
        ("1999-12-31T23:59:59Z", "ts-too-old"),
        ("0001-01-01T00:00:00", "ts-too-old"),
        ("9999-12-31T23:59:59Z", "ts-in-future"),
        (time.time() + 86_400, "ts-in-future"),
        ((time.time() + 86_400) * 1000, "ts-in-future"),
    ],
)
def test_an_event_outside_the_time_window_is_rejected_naming_the_window(
    client: TestClient, ts: float | str, code: str
) -> None:
    item = client.get("/v1/popular").json()["items"][0]["id"]
    sane = {"visitor": "v", "item": item, "event": "view", "ts": "2000-01-01T00:00:00Z"}
    answer = client.post("/v1/events", json=[sane, {**sane, "ts": ts}])
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["accepted"] == 1
    (rejected,) = body["rejected"]
    assert (rejected["index"], rejected["code"], rejected["field"]) == (1, code, "ts")
    window = "2000-01-01T00:00:00Z" if code == "ts-too-old" else "5 minutes ahead"
    assert window in rejected["message"]


def point_outside(root: Path, how: str) -> str:
    """Publish a good new version outside `root` and point CURRENT at it `how`; its version."""
    version = republish(root, make_current=False)
    outside = root.parent / "outside"
    outside.mkdir()
    shutil.move(root / version, outside / version)
    if how == "parent":
        pointer = f"../outside/{version}"
    elif how == "absolute":
        pointer = str(outside / version)
    else:  # a symlink in the root leading out of it
        (root / "escape").symlink_to(outside / version, target_is_directory=True)
        pointer = "escape"
    (root / snapshot.POINTER).write_text(pointer + "\n")
    return version


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_current_pointing_outside_the_root_is_refused_and_the_old_snapshot_serves(root: Path, how: str) -> None:
    with TestClient(create_app(quiet_settings(root, "limits"))) as client:
        serving = client.get("/v1/popular").json()["snapshot"]
        outside = point_outside(root, how)
        answer = client.post("/admin/reload")
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert error["code"] == "snapshot-refused"
        assert any("not a version directory under" in problem for problem in error["problems"])
        assert client.get("/v1/popular").json()["snapshot"] == serving != outside


def test_a_gateway_started_on_a_current_outside_the_root_serves_nothing(root: Path) -> None:
    point_outside(root, "parent")
    with TestClient(create_app(quiet_settings(root, "limits"))) as client:
        answer = client.get("/v1/popular")
        assert (answer.status_code, answer.json()["error"]["code"]) == (503, "no-snapshot")


def get_with_request_id(port: int, given: bytes) -> tuple[str, bytes]:
    """The body's request_id and the X-Request-ID header's bytes of GET /v1/popular."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", "/v1/popular")
        connection.putheader("X-Request-ID", given)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 200
        body = json.loads(response.read())
        header = response.getheader("x-request-id")
        assert header is not None
        return body["request_id"], header.encode("latin-1")  # http.client reads header bytes as latin-1
    finally:
        connection.close()


def test_a_non_ascii_request_id_is_echoed_intact_or_replaced(root: Path, tmp_path: Path) -> None:
    # Over a real server: the test client cannot carry a header that is not ASCII.
    server = Server(root, tmp_path / "gateway.log")
    try:
        for given in ["état-42", "请求-7", "🙂"]:
            assert get_with_request_id(server.port, given.encode()) == (given, given.encode())
        # Not UTF-8, not printable (a no-break space; control characters the server itself refuses), too long.
        for bad in [b"\xe9t\xe9", "a\u00a0b".encode(), b"x" * 129]:
            rid, header = get_with_request_id(server.port, bad)
            assert rid.encode() == header != bad
            assert rid.isascii() and rid.isprintable()
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/v1/popular", "/v1/recommend?visitor=v", "/v1/items/{item}/similar"])
def test_n_over_the_maximum_names_the_configured_maximum(root: Path, path: str) -> None:
    with TestClient(create_app(quiet_settings(root, "limits", max_n=7, default_n=5))) as client:
        item = client.get("/v1/popular").json()["items"][0]["id"]
        url = path.format(item=item) + ("&" if "?" in path else "?")
        assert client.get(url + "n=7").status_code == 200
        for n in (8, 5000):
            answer = client.get(url + f"n={n}")
            assert answer.status_code == 400
            assert answer.json()["error"] == {
                "code": "invalid-parameter",
                "message": "n must be at most 7",
                "field": "n",
            }
        documented = client.get("/openapi.json").json()
        (parameter,) = [p for p in documented["paths"]["/v1/popular"]["get"]["parameters"] if p["name"] == "n"]
        assert (parameter["schema"]["minimum"], parameter["schema"]["maximum"]) == (1, 7)


def test_the_documented_batch_size_is_the_one_enforced(root: Path) -> None:
    with TestClient(create_app(quiet_settings(root, "limits", max_events_per_batch=3))) as client:
        documented = client.get("/openapi.json").json()
        assert documented["components"]["schemas"]["EventBatch"]["properties"]["events"]["maxItems"] == 3
        item = client.get("/v1/popular").json()["items"][0]["id"]
        events = [{"visitor": "v", "item": item, "event": "view"}] * 4
        assert client.post("/v1/events", json={"events": events[:3]}).status_code == 202
        answer = client.post("/v1/events", json={"events": events})
        assert (answer.status_code, answer.json()["error"]["code"]) == (413, "batch-too-large")


def test_every_documented_body_limit_is_the_one_enforced(client: TestClient) -> None:
    documented = client.get("/openapi.json").json()
    checked = 0
    for path, methods in documented["paths"].items():
        for method, operation in methods.items():
            if "requestBody" not in operation:
                continue
            found = re.search(r"JSON of at most ([\d,]+) bytes \(413", operation["description"])
            assert found, f"{method.upper()} {path} does not state its body limit"
            limit = int(found[1].replace(",", ""))
            assert "413" in operation["responses"]
            url = path.replace("{rule_id}", "hero").replace("{item_id}", "i00001")
            over = client.request(method, url, content=b" " * (limit + 1), headers={"content-type": "application/json"})
            assert (over.status_code, over.json()["error"]["code"]) == (413, "body-too-large"), (path, over.text)
            at = client.request(method, url, content=b" " * limit, headers={"content-type": "application/json"})
            assert at.status_code != 413, path
            checked += 1
    assert checked == 10  # the events, token, consent, rules (3), experiments and items (3) bodies


def test_list_parameters_document_that_a_comma_separates_values(client: TestClient) -> None:
    documented = client.get("/openapi.json").json()
    lists = [
        (path, p)
        for path, methods in documented["paths"].items()
        for operation in methods.values()
        for p in operation["parameters"]
        if p["name"] in ("category", "exclude")
    ]
    assert len(lists) == 7  # recommend, similar, popular: both; the stream: category
    for path, parameter in lists:
        pattern = parameter["schema"]["items"]["pattern"]
        assert re.search(pattern, "shoes") and not re.search(pattern, "a,b"), (path, parameter["name"])
        # ...as the server reads them: "a," is the value "a" and an empty one.
        if path == "/v1/popular":
            answer = client.get(path, params={parameter["name"]: "a,"})
            assert (answer.status_code, answer.json()["error"]["field"]) == (400, parameter["name"])
