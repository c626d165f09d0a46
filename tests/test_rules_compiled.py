"""The rule book's compiled machinery: the per-row codes and their 63-action limit, the compiled
answer's checks on what it hands the kernel, the applied rules' decoding, the remembered decisions
of blank visitors (the rules' behaviour itself: tests/test_rules.py and test_rules_properties.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.rules import book as rules
from gateway.rules import placing
from gateway.rules.conditions import Context
from gateway.rules.plans import HOT_PLAN
from gateway.snapshot import Snapshot, load_current
from tests.test_rules import NOW, book, facts, rule, run


@pytest.fixture(scope="module")
def snap(small_snapshots: Path) -> Snapshot:
    loaded, _ = load_current(small_snapshots)
    return loaded


def test_a_book_of_more_than_63_boosts_has_no_codes_and_answers_step_by_step(snap: Snapshot) -> None:
    """gateway.rules.placing numbers a book's boost actions in one 64-bit word: past 63 the book has no
    codes, Ruling.place declines, and Book.apply makes the answer."""
    doc = {
        "rules": [
            rule(f"b{i:02d}", {"type": "boost", "items": {"ids": [snap.item_ids[i]]}, "weight": 2.0}) for i in range(64)
        ]
    }
    b = book(snap, doc)
    assert b.codes is None
    ruling = b.decide(facts(), "recommend", personal=True)
    every = np.arange(60, dtype=np.int64)
    scores = np.linspace(1, 0, 60, dtype=np.float32)
    empty = np.zeros(0, dtype=np.int64)
    assert ruling.place(every, scores, 10, reason="user-vector", refused=empty, reserve=[], reserve_rows=empty) is None
    outcome = run(b, snap)
    assert [p.row for p in outcome.picks][:3] == [0, 1, 2]
    assert outcome.picks[0].reason == ("user-vector", "rule:b00@1")
    assert len(book(snap, {"rules": doc["rules"][:63]}).codes.boosting) == 63  # type: ignore[union-attr]


def test_applied_of_lists_the_rules_of_the_set_rank_bits_by_priority(snap: Snapshot) -> None:
    """Book.applied_of decodes a mask over the rules' ranks a byte at a time: masks over 70 rules
    (nine bytes, the last one partly used) give exactly the rules whose bits are set, in rank order."""
    doc = {
        "rules": [
            rule(f"r{i:02d}", {"type": "attach", "slot": "top", "content": {"i": i}}, priority=i % 7) for i in range(70)
        ]
    }
    b = book(snap, doc)
    rng = np.random.default_rng(3)
    masks = [0, 1, 1 << 69, (1 << 70) - 1, 0xFF << 8, 1 << 64 | 1 << 7]
    drawn = (rng.choice(70, size=rng.integers(1, 20), replace=False) for _ in range(200))
    masks += [sum(1 << int(i) for i in ranks) for ranks in drawn]
    for mask in masks:
        expected = [c for c in b.rules if mask >> c.rank & 1]
        assert b.applied_of(mask) == [c.ref for c in expected]
    assert [c.rank for c in b.rules] == list(range(70))


def test_the_compiled_answer_checks_what_it_hands_to_the_kernel_unchecked(snap: Snapshot) -> None:
    """placing.place calls the kernel's entry point, which trusts its arguments: rows of another
    type or layout go through numba's dispatcher instead (an answer or a TypeError, never a wrong
    read), and a view is checked when it is made."""
    doc = {
        "rules": [
            rule("lift", {"type": "boost", "items": {"ids": [snap.item_ids[7]]}, "weight": 3.0}),
            rule("diverse", {"type": "cap", "per_category": 2}),
        ]
    }
    plan = book(snap, doc).decide(facts(), "recommend", personal=True).plan
    assert plan is not None and plan.view is not None
    view, refused, reserve = plan.view, np.array([3], dtype=np.int64), np.arange(100, 200, dtype=np.int64)
    every = np.arange(60, dtype=np.int64)
    answer = placing.place(every, refused, 10, view, reserve)
    assert answer[placing.OUT] == 7  # lifted to the top
    for same in (
        every.astype(np.int32),
        every.astype(np.uint16),
        np.repeat(every, 2)[::2],
        np.repeat(every.astype(np.int32), 3)[::3],
    ):
        np.testing.assert_array_equal(placing.place(same, refused, 10, view, reserve), answer)
    np.testing.assert_array_equal(
        placing.place(every, refused.astype(np.int32), 10, view, reserve.astype(np.int32)), answer
    )
    with pytest.raises(TypeError):
        placing.place(every.astype(np.float64), refused, 10, view, reserve)
    with pytest.raises(TypeError):
        placing.place(every.reshape(6, 10), refused, 10, view, reserve)
    with pytest.raises(TypeError):
        placing.View(view.spec, view.codes, view.keys.astype(np.int64), view.limit, view.distinct)


def test_plans_taken_step_by_step_combine_their_arrays_and_blank_decisions_keep_their_plan(
    snap: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the step-by-step selection (Ruling.select) reads a plan's combined arrays: a plan of two
    boosting groups gets them on its HOT_PLAN-th step-by-step use, never from the compiled answer
    (Ruling.place) however often. decide_blank remembers the plan with the decision and does
    _plan_of's bookkeeping on every HOT_PLAN-th use: forgotten (past PLANS_KEPT), the plan lets its
    combined arrays go, and the decision takes the plan made again."""
    lift = {"type": "boost", "items": {"ids": [snap.item_ids[1]]}, "weight": 2.0}
    more = {"type": "boost", "items": {"ids": [snap.item_ids[2]]}, "weight": 3.0}
    doc = {
        "rules": [
            rule("a-page", lift, when={"context": {"page": ["/c/a"]}}),
            rule("any-c-page", more, when={"context": {"page": ["/c/"]}}),
        ]
    }
    b = book(snap, doc)
    on_a, on_b = Context(page="/c/a/1"), Context(page="/c/b")
    every = np.arange(30, dtype=np.int64)
    scores = np.linspace(1, 0, 30, dtype=np.float32)
    empty = np.zeros(0, dtype=np.int64)

    def ruling_on(context: Context) -> Any:
        return b.decide_blank(NOW, "recommend", context, personal=False)

    def plan_on(context: Context) -> Any:
        return ruling_on(context).plan

    placed = [ruling_on(on_a) for _ in range(3 * HOT_PLAN)]
    plan = placed[0].plan
    assert all(r.plan is plan for r in placed)
    assert [r.ref for r in plan.rules] == ["rule:a-page@1", "rule:any-c-page@1"]
    for ruling in placed:
        outcome = ruling.place(every, scores, 10, reason="user-vector", refused=empty, reserve=[], reserve_rows=empty)
        assert [p.row for p in outcome.picks][:2] == [2, 1]  # boosted 3x and 2x
    assert plan.weight is None  # the compiled answer reads the book's codes: nothing combined for it
    for _ in range(HOT_PLAN - 1):
        assert ruling_on(on_a).select(every, 10)[:2] == [2, 1]
    assert plan.weight is None
    assert ruling_on(on_a).select(every, 10)[:2] == [2, 1]
    assert plan.weight is not None  # combined, as a plan taken this often step by step is
    assert ruling_on(on_a).select(every, 10)[:2] == [2, 1]  # and the same answer from the combined arrays
    monkeypatch.setattr(rules, "PLANS_KEPT", 1)
    assert [r.ref for r in plan_on(on_b).rules] == ["rule:any-c-page@1"]  # a new plan: plan_on(on_a)'s forgotten
    assert plan.weight is None  # let go of its combined arrays
    again = [plan_on(on_a) for _ in range(HOT_PLAN)]
    assert again[-1] is not plan and [r.ref for r in again[-1].rules] == ["rule:a-page@1", "rule:any-c-page@1"]
    assert b._plans[0b11] is again[-1]  # groups 0 and 1


