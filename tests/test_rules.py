"""Rule sets as data: validation that names the rule and field, conditions, actions, and the
documented conflict resolution, on the session's small snapshot."""

from __future__ import annotations

import dataclasses
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from gateway.rules import conditions
from gateway.rules.book import Book
from gateway.rules.conditions import Compiler
from gateway.rules.document import Filter, RuleSetError, parse
from gateway.rules.picks import Pick
from gateway.snapshot import Snapshot, attribute_keys, load_current, rows_by_name
from gateway.store import Interaction, window_label
from gateway.store.base import DEFAULT_WINDOWS
from index_builder.schema import Attribute

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC).timestamp()  # a Friday, 15:30 UTC


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded, _ = load_current(small_snapshots)
    return loaded


def book(snap: Snapshot, doc: dict[str, Any], version: int = 1, **options: Any) -> Book:
    return Book(parse(msgspec.json.encode(doc)), version, snap, Compiler(DEFAULT_WINDOWS, window_label), **options)


def facts(**given: Any) -> conditions.Facts:
    return conditions.facts(given.pop("now", NOW), **given)


def model_list(snap: Snapshot, size: int = 60) -> list[Pick]:
    """A stand-in for the model's answer: the first `size` rows, falling scores."""
    return [Pick(row, round(1.0 - row / 1000, 6), "user-vector") for row in range(size)]


def run(b: Book, snap: Snapshot, f: conditions.Facts | None = None, *, n: int = 10, size: int = 60) -> Any:
    f = f or facts()
    ruling = b.decide(f, "recommend", personal=True)
    popular = [Pick(int(row), 0.5, "popular") for row in snap.popular[""]]
    return ruling.apply(model_list(snap, size), n=n, reserve=lambda: popular, allowed=lambda row: True)


def category_of(snap: Snapshot, row: int) -> str:
    return snap.categories[row][0].split("/")[0]


def rule(rule_id: str, *actions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "actions": list(actions), **fields}


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


# -- conditions -------------------------------------------------------------------------------------


def test_a_counter_condition_reads_the_profile_counters(snap: Snapshot) -> None:
    item = snap.item_ids[7]
    when = {"counter": {"event": "view", "item": item, "window": "7d", "at_least": 3}}
    b = book(snap, {"rules": [rule("r", {"type": "pin", "item": snap.item_ids[59], "position": 1}, when=when)]})
    assert b.needs_counters
    assert run(b, snap, facts(counters={f"view@item:{item}/7d": 3})).picks[0].row == 59
    assert run(b, snap, facts(counters={f"view@item:{item}/7d": 2})).picks[0].row == 0


def test_no_purchase_in_30_days_holds_for_a_zero_counter(snap: Snapshot) -> None:
    when = {"counter": {"event": "purchase", "window": "30d", "at_most": 0}}
    b = book(snap, {"rules": [rule("winback", {"type": "attach", "slot": "s", "content": {}}, when=when)]})
    assert b.fired(facts(counters={"view/30d": 5}), "recommend")
    assert not b.fired(facts(counters={"purchase/30d": 1}), "recommend")


def test_recency_looks_at_the_newest_event_of_the_type(snap: Snapshot) -> None:
    when = {"recency": {"event": "add_to_cart", "within": "1h"}}
    b = book(snap, {"rules": [rule("r", {"type": "attach", "slot": "s", "content": {}}, when=when)]})
    recent = [Interaction("i1", "add_to_cart", NOW - 1800), Interaction("i2", "view", NOW - 60)]
    assert b.fired(facts(recent=recent), "recommend")
    assert not b.fired(facts(recent=[Interaction("i1", "add_to_cart", NOW - 7200)]), "recommend")
    quiet = book(
        snap,
        {"rules": [rule("q", {"type": "attach", "slot": "s", "content": {}}, when={"recency": {"not_within": "1d"}})]},
    )
    assert quiet.fired(facts(), "recommend")  # never seen counts as quiet
    assert not quiet.fired(facts(last_seen=NOW - 60), "recommend")


def test_session_facts_count_the_views_since_the_last_30_minute_gap(snap: Snapshot) -> None:
    recent = [
        Interaction("i1", "view", NOW - 7200),  # an earlier session
        Interaction("i2", "view", NOW - 600),
        Interaction("i3", "click", NOW - 400),
        Interaction("i4", "view", NOW - 100),
    ]
    f = facts(recent=recent)
    assert f.session() == (2, 600.0)
    when = {"session": {"pages_at_least": 2, "seconds_at_least": 300}}
    b = book(snap, {"rules": [rule("engaged", {"type": "attach", "slot": "s", "content": {}}, when=when)]})
    assert b.fired(f, "recommend")
    assert not b.fired(facts(recent=recent[:2]), "recommend")


