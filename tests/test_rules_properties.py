"""Properties of rule evaluation (hypothesis): it never raises on any valid profile and rule set,
every filter holds in the output, and pins land where asked."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.rules import conditions
from gateway.rules.book import Book
from gateway.rules.conditions import Compiler, Context
from gateway.rules.document import SURFACES, Filter, Surface, parse
from gateway.rules.picks import Pick, rounded
from gateway.snapshot import Snapshot, load_current
from gateway.store import Interaction, window_label
from gateway.store.base import DEFAULT_WINDOWS
from tests import rules_reference

NOW = 1_795_000_000.0
EVENTS = ("view", "click", "add_to_cart", "purchase")
WINDOWS = ("1h", "1d", "7d", "30d")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded, _ = load_current(small_snapshots)
    return loaded


def catalog_strategies(snap: Snapshot) -> tuple[Any, Any, Any]:
    items = st.sampled_from(snap.item_ids)
    categories = st.sampled_from(sorted(snap.category_rows))
    tags = st.sampled_from(sorted({t for ts in snap.item_tags for t in ts}) or ["none"])
    return items, categories, tags


def leaf_conditions(items: Any, categories: Any) -> Any:
    count = st.integers(0, 20)
    counter = st.builds(
        lambda event, window, detail, low, high: {
            "counter": {"event": event, "window": window, **detail, "at_least": low, "at_most": low + high}
        },
        st.sampled_from(EVENTS),
        st.sampled_from(WINDOWS),
        st.one_of(st.just({}), items.map(lambda i: {"item": i}), categories.map(lambda c: {"category": c})),
        count,
        count,
    )
    recency = st.builds(
        lambda event, key, span: {"recency": {**({"event": event} if event else {}), key: span}},
        st.one_of(st.none(), st.sampled_from(EVENTS)),
        st.sampled_from(["within", "not_within"]),
        st.sampled_from(["30m", "2h", "1d", "30d"]),
    )
    session = st.builds(
        lambda low, seconds: {"session": {"pages_at_least": low, "seconds_at_most": seconds}},
        count,
        st.integers(0, 7200),
    )
    context = st.builds(
        lambda device, hours, days: {"context": {"device": device, "hours": hours, "weekdays": days}},
        st.lists(st.sampled_from(["mobile", "desktop", "tablet"]), max_size=2),
        st.lists(st.integers(0, 23), max_size=4),
        st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), max_size=3),
    )
    return st.one_of(counter, recency, session, context, st.just({"segment": "heavy"}))


def condition_trees(items: Any, categories: Any) -> Any:
    return st.recursive(
        leaf_conditions(items, categories),
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"all": cs}),
            st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"any": cs}),
            inner.map(lambda c: {"not": c}),
        ),
        max_leaves=6,
    )


def item_matches(items: Any, categories: Any, tags: Any) -> Any:
    return st.one_of(
        st.lists(items, min_size=1, max_size=20).map(lambda ids: {"ids": ids}),
        st.lists(categories, min_size=1, max_size=3).map(lambda cs: {"categories": cs}),
        st.lists(tags, min_size=1, max_size=2).map(lambda ts: {"tags": ts}),
        st.floats(0, 200).map(lambda p: {"price_at_most": p}),
        st.booleans().map(lambda b: {"in_stock": b}),
    )


def actions(items: Any, categories: Any, tags: Any) -> Any:
    matches = item_matches(items, categories, tags)
    return st.one_of(
        matches.map(lambda m: {"type": "filter", "items": m}),
        st.builds(lambda m, w: {"type": "boost", "items": m, "weight": w}, matches, st.floats(0.01, 100)),
        st.builds(lambda i, p: {"type": "pin", "item": i, "position": p}, items, st.integers(1, 15)),
        st.builds(
            lambda ids, p: {"type": "inject", "items": ids, **({"position": p} if p else {})},
            st.lists(items, min_size=1, max_size=4),
            st.one_of(st.none(), st.integers(1, 15)),
        ),
        st.builds(lambda k, d: {"type": "cap", "per_category": k, "depth": d}, st.integers(1, 4), st.integers(1, 2)),
        st.builds(lambda s: {"type": "attach", "slot": s, "content": {"x": 1}}, st.sampled_from(["a", "b"])),
    )


@st.composite
def rule_sets(draw: st.DrawFn, snap: Snapshot) -> dict[str, Any]:
    items, categories, tags = catalog_strategies(snap)
    trees = condition_trees(items, categories)
    count = draw(st.integers(0, 8))
    rules = [
        {
            "id": f"r{index}",
            "priority": draw(st.integers(-3, 3)),
            "actions": draw(st.lists(actions(items, categories, tags), min_size=1, max_size=3)),
            **({"when": draw(trees)} if draw(st.booleans()) else {}),
        }
        for index in range(count)
    ]
    segment = {"id": "heavy", "when": draw(trees.filter(lambda c: "heavy" not in msgspec.json.encode(c).decode()))}
    return {"segments": [segment], "rules": rules}


@st.composite
def profiles(draw: st.DrawFn, snap: Snapshot) -> conditions.Facts:
    items, categories, _ = catalog_strategies(snap)
    names = st.one_of(
        st.sampled_from(EVENTS),
        st.builds(lambda e, i: f"{e}@item:{i}", st.sampled_from(EVENTS), items),
        st.builds(lambda e, c: f"{e}@category:{c}", st.sampled_from(EVENTS), categories),
    )
    keys = st.builds(lambda name, window: f"{name}/{window}", names, st.sampled_from(WINDOWS))
    counters = draw(st.dictionaries(keys, st.integers(1, 50), max_size=12))
    recent = sorted(
        draw(
            st.lists(
                st.builds(Interaction, items, st.sampled_from(EVENTS), st.floats(NOW - 40 * 86400, NOW)), max_size=20
            )
        ),
        key=lambda i: i.ts,
    )
    return conditions.facts(
        draw(st.floats(NOW - 86400 * 365, NOW + 86400 * 365)),
        counters=counters,
        recent=recent,
        last_seen=recent[-1].ts if recent else draw(st.one_of(st.none(), st.floats(NOW - 86400 * 90, NOW))),
        device=draw(st.one_of(st.none(), st.sampled_from(["mobile", "desktop", "tablet"]))),
        country=draw(st.one_of(st.none(), st.sampled_from(["DE", "FR"]))),
    )


def compile_book(snap: Snapshot, doc: dict[str, Any]) -> Book:
    return Book(parse(msgspec.json.encode(doc)), 1, snap, Compiler(DEFAULT_WINDOWS, window_label), strict=False)


def evaluate(book: Book, snap: Snapshot, facts: conditions.Facts, n: int, size: int) -> Any:
    ruling = book.decide(facts, "recommend", personal=True)
    picks = [Pick(row, 1.0 - row / 1000, "user-vector") for row in range(size)]
    popular = [Pick(int(row), 0.1, "popular") for row in snap.popular[""]]
    fired = [] if ruling.plan is None else ruling.plan.rules
    return fired, ruling.apply(picks, n=n, reserve=lambda: popular, allowed=lambda row: True)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), size=st.integers(0, 80))
def test_evaluation_never_raises_and_answers_at_most_n_distinct_items(
    snap: Snapshot, data: st.DataObject, n: int, size: int
) -> None:
    book = compile_book(snap, data.draw(rule_sets(snap)))
    facts = data.draw(profiles(snap))
    _, outcome = evaluate(book, snap, facts, n, size)
    rows = [p.row for p in outcome.picks]
    assert len(rows) <= n
    assert len(rows) == len(set(rows))
    assert all(0 <= row < len(snap.item_ids) for row in rows)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), size=st.integers(0, 80))
def test_every_fired_filter_holds_in_the_output(snap: Snapshot, data: st.DataObject, n: int, size: int) -> None:
    book = compile_book(snap, data.draw(rule_sets(snap)))
    fired, outcome = evaluate(book, snap, data.draw(profiles(snap)), n, size)
    for rule in fired:
        for mask in [book.mask(action.items) for action in rule.rule.actions if isinstance(action, Filter)]:
            assert not any(mask[p.row] for p in outcome.picks), f"{rule.ref} let a filtered item through"


@st.composite
def pin_sets(draw: st.DrawFn, snap: Snapshot, n: int) -> list[tuple[str, int]]:
    """Distinct items at distinct positions within the list."""
    positions = draw(st.lists(st.integers(1, n), min_size=1, max_size=min(n, 5), unique=True))
    rows = draw(
        st.lists(st.integers(0, len(snap.item_ids) - 1), min_size=len(positions), max_size=len(positions), unique=True)
    )
    return [(snap.item_ids[row], position) for row, position in zip(rows, positions, strict=True)]


@SETTINGS
@given(data=st.data(), n=st.integers(1, 20), size=st.integers(0, 80))
def test_pins_land_where_asked(snap: Snapshot, data: st.DataObject, n: int, size: int) -> None:
    pins = data.draw(pin_sets(snap, n))
    items, categories, tags = catalog_strategies(snap)
    others = data.draw(
        st.lists(
            actions(items, categories, tags).filter(lambda a: a["type"] in ("boost", "inject", "attach")), max_size=3
        )
    )
    rules = [
        {
            "id": f"pin{i}",
            "priority": data.draw(st.integers(-3, 3)),
            "actions": [{"type": "pin", "item": item, "position": p}],
        }
        for i, (item, p) in enumerate(pins)
    ]
    rules.append({"id": "other", "actions": others or [{"type": "attach", "slot": "a", "content": {}}]})
    book = compile_book(snap, {"rules": rules})
    _, outcome = evaluate(book, snap, data.draw(profiles(snap)), n, size)
    rows = [p.row for p in outcome.picks]
    for item, position in pins:
        assert position <= len(rows), f"{item} pinned at {position} but the list has {len(rows)}"
        assert rows[position - 1] == snap.row_of[item], f"{item} is not at {position}"


def selected(
    book: Book,
    facts: conditions.Facts,
    every: np.ndarray,
    scores: np.ndarray,
    *,
    n: int,
    refused: set[int],
    reason: str | tuple[str, ...] = "user-vector",
    reserved: int | None = None,
) -> tuple[Any, rules_reference.Answer]:
    """What selecting (Ruling.select, as Recommender._select does) and then Ruling.apply make of the
    candidates `every` the request does not refuse, and what the reference makes of them; the top-up
    from the first `reserved` popular items (all of them by default)."""
    popular = snap_popular(book)[:reserved]
    reserve = [Pick(int(row), round(0.9 - i / 1000, 6), "popular") for i, row in enumerate(popular)]
    ruling = book.decide(facts, "recommend", personal=True)
    assert ruling.plan is not None
    admitted = [i for i, row in enumerate(every.tolist()) if row not in refused]
    positions = [admitted[at] for at in ruling.select(every[admitted], n)]
    picks = [Pick(int(every[at]), 0.0 if ruling.reordered else rounded(float(scores[at])), reason) for at in positions]
    outcome = ruling.apply(
        picks,
        n=n,
        reserve=lambda: (p for p in reserve if p.row not in refused),
        allowed=lambda row: row not in refused,
    )
    candidates = [Pick(int(every[at]), rounded(float(scores[at])), reason) for at in admitted]
    expected = rules_reference.answer(
        book,
        ruling.plan,
        candidates,
        n=n,
        reserve=[p for p in reserve if p.row not in refused],
        allowed=lambda row: row not in refused,
    )
    assert ruling.reordered == expected.reordered
    return outcome, expected


def snap_popular(book: Book) -> list[int]:
    return [int(row) for row in book.snap.popular[""]]


@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), size=st.integers(0, 80))
def test_the_answer_equals_the_reference(snap: Snapshot, data: st.DataObject, n: int, size: int) -> None:
    """Selecting over the action bits and then Ruling.apply make what the rules spelled out one row
    at a time (tests/rules_reference.py) make: the same picks, scores and reasons, the same rules
    credited, the same content."""
    book = compile_book(snap, data.draw(rule_sets(snap)))
    facts = data.draw(profiles(snap))
    plan = book.decide(facts, "recommend", personal=True).plan
    if plan is None:
        return
    # Candidates, and what the list refuses, drawn often from the rows the plan pins and injects.
    placed = [row for _, row, _ in plan.pins] + [row for _, rows, _ in plan.injects for row in rows]
    rows = st.one_of(st.integers(0, len(snap.item_ids) - 1), *([st.sampled_from(placed)] if placed else []))
    every = np.array(data.draw(st.lists(rows, min_size=size, max_size=size, unique=True)), dtype=np.int64)
    values = data.draw(st.lists(st.floats(-2, 2, width=32), min_size=size, max_size=size))
    scores = np.sort(np.array(values, dtype=np.float32))[::-1]
    refused = set(data.draw(st.lists(st.one_of(rows, st.sampled_from(every.tolist() or [0])), max_size=10)))
    reasons: list[str | tuple[str, ...]] = ["user-vector", ("popular", "no-consent:personalization")]
    reason = data.draw(st.sampled_from(reasons))
    reserved = data.draw(st.one_of(st.none(), st.integers(0, 30)))  # a popular list that runs out, or not
    outcome, expected = selected(book, facts, every, scores, n=n, refused=refused, reason=reason, reserved=reserved)
    assert outcome.picks == expected.picks
    assert outcome.refs == expected.refs
    assert outcome.content == expected.content


def test_boosts_that_cancel_out_are_not_named(snap: Snapshot) -> None:
    """Boosts whose product for an item is exactly 1 did not move it: they are not named."""
    item, other = snap.item_ids[3], snap.item_ids[5]
    doc = {
        "rules": [
            {"id": "up", "actions": [{"type": "boost", "items": {"ids": [item]}, "weight": 2.0}]},
            {"id": "down", "actions": [{"type": "boost", "items": {"ids": [item]}, "weight": 0.5}]},
            {"id": "lift", "actions": [{"type": "boost", "items": {"ids": [other]}, "weight": 3.0}]},
        ]
    }
    book = compile_book(snap, doc)
    every = np.arange(20, dtype=np.int64)
    scores = np.linspace(1, 0, 20, dtype=np.float32)
    facts = conditions.facts(NOW, counters={}, recent=[], last_seen=None)
    outcome, expected = selected(book, facts, every, scores, n=10, refused=set())
    assert outcome.picks == expected.picks
    reasons = {p.row: p.reason for p in outcome.picks}
    assert reasons[3] == "user-vector"
    assert reasons[5] == ("user-vector", "rule:lift@1")
    assert outcome.refs == ["rule:lift@1"]


@st.composite
def timed_rule_sets(draw: st.DrawFn, snap: Snapshot) -> dict[str, Any]:
    """rule_sets with validity windows and page, referrer, country, hour and weekday conditions as well."""
    doc = draw(rule_sets(snap))
    instants = st.floats(NOW - 3 * 86400, NOW + 3 * 86400).map(
        lambda t: datetime.fromtimestamp(t, UTC).replace(tzinfo=None).isoformat()
    )
    contexts = st.one_of(
        st.lists(st.sampled_from(["/c/a", "/c/b", "/p/"]), min_size=1, max_size=2).map(
            lambda p: {"context": {"page": p}}
        ),
        st.lists(st.sampled_from(["DE", "FR"]), min_size=1).map(lambda c: {"context": {"country": c}}),
        st.just({"context": {"referrer": ["google"]}}),
        st.lists(st.integers(0, 23), min_size=1, max_size=12).map(lambda h: {"context": {"hours": h}}),
        st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1, max_size=4).map(
            lambda d: {"context": {"weekdays": d}}
        ),
    )
    for index in range(draw(st.integers(0, 4))):
        start, end = sorted(draw(st.lists(instants, min_size=2, max_size=2, unique=True)))
        rule: dict[str, Any] = {
            "id": f"t{index}",
            "actions": [{"type": "attach", "slot": "a", "content": {}}],
            **({"valid_from": start} if draw(st.booleans()) else {}),
            **({"valid_until": end} if draw(st.booleans()) else {}),
        }
        if draw(st.booleans()):
            rule["when"] = draw(contexts)
        doc["rules"].append(rule)
    return doc


@SETTINGS
@given(data=st.data())
def test_a_blank_visitors_remembered_decision_equals_the_full_one(snap: Snapshot, data: st.DataObject) -> None:
    """Book.decide_blank gives the segments and the plan `decide` gives on facts without a profile,
    call after call on one book, also at the instants rules start and stop being valid."""
    book = compile_book(snap, data.draw(timed_rule_sets(snap)))
    boundaries = sorted({t for c in book.rules for t in (c.starts, c.ends) if math.isfinite(t)})
    times = st.one_of(
        st.floats(NOW - 4 * 86400, NOW + 4 * 86400),
        # Just before a boundary and at it: mostly the same second, which the memory's clock must split.
        st.sampled_from(boundaries or [NOW]).map(lambda t: t + data.draw(st.sampled_from([-1.0, -0.001, 0.0, 0.5]))),
    )
    # One request context at a time, asked again at other times: what the memory must tell apart.
    surface: Surface = data.draw(st.sampled_from(SURFACES))
    personal = data.draw(st.booleans())
    device = data.draw(st.one_of(st.none(), st.sampled_from(["mobile", "Desktop"])))
    country = data.draw(st.one_of(st.none(), st.sampled_from(["de", "FR"])))
    referrer = data.draw(st.one_of(st.none(), st.just("https://google.com/")))
    page = data.draw(st.one_of(st.none(), st.sampled_from(["/c/a/1", "/c/b", "/p/9", "/"])))
    for _ in range(data.draw(st.integers(1, 16))):
        now = data.draw(times)
        facts = conditions.facts(now, book.zone, device=device, country=country, referrer=referrer, page=page)
        full = book.decide(facts, surface, personal=personal)
        blank = book.decide_blank(now, surface, Context(device, country, referrer, page), personal=personal)
        assert blank.segments == full.segments
        assert blank.plan is full.plan
