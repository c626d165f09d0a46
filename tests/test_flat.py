"""Conditions as generated code (gateway.rules.flat) decide exactly what their closures decide."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.rules import conditions, flat
from gateway.rules.conditions import Compiler, Condition
from gateway.rules.segments import SegmentDefinition, Segmenter
from gateway.snapshot import Snapshot, load_current
from gateway.store import window_label
from gateway.store.base import DEFAULT_WINDOWS
from tests.test_rules_properties import (
    NOW,
    SETTINGS,
    catalog_strategies,
    compile_book,
    condition_trees,
    profiles,
)

COMPILER = Compiler(DEFAULT_WINDOWS, window_label)


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded, _ = load_current(small_snapshots)
    return loaded


# Text a rule set may hold that would break generated code if it were ever pasted into it.
HOSTILE = ["x') or True or ('", '"\n__import__("os")\n', "\\", "{0}", "_v0"]


def context_conditions() -> Any:
    """Context matches with every part, hostile text included, and recency over any event."""
    context = st.fixed_dictionaries(
        {},
        optional={
            "device": st.lists(st.sampled_from(["Mobile", "desktop", *HOSTILE]), min_size=1, max_size=2),
            "country": st.lists(st.sampled_from(["de", "FR"]), min_size=1, max_size=2),
            "referrer": st.lists(st.sampled_from(["google", "news", *HOSTILE]), min_size=1, max_size=2),
            "page": st.lists(st.sampled_from(["/c/a", "/p/", *HOSTILE]), min_size=1, max_size=2),
            "hours": st.lists(st.integers(0, 23), min_size=1, max_size=3),
            "weekdays": st.lists(st.sampled_from(["mon", "sat", "sun"]), min_size=1, max_size=2),
        },
    ).map(lambda match: {"context": match})
    recency = st.builds(
        lambda key, span: {"recency": {key: span}},
        st.sampled_from(["within", "not_within"]),
        st.sampled_from(["30m", "2h", "1d", "30d"]),
    )
    return st.one_of(context, recency, st.just({"all": []}), st.just({"any": []}))


@st.composite
def trees(draw: st.DrawFn, snap: Snapshot) -> Condition:
    items, categories, _ = catalog_strategies(snap)
    leaves = st.one_of(condition_trees(items, categories), context_conditions())
    tree = draw(
        st.recursive(
            leaves,
            lambda inner: st.one_of(
                st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"all": cs}),
                st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"any": cs}),
                inner.map(lambda c: {"not": c}),
            ),
            max_leaves=5,
        )
    )
    return msgspec.convert(tree, Condition)


@st.composite
def facts(draw: st.DrawFn, snap: Snapshot) -> conditions.Facts:
    """A profile, and a request context that the hostile text may match."""
    found = draw(profiles(snap))
    texts = ["/c/a/1", "https://news.example/", *HOSTILE, *(h + "/more" for h in HOSTILE)]
    found.page = draw(st.one_of(st.none(), st.sampled_from(texts)))
    found.referrer = draw(st.one_of(st.none(), st.sampled_from(texts)))
    found.device = draw(st.one_of(st.none(), st.sampled_from(["mobile", *HOSTILE])))
    return found


@SETTINGS
@given(data=st.data())
def test_generated_segments_and_fired_groups_equal_the_closures(snap: Snapshot, data: st.DataObject) -> None:
    """Segments in order (later ones may ask for earlier ones) and groups with validity windows."""
    count = data.draw(st.integers(1, 5))
    definitions = [(f"s{k}", data.draw(trees(snap))) for k in range(count)]
    # Later segments ask for earlier ones ("heavy" is the first).
    definitions[0] = ("heavy", definitions[0][1])
    made = flat.segments_function(definitions, COMPILER)
    assert made is not None
    bounds = st.one_of(st.just(-math.inf), st.just(math.inf), st.floats(NOW - 86400 * 400, NOW + 86400 * 400))
    checks = [
        (index, data.draw(st.one_of(st.none(), trees(snap))), data.draw(bounds), data.draw(bounds))
        for index in data.draw(st.lists(st.integers(0, 40), max_size=8))
    ]
    fire = flat.fired_function(checks, COMPILER)
    assert fire is not None
    closures = [(ident, COMPILER.compile(when)) for ident, when in definitions]
    compiled = [(index, None if when is None else COMPILER.compile(when), s, e) for index, when, s, e in checks]
    for _ in range(data.draw(st.integers(1, 6))):
        given_facts = data.draw(facts(snap))
        one, other = (dataclasses.replace(given_facts, segments=set(given_facts.segments)) for _ in range(2))
        for ident, predicate in closures:
            if predicate(one):
                one.segments.add(ident)
        made(other)
        assert other.segments == one.segments
        expected = {i for i, when, s, e in compiled if s <= one.now < e and (when is None or when(one))}
        assert fire(one) == sum(1 << i for i in expected)


def nested(depth: int) -> Condition:
    tree: dict[str, Any] = {"segment": "a"}
    for _ in range(depth):
        tree = {"not": tree}
    return msgspec.convert(tree, Condition)


def test_a_condition_too_deep_for_generated_code_keeps_its_closure(snap: Snapshot) -> None:
    deep = nested(flat.DEPTH_MAX + 5)
    assert flat.segments_function([("b", deep)], COMPILER) is None
    assert flat.fired_function([(0, deep, -math.inf, math.inf)], COMPILER) is None
    assert flat.segments_function([("b", nested(flat.DEPTH_MAX))], COMPILER) is not None
    # The segmenter then asks the closures: an odd number of "not" around "a" is "not a".
    segmenter = Segmenter([SegmentDefinition("b", deep)], COMPILER)
    assert segmenter.assign(conditions.facts(NOW), personal=False) == ["b"]
    member = conditions.facts(NOW)
    member.segments.add("a")
    assert segmenter.assign(member, personal=False) == ["a"]
    # A book with such a rule checks its groups one closure at a time.
    when = msgspec.to_builtins(deep)
    attach = {"type": "attach", "slot": "a", "content": {"x": 1}}
    book = compile_book(
        snap,
        {
            "segments": [{"id": "a", "when": {"context": {"device": ["mobile"]}}}],
            "rules": [{"id": "r", "when": when, "actions": [attach]}],
        },
    )
    assert book._fire["recommend"] is None
    for device, fired in (("mobile", []), ("desktop", ["r"])):
        ruling = book.decide(conditions.facts(NOW, device=device), "recommend", personal=True)
        assert [c.rule.id for c in (ruling.plan.rules if ruling.plan else [])] == fired


@pytest.mark.parametrize("hostile", HOSTILE)
def test_rule_set_text_is_matched_as_text_never_run(hostile: str, snap: Snapshot) -> None:
    every_hour, attach = list(range(24)), {"type": "attach", "slot": "a", "content": {"x": 1}}
    book = compile_book(
        snap,
        {
            "segments": [{"id": "odd", "when": {"context": {"referrer": [hostile]}}}],
            "rules": [
                # Not a page-only condition (those are matched by a scan of their prefixes): generated.
                {"id": "r", "when": {"context": {"page": [hostile], "hours": every_hour}}, "actions": [attach]},
                {"id": "s", "when": {"segment": "odd"}, "actions": [attach]},
            ],
        },
    )
    assert book._fire["recommend"] is not None
    for page, referrer, fired in [(hostile + "/x", hostile, ["r", "s"]), ("/c/a", "google", []), (None, None, [])]:
        ruling = book.decide(conditions.facts(NOW, page=page, referrer=referrer), "recommend", personal=True)
        assert sorted(c.rule.id for c in (ruling.plan.rules if ruling.plan else [])) == fired
        assert ("odd" in ruling.segments) == bool(fired)