def test_context_conditions_use_the_rule_sets_time_zone(snap: Snapshot) -> None:
    when = {"context": {"device": ["mobile"], "hours": [16], "weekdays": ["fri"], "country": ["de"]}}
    doc = {
        "timezone": "Europe/Berlin",
        "rules": [rule("evening", {"type": "attach", "slot": "s", "content": {}}, when=when)],
    }
    b = book(snap, doc)
    local = conditions.facts(NOW, b.zone, device="Mobile", country="DE")  # 15:30 UTC is 16:30 in Berlin
    assert b.fired(local, "recommend")
    assert not b.fired(conditions.facts(NOW, b.zone, device="desktop", country="DE"), "recommend")
    assert not b.fired(conditions.facts(NOW + 3600, b.zone, device="mobile", country="DE"), "recommend")


def test_referrer_and_page_match_a_part_and_a_prefix(snap: Snapshot) -> None:
    when = {"all": [{"context": {"referrer": ["google."]}}, {"context": {"page": ["/sale"]}}]}
    b = book(snap, {"rules": [rule("seo", {"type": "attach", "slot": "s", "content": {}}, when=when)]})
    assert b.fired(facts(referrer="https://www.google.com/search", page="/sale/shoes"), "recommend")
    assert not b.fired(facts(referrer="https://www.google.com/search", page="/shoes"), "recommend")


def test_all_any_and_not_combine(snap: Snapshot) -> None:
    when = {
        "any": [
            {
                "all": [
                    {"counter": {"event": "view", "at_least": 5}},
                    {"not": {"counter": {"event": "purchase", "at_least": 1}}},
                ]
            },
            {"context": {"device": ["tablet"]}},
        ]
    }
    b = book(snap, {"rules": [rule("r", {"type": "attach", "slot": "s", "content": {}}, when=when)]})
    assert b.fired(facts(counters={"view/30d": 5}), "recommend")
    assert not b.fired(facts(counters={"view/30d": 5, "purchase/30d": 1}), "recommend")
    assert b.fired(facts(counters={"view/30d": 5, "purchase/30d": 1}, device="tablet"), "recommend")


def test_a_rule_outside_its_validity_window_does_not_fire(snap: Snapshot) -> None:
    doc = {
        "timezone": "UTC",
        "rules": [
            rule("future", {"type": "attach", "slot": "a", "content": {}}, valid_from="2026-12-01T00:00:00"),
            rule("past", {"type": "attach", "slot": "b", "content": {}}, valid_until="2026-11-01T00:00:00Z"),
            rule(
                "now",
                {"type": "attach", "slot": "c", "content": {}},
                valid_from="2026-11-01T00:00:00Z",
                valid_until="2026-12-01T00:00:00Z",
            ),
        ],
    }
    assert [r.id for r in book(snap, doc).fired(facts(), "recommend")] == ["now"]


def test_a_pages_rules_fire_only_while_they_are_valid(
    snap: Snapshot,
) -> None:
    ends = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    doc = {
        "timezone": "UTC",
        "rules": [
            rule("shoes", {"type": "attach", "slot": "a", "content": {}}, when={"context": {"page": ["/c/shoes"]}}),
            rule(
                "sale",
                {"type": "attach", "slot": "b", "content": {}},
                when={"context": {"page": ["/c/shoes", "/c/books"]}},
                valid_until="2026-12-01T00:00:00Z",
            ),
        ],
    }
    b = book(snap, doc)
    for _ in range(2):  # the same answers when asked again
        assert [r.id for r in b.fired(facts(page="/c/shoes/boots", now=ends - 1), "recommend")] == ["sale", "shoes"]
        assert [r.id for r in b.fired(facts(page="/c/shoes/boots", now=ends), "recommend")] == ["shoes"]
        assert [r.id for r in b.fired(facts(page="/c/books", now=ends - 1), "recommend")] == ["sale"]
        assert b.fired(facts(page="/c/toys", now=ends - 1), "recommend") == []


def test_every_page_under_a_prefix_fires_its_rules(snap: Snapshot) -> None:
    doc = {
        "rules": [rule("shoes", {"type": "attach", "slot": "a", "content": {}}, when={"context": {"page": ["/c/s"]}})]
    }
    b = book(snap, doc)
    for page in ("/c/shoes", "/c/socks", "/c/shoes", "/c/toys", "/c/socks"):
        assert [r.id for r in b.fired(facts(page=page), "recommend")] == ([] if page == "/c/toys" else ["shoes"])


