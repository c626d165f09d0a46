"""Rule sets as data: validation that names the rule and field, the actions, and the documented
conflict resolution, on the session's small snapshot (conditions and segments: test_rules_conditions)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import msgspec
import numpy as np
import pytest

from gateway.rules.document import Filter, RuleSetError, parse
from gateway.rules.picks import Pick
from gateway.snapshot import Snapshot, attribute_keys, load_current, rows_by_name
from index_builder.schema import Attribute
from tests.rule_books import book, category_of, facts, model_list, rule, run


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded, _ = load_current(small_snapshots)
    return loaded


# -- validation -------------------------------------------------------------------------------------


def test_an_invalid_field_is_reported_with_its_rule_id_and_path(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("fine", {"type": "cap", "per_category": 2}),
            rule("bad-boost", {"type": "boost", "items": {"tags": ["x"]}, "weight": -1}),
        ]
    }
    with pytest.raises(RuleSetError) as caught:
        parse(msgspec.json.encode(doc))
    assert caught.value.rule == "bad-boost"
    assert caught.value.field == "rules[1].actions[0].weight"
    assert "bad-boost" in str(caught.value)


def test_an_unknown_action_type_is_reported_with_its_rule(snap: Snapshot) -> None:
    with pytest.raises(RuleSetError) as caught:
        parse(msgspec.json.encode({"rules": [rule("r1", {"type": "explode"})]}))
    assert caught.value.rule == "r1"
    assert caught.value.field == "rules[0].actions[0].type"


def test_a_condition_with_two_kinds_is_refused(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule(
                "two",
                {"type": "cap", "per_category": 1},
                when={"segment": "a", "counter": {"event": "view", "at_least": 1}},
            )
        ]
    }
    with pytest.raises(RuleSetError) as caught:
        parse(msgspec.json.encode(doc))
    assert caught.value.rule == "two"
    assert "exactly one" in str(caught.value)


def test_a_window_the_gateway_does_not_count_is_refused_on_compile(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule(
                "w",
                {"type": "cap", "per_category": 1},
                when={"counter": {"event": "view", "window": "3d", "at_least": 1}},
            )
        ]
    }
    with pytest.raises(RuleSetError) as caught:
        book(snap, doc)
    assert (caught.value.rule, caught.value.field) == ("w", "rules[0].when")
    assert "1h, 1d, 7d, 30d" in str(caught.value)


def test_an_undefined_segment_is_refused(snap: Snapshot) -> None:
    doc = {"rules": [rule("s", {"type": "cap", "per_category": 1}, when={"segment": "vip"})]}
    with pytest.raises(RuleSetError, match="unknown segment 'vip'"):
        book(snap, doc)


def test_a_segment_may_only_refer_to_segments_defined_before_it(snap: Snapshot) -> None:
    doc = {
        "segments": [
            {"id": "a", "when": {"segment": "b"}},
            {"id": "b", "when": {"counter": {"event": "view", "at_least": 1}}},
        ]
    }
    with pytest.raises(RuleSetError) as caught:
        book(snap, doc)
    assert (caught.value.rule, caught.value.field) == ("a", "segments[0].when")


def test_ids_must_be_unique(snap: Snapshot) -> None:
    doc = {
        "rules": [rule("same", {"type": "cap", "per_category": 1}), rule("same", {"type": "cap", "per_category": 2})]
    }
    with pytest.raises(RuleSetError) as caught:
        book(snap, doc)
    assert caught.value.field == "rules[1].id"


def test_a_pin_of_an_item_outside_the_catalog_is_refused_when_strict_and_skipped_otherwise(snap: Snapshot) -> None:
    doc = {"rules": [rule("p", {"type": "pin", "item": "nope", "position": 1}, {"type": "cap", "per_category": 3})]}
    with pytest.raises(RuleSetError) as caught:
        book(snap, doc)
    assert caught.value.field == "rules[0].actions[0].item"
    lenient = book(snap, doc, strict=False)
    assert lenient.warnings and "nope" in lenient.warnings[0]
    assert lenient.rules[0].cap == (3, 1)


def test_an_unknown_time_zone_is_refused(snap: Snapshot) -> None:
    with pytest.raises(RuleSetError, match="time zone"):
        book(snap, {"timezone": "Mars/Olympus"})


# -- actions ----------------------------------------------------------------------------------------


def test_a_filter_removes_matching_items_and_the_list_stays_full(snap: Snapshot) -> None:
    top = category_of(snap, 0)
    outcome = run(book(snap, {"rules": [rule("no-top", {"type": "filter", "items": {"categories": [top]}})]}), snap)
    assert len(outcome.picks) == 10
    assert all(category_of(snap, p.row) != top for p in outcome.picks)
    assert [r.ref for r in outcome.applied] == ["rule:no-top@1"]


def test_filters_by_price_stock_and_tags(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("cheap", {"type": "filter", "items": {"price_at_most": 20}}),
            rule("gone", {"type": "filter", "items": {"in_stock": False}}),
            rule("tagged", {"type": "filter", "items": {"tags": ["premium"]}}),
        ]
    }
    outcome = run(book(snap, doc), snap, n=20)
    assert len(outcome.picks) == 20
    for pick in outcome.picks:
        assert not snap.prices[pick.row] <= 20
        assert snap.stock[pick.row] != 0
        assert "premium" not in snap.item_tags[pick.row]


def test_filters_and_boosts_by_the_catalogs_other_attributes(snap: Snapshot) -> None:
    brands = ["acme", "zeta", "acme"]  # rows 0-2; a whole-number value matches however it is written
    given: list[Mapping[str, Attribute]] = [{"brand": brand, "pack": 6.0} for brand in brands]
    given += [{}] * (len(snap.item_ids) - 3)
    keys = [attribute_keys(attributes) for attributes in given]
    branded = dataclasses.replace(snap, item_attributes=given, attribute_rows=rows_by_name(keys))
    doc = {"rules": [rule("no-acme", {"type": "filter", "items": {"attributes": {"brand": ["acme"], "pack": [6]}}})]}
    action = parse(msgspec.json.encode(doc)).rules[0].actions[0]
    assert isinstance(action, Filter)
    mask = book(branded, doc).mask(action.items)
    assert np.flatnonzero(mask).tolist() == [0, 2]
    picks = [Pick(row, 1.0 - row / 100, "test") for row in range(12)]
    outcome = (
        book(branded, doc)
        .decide(facts(), "recommend", personal=True)
        .apply(picks, n=10, reserve=lambda: iter(()), allowed=lambda row: True)
    )
    assert [p.row for p in outcome.picks] == [1, *range(3, 12)]
    assert [r.ref for r in outcome.applied] == ["rule:no-acme@1"]
    lift = {"type": "boost", "items": {"attributes": {"brand": ["zeta", "none-such"]}}, "weight": 100}
    boosted = book(branded, {"rules": [rule("zeta-first", lift)]}).decide(facts(), "recommend", personal=True)
    assert boosted.apply(picks, n=10, reserve=lambda: iter(()), allowed=lambda row: True).picks[0].row == 1
    with pytest.raises(RuleSetError):
        parse(msgspec.json.encode({"rules": [rule("empty", {"type": "filter", "items": {"attributes": {}}})]}))


def test_a_boost_moves_matching_items_up_and_names_the_rule(snap: Snapshot) -> None:
    target = category_of(snap, 40)
    b = book(snap, {"rules": [rule("lift", {"type": "boost", "items": {"categories": [target]}, "weight": 50})]})
    outcome = run(b, snap)
    first = outcome.picks[0]
    assert category_of(snap, first.row) == target
    assert "rule:lift@1" in first.reason
    assert [p.score for p in outcome.picks] == sorted((p.score for p in outcome.picks), reverse=True)


def test_a_bury_moves_matching_items_down(snap: Snapshot) -> None:
    b = book(snap, {"rules": [rule("sink", {"type": "boost", "items": {"ids": [snap.item_ids[0]]}, "weight": 0.01})]})
    outcome = run(b, snap)
    assert 0 not in [p.row for p in outcome.picks]


def test_a_pin_lands_at_its_position(snap: Snapshot) -> None:
    item = snap.item_ids[55]
    outcome = run(book(snap, {"rules": [rule("hero", {"type": "pin", "item": item, "position": 3})]}), snap)
    assert outcome.picks[2].row == 55
    assert outcome.picks[2].reason == ("rule:hero@1",)
    assert len(outcome.picks) == 10 and len({p.row for p in outcome.picks}) == 10


def test_a_pin_below_the_end_of_a_short_list_lands_last_and_is_named_among_the_rules(snap: Snapshot) -> None:
    b = book(snap, {"rules": [rule("deep", {"type": "pin", "item": snap.item_ids[55], "position": 8})]})
    ruling = b.decide(facts(), "recommend", personal=True)
    outcome = ruling.apply(model_list(snap, 2), n=10, reserve=lambda: [], allowed=lambda row: True)
    assert [p.row for p in outcome.picks] == [0, 1, 55]
    assert outcome.picks[-1].reason == ("rule:deep@1",)
    assert [r.ref for r in outcome.applied] == ["rule:deep@1"]


def test_an_injected_item_takes_the_last_place_without_a_position(snap: Snapshot) -> None:
    items = [snap.item_ids[300], snap.item_ids[301]]
    outcome = run(book(snap, {"rules": [rule("xsell", {"type": "inject", "items": items})]}), snap)
    assert [p.row for p in outcome.picks[-2:]] == [300, 301]
    assert outcome.picks[-1].reason == "rule:xsell@1"


def test_a_cap_limits_items_per_top_level_category(snap: Snapshot) -> None:
    outcome = run(book(snap, {"rules": [rule("diverse", {"type": "cap", "per_category": 1})]}), snap, n=8)
    tops = [category_of(snap, p.row) for p in outcome.picks]
    assert len(tops) == 8 and len(set(tops)) == 8


def test_attached_content_comes_once_per_slot_from_the_highest_priority(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("low", {"type": "attach", "slot": "banner", "content": {"text": "low"}}, priority=1),
            rule("high", {"type": "attach", "slot": "banner", "content": {"text": "high"}}, priority=9),
            rule("side", {"type": "attach", "slot": "side", "content": {"offer": "10%"}}),
        ]
    }
    outcome = run(book(snap, doc), snap)
    assert [(c.slot, c.rule, c.content) for c in outcome.content] == [
        ("banner", "rule:high@1", {"text": "high"}),
        ("side", "rule:side@1", {"offer": "10%"}),
    ]


# -- conflicts --------------------------------------------------------------------------------------


def test_for_one_position_the_higher_priority_pin_wins(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("a-low", {"type": "pin", "item": snap.item_ids[50], "position": 1}, priority=1),
            rule("b-high", {"type": "pin", "item": snap.item_ids[51], "position": 1}, priority=5),
        ]
    }
    outcome = run(book(snap, doc), snap)
    assert outcome.picks[0].row == 51


def test_equal_priorities_are_ordered_by_rule_id(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("zeta", {"type": "pin", "item": snap.item_ids[50], "position": 1}),
            rule("alpha", {"type": "pin", "item": snap.item_ids[51], "position": 1}),
        ]
    }
    assert run(book(snap, doc), snap).picks[0].row == 51
    assert [r.id for r in book(snap, doc).rules] == ["alpha", "zeta"]


def test_a_filter_holds_against_a_pin_and_an_injection(snap: Snapshot) -> None:
    item = snap.item_ids[55]
    doc = {
        "rules": [
            rule("hide", {"type": "filter", "items": {"ids": [item]}}, priority=-5),
            rule("show", {"type": "pin", "item": item, "position": 1}, {"type": "inject", "items": [item]}, priority=5),
        ]
    }
    assert 55 not in [p.row for p in run(book(snap, doc), snap).picks]
