"""Rule conditions (counters, recency, session, context, validity, pages, flags, surfaces) and
segments, on the session's small snapshot."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.rules import conditions
from gateway.snapshot import Snapshot, load_current
from gateway.store import Interaction
from tests.rule_books import NOW, book, facts, model_list, rule, run


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded, _ = load_current(small_snapshots)
    return loaded


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