def test_the_hour_and_weekday_of_a_request_are_exact_at_their_boundaries() -> None:
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    midnight = datetime(2026, 11, 22, tzinfo=berlin).timestamp()  # a Sunday begins (local time)
    before = conditions.facts(midnight - 0.001, berlin)
    assert (before.local.weekday(), before.local.hour) == (5, 23)
    for now in (midnight, midnight + 0.25, midnight + 0.999):
        assert (conditions.facts(now, berlin).local.weekday(), conditions.facts(now, berlin).local.hour) == (6, 0)
    # the same instant in another zone is its own local time, not the one made a moment ago
    assert conditions.facts(midnight, UTC).local.hour == 23
    assert conditions.facts(midnight, berlin).local.hour == 0


def test_flags_override_a_rules_enabled_field(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("on", {"type": "attach", "slot": "a", "content": {}}),
            rule("off", {"type": "attach", "slot": "b", "content": {}}, enabled=False),
        ]
    }
    assert [r.id for r in book(snap, doc).fired(facts(), "recommend")] == ["on"]
    flipped = book(snap, doc, flags={"on": False, "off": True})
    assert [r.id for r in flipped.fired(facts(), "recommend")] == ["off"]


def test_a_rule_applies_only_to_its_surfaces(snap: Snapshot) -> None:
    doc = {"rules": [rule("pdp", {"type": "attach", "slot": "a", "content": {}}, surfaces=["similar"])]}
    b = book(snap, doc)
    assert not b.fired(facts(), "recommend")
    assert b.fired(facts(), "similar")


# -- segments ---------------------------------------------------------------------------------------


def test_predicate_segments_are_assigned_in_order_and_rules_can_use_them(snap: Snapshot) -> None:
    doc = {
        "segments": [
            {"id": "frequent-buyers", "when": {"counter": {"event": "purchase", "window": "30d", "at_least": 3}}},
            {
                "id": "vip",
                "when": {"all": [{"segment": "frequent-buyers"}, {"counter": {"event": "view", "at_least": 10}}]},
            },
            {"id": "new-visitors", "when": {"recency": {"not_within": "30d"}}},
        ],
        "rules": [
            rule("vip-offer", {"type": "attach", "slot": "offer", "content": {"code": "VIP"}}, when={"segment": "vip"})
        ],
    }
    b = book(snap, doc)
    buyer = facts(counters={"purchase/30d": 3, "view/30d": 12}, last_seen=NOW - 60)
    assert [s for s in b.segments(buyer, personal=True) if not s.startswith("model:")] == ["frequent-buyers", "vip"]
    assert [r.id for r in b.fired(buyer, "recommend")] == ["vip-offer"]
    stranger = facts()
    assert b.segments(stranger, personal=False) == ["new-visitors"]


def test_the_snapshots_model_segment_is_assigned_from_the_live_profile(snap: Snapshot) -> None:
    assert snap.segment_model is not None
    b = book(snap, {"rules": [rule("m", {"type": "attach", "slot": "s", "content": {}}, when={"segment": "model:0"})]})
    found = b.segments(facts(counters={"view/30d": 4}, last_seen=NOW - 60), personal=True)
    assert [s for s in found if s.startswith("model:")] and len(found) == 1
    assert b.segments(facts(), personal=False) == []


def test_no_fired_rule_leaves_the_model_list_untouched(snap: Snapshot) -> None:
    b = book(
        snap,
        {
            "rules": [
                rule(
                    "never", {"type": "filter", "items": {"tags": ["premium"]}}, when={"context": {"device": ["watch"]}}
                )
            ]
        },
    )
    outcome = run(b, snap)
    assert outcome.picks == model_list(snap)[:10]
    assert outcome.applied == [] and not np.isnan([p.score for p in outcome.picks]).any()


def test_a_book_reads_only_the_counters_its_conditions_and_segment_model_use(snap: Snapshot) -> None:
    doc = {
        "segments": [{"id": "buyers", "when": {"counter": {"event": "purchase", "window": "30d", "at_least": 1}}}],
        "rules": [
            rule(
                "r",
                {"type": "cap", "per_category": 2},
                when={"not": {"counter": {"event": "view", "item": "i9", "window": "7d", "at_most": 0}}},
            )
        ],
    }
    keys = {c.key: (c.name, c.window) for c in book(snap, doc).counter_query}
    assert keys["purchase/30d"] == ("purchase", 30 * 86_400.0)
    assert keys["view@item:i9/7d"] == ("view@item:i9", 7 * 86_400.0)
    assert snap.segment_model is not None  # its features' counters are read too
    assert set(snap.segment_model.counter_names()) <= set(keys)
    plain = book(snap, {"rules": [rule("plain", {"type": "cap", "per_category": 2})]})
    assert {c.key for c in plain.counter_query} == set(snap.segment_model.counter_names())


