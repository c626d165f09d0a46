"""The OpenAPI document states the rules across fields the server enforces (gateway.crossfield): for
each, a body the document's schema refuses is one the server refuses, and a body next to it that
both accept, a null field counting as absent for both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from starlette.testclient import TestClient

from gateway.api import openapi
from gateway.app import create_app
from tests.apps import quiet_settings

TRIGGER = {"id": "t", "on": "add_to_cart", "message": {"title": "Still there?"}}


def rules(rule: dict[str, Any] | None = None, *, triggers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A rule set of one rule (an attach, plus what `rule` says) and `triggers`."""
    base = {"id": "r", "actions": [{"type": "attach", "slot": "s", "content": {}}]}
    return {"rules": [{**base, **(rule or {})}], "triggers": triggers or []}


def when(condition: dict[str, Any]) -> dict[str, Any]:
    return rules({"when": condition})


def trigger(**fields: Any) -> dict[str, Any]:
    return rules(triggers=[{**TRIGGER, **fields}])


def experiment(**fields: Any) -> dict[str, Any]:
    return {"experiments": [{"id": "e", **fields}]}


AB = [{"name": "A"}, {"name": "B"}]
MOBILE = {"device": ["mobile"]}
# (route, the body's component, body, whether both accept it)
CASES: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    "condition of one kind": ("/admin/rules", "RuleSet", when({"context": MOBILE}), True),
    "condition of two kinds": ("/admin/rules", "RuleSet", when({"context": MOBILE, "session": {}}), False),
    "condition of two, one null": ("/admin/rules", "RuleSet", when({"context": MOBILE, "segment": None}), True),
    "condition of none": ("/admin/rules", "RuleSet", when({"all": None}), False),
    "nested condition of two": ("/admin/rules", "RuleSet", when({"not": {"context": MOBILE, "any": []}}), False),
    "counter with a bound": ("/admin/rules", "RuleSet", when({"counter": {"event": "view", "at_most": 0}}), True),
    "counter without one": ("/admin/rules", "RuleSet", when({"counter": {"event": "view", "at_least": None}}), False),
    "counter of item and category": (
        "/admin/rules",
        "RuleSet",
        when({"counter": {"event": "view", "at_least": 1, "item": "i1", "category": "c"}}),
        False,
    ),
    "recency within": ("/admin/rules", "RuleSet", when({"recency": {"within": "1d"}}), True),
    "recency both ways": ("/admin/rules", "RuleSet", when({"recency": {"within": "1d", "not_within": "2d"}}), False),
    "recency neither way": ("/admin/rules", "RuleSet", when({"recency": {"event": "view"}}), False),
    "item match of stock": (
        "/admin/rules",
        "RuleSet",
        rules({"actions": [{"type": "filter", "items": {"in_stock": False}}]}),
        True,
    ),
    "item match of nothing": (
        "/admin/rules",
        "RuleSet",
        rules({"actions": [{"type": "filter", "items": {"ids": [], "price_at_least": None}}]}),
        False,
    ),
    "trigger with unless and wait": ("/admin/rules", "RuleSet", trigger(unless="purchase", wait="30m"), True),
    "trigger with unless alone": ("/admin/rules", "RuleSet", trigger(unless="purchase", wait=None), False),
    "trigger with wait alone": ("/admin/rules", "RuleSet", trigger(wait="30m"), False),
    "trigger per item with unless": (
        "/admin/rules",
        "RuleSet",
        trigger(unless="purchase", wait="30m", same_item=True),
        False,
    ),
    "trigger of a zero window": ("/admin/rules", "RuleSet", trigger(window="0.00d"), False),
    "trigger of a short period": ("/admin/rules", "RuleSet", trigger(period="0.5s"), True),
    "rule from a local time": ("/admin/rules", "RuleSet", rules({"valid_from": "2024-02-29 08:00:00"}), True),
    "rule from a leap second": ("/admin/rules", "RuleSet", rules({"valid_from": "2016-12-31T23:59:60Z"}), False),
    "rule from a day there is not": ("/admin/rules", "RuleSet", rules({"valid_until": "2023-02-29T00:00:00"}), False),
    "experiment of two variants": ("/admin/experiments", "ExperimentPlan", experiment(variants=AB), True),
    "experiment of one variant": ("/admin/experiments", "ExperimentPlan", experiment(variants=AB[:1]), False),
    "experiment of variants and factors": (
        "/admin/experiments",
        "ExperimentPlan",
        experiment(variants=AB, factors=[{"name": "f", "levels": AB}]),
        False,
    ),
    "experiment of factors": (
        "/admin/experiments",
        "ExperimentPlan",
        experiment(variants=[], factors=[{"name": "f", "levels": AB}]),
        True,
    ),
    "experiment of neither": ("/admin/experiments", "ExperimentPlan", experiment(), False),
    "experiment from a year 0": (
        "/admin/experiments",
        "ExperimentPlan",
        experiment(variants=AB, start="0000-01-01T00:00:00Z"),
        False,
    ),
    "token for a visitor": ("/v1/token", "TokenRequest", {"visitor": "v1"}, True),
    "token for a visitor and a token": ("/v1/token", "TokenRequest", {"visitor": "v1", "token": "t"}, False),
}


@pytest.fixture(scope="module")
def documented() -> dict[str, Any]:
    return openapi.document()


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(quiet_settings(root, "openapi"))) as test_client:
        yield test_client


def test_the_document_states_the_rules_across_fields(documented: dict[str, Any]) -> None:
    schemas = documented["components"]["schemas"]
    assert len(schemas["Condition"]["oneOf"]) == 8  # one kind of condition: all, any, not, segment, ...
    assert {"required": ["within"]}.items() <= schemas["Recency"]["oneOf"][0].items()
    assert [branch["required"] for branch in schemas["Experiment"]["oneOf"]] == [["variants"], ["factors"]]
    assert schemas["Experiment"]["oneOf"][0]["properties"]["variants"] == {"minItems": 2}
    assert "pattern" in schemas["Rule"]["properties"]["valid_from"]["anyOf"][0]


@pytest.mark.parametrize("case", list(CASES))
def test_the_server_refuses_what_the_document_rules_out(
    case: str, documented: dict[str, Any], client: TestClient
) -> None:
    path, component, body, valid = CASES[case]
    schema = {"$ref": f"#/components/schemas/{component}", "components": documented["components"]}
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(body) is valid
    method = "POST" if path == "/v1/token" else "PUT"
    answer = client.request(method, path, json=body)
    assert (answer.status_code < 300) is valid, answer.text
    if not valid:
        assert answer.status_code in (400, 422)