def test_tagged_reasons_are_shared_and_the_same_past_the_memorys_bound(
    snap: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Codes.tagged remembers a boosted pick's reasons per (reason, bits), so picks with the same
    ones share one tuple; past TAGS_KEPT the memory starts again and the answers stay the same."""
    doc = {
        "rules": [
            rule("lift", {"type": "boost", "items": {"ids": [snap.item_ids[3], snap.item_ids[5]]}, "weight": 4.0}),
            rule("more", {"type": "boost", "items": {"ids": [snap.item_ids[5]]}, "weight": 2.0}),
        ]
    }
    b = book(snap, doc)
    every = np.arange(30, dtype=np.int64)
    scores = np.linspace(1, 0, 30, dtype=np.float32)
    empty = np.zeros(0, dtype=np.int64)

    def answer() -> list[Any]:
        ruling = b.decide(facts(), "recommend", personal=True)
        outcome = ruling.place(every, scores, 10, reason="user-vector", refused=empty, reserve=[], reserve_rows=empty)
        assert outcome is not None
        return outcome.picks

    first = answer()
    assert [(p.row, p.reason) for p in first[:3]] == [
        (5, ("user-vector", "rule:lift@1", "rule:more@1")),
        (3, ("user-vector", "rule:lift@1")),
        (0, "user-vector"),
    ]
    assert answer()[0].reason is first[0].reason  # one tuple, remembered
    assert b.codes is not None and len(b.codes.tags) == 2
    monkeypatch.setattr(placing, "TAGS_KEPT", 1)
    b.codes.tags.clear()
    assert answer() == first and len(b.codes.tags) == 1  # two to remember: started again at the bound
    assert answer() == first