def test_a_boosted_pick_names_each_of_its_boosts_by_priority(snap: Snapshot) -> None:
    doc = {
        "rules": [
            rule("lift", {"type": "boost", "items": {"ids": [snap.item_ids[3], snap.item_ids[5]]}, "weight": 4.0}),
            rule("more", {"type": "boost", "items": {"ids": [snap.item_ids[5]]}, "weight": 2.0}),
        ]
    }
    outcome = run(book(snap, doc), snap, size=30)
    assert [(p.row, p.reason) for p in outcome.picks[:3]] == [
        (5, ("user-vector", "rule:lift@1", "rule:more@1")),
        (3, ("user-vector", "rule:lift@1")),
        (0, "user-vector"),
    ]


def test_a_book_of_many_filters_and_boosts_credits_exactly_the_rules_that_changed_the_list(snap: Snapshot) -> None:
    """Past 64 filter and boost actions (more than one 64-bit word of action bits per item) every
    action holds: 80 filters drop rows 0-79, ahead of the tenth kept row, so each changed the
    answer; ten boosts lift rows 80-89 to the top, named on their picks; ten weak ones on rows
    150-159 lift nothing into the answer and are not named."""
    drops = [rule(f"f{i:02d}", {"type": "filter", "items": {"ids": [snap.item_ids[i]]}}) for i in range(80)]
    lifts = [
        rule(f"b{i}", {"type": "boost", "items": {"ids": [snap.item_ids[80 + i]]}, "weight": 100.0 * (i + 1)})
        for i in range(10)
    ]
    weak = [
        rule(f"w{i}", {"type": "boost", "items": {"ids": [snap.item_ids[150 + i]]}, "weight": 1.5}) for i in range(10)
    ]
    outcome = run(book(snap, {"rules": drops + lifts + weak}), snap, size=200)
    assert [p.row for p in outcome.picks] == list(range(89, 79, -1))
    assert outcome.picks[0].reason == ("user-vector", "rule:b9@1")
    assert sorted(outcome.refs) == sorted([f"rule:f{i:02d}@1" for i in range(80)] + [f"rule:b{i}@1" for i in range(10)])


@pytest.mark.parametrize("hostile", ["x') or True or ('", '"\n__import__("os")\n', "\\", "{0}"])
def test_rule_set_text_is_matched_as_text(snap: Snapshot, hostile: str) -> None:
    attach = {"type": "attach", "slot": "a", "content": {"x": 1}}
    doc = {
        "segments": [{"id": "odd", "when": {"context": {"referrer": [hostile]}}}],
        "rules": [
            rule("r", attach, when={"context": {"page": [hostile], "hours": list(range(24))}}),
            rule("s", attach, when={"segment": "odd"}),
        ],
    }
    b = book(snap, doc)
    for page, referrer, fired in [(hostile + "/x", hostile, ["r", "s"]), ("/c/a", "google", []), (None, None, [])]:
        ruling = b.decide(facts(page=page, referrer=referrer), "recommend", personal=True)
        assert sorted(c.id for c in (ruling.plan.rules if ruling.plan else [])) == fired
        assert ("odd" in ruling.segments) == bool(fired)


def test_a_deeply_nested_condition_is_evaluated(snap: Snapshot) -> None:
    """105 levels of "not" around a segment: an odd number of them is "not in the segment"."""
    when: dict[str, Any] = {"segment": "a"}
    for _ in range(105):
        when = {"not": when}
    doc = {
        "segments": [{"id": "a", "when": {"context": {"device": ["mobile"]}}}, {"id": "b", "when": when}],
        "rules": [rule("r", {"type": "attach", "slot": "a", "content": {}}, when=when)],
    }
    b = book(snap, doc)
    for device, fired, segments in (("mobile", [], ["a"]), ("desktop", ["r"], ["b"])):
        ruling = b.decide(facts(device=device), "recommend", personal=False)
        assert [c.id for c in (ruling.plan.rules if ruling.plan else [])] == fired
        assert ruling.segments == segments
