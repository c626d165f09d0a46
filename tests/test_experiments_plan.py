"""Experiments as data: validation that names the experiment and field, and deterministic assignment:
shares that match the weights, stickiness across nodes, layers that exclude within and leave each
other alone, coverage, factorial cells, and phases that re-draw only when the design changes."""

from __future__ import annotations

import math
import typing
from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import settings as gateway_settings
from gateway.experiments.plan import (
    Allocation,
    Experiment,
    ExperimentError,
    ExperimentPlan,
    Knobs,
    arms,
    assign,
    next_phase,
    parse,
    starts_new_phase,
)

NOW = 1_795_000_000.0
MANY = 200_000
VISITORS = [f"p_{n:07d}" for n in range(MANY)]
FEW = VISITORS[:20_000]


def plan(*experiments: dict[str, Any]) -> ExperimentPlan:
    return parse(msgspec.json.encode({"experiments": list(experiments)}))


def experiment(ident: str = "ranker", weights: tuple[float, ...] = (1, 1), **fields: Any) -> dict[str, Any]:
    variants = [{"name": name, "weight": w} for name, w in zip("ABCDEFGH", weights, strict=False)]
    return {"id": ident, "variants": variants, **fields}


def arms_of(allocation: Allocation, ident: str, visitors: list[str]) -> list[str | None]:
    found = [allocation.assign(visitor, NOW).get(ident) for visitor in visitors]
    return [a.arm if a else None for a in found]


def within_four_standard_errors(count: int, total: int, share: float) -> bool:
    return abs(count - total * share) <= 4 * math.sqrt(total * share * (1 - share))


def test_variant_shares_match_the_weights() -> None:
    allocation = Allocation(plan(experiment(weights=(1, 2, 5))))
    counts = Counter(arms_of(allocation, "ranker", VISITORS))
    for arm, share in {"A": 1 / 8, "B": 2 / 8, "C": 5 / 8}.items():
        assert within_four_standard_errors(counts[arm], MANY, share), (arm, counts)


def test_a_visitor_gets_the_same_arm_on_every_request_and_every_node() -> None:
    body = msgspec.json.encode({"experiments": [experiment(weights=(1, 1, 1))]})
    one_node, other_node = Allocation(parse(body)), Allocation(parse(body))
    first = arms_of(one_node, "ranker", FEW)
    assert arms_of(one_node, "ranker", FEW) == first
    assert arms_of(other_node, "ranker", FEW) == first


def test_the_hash_is_part_of_the_contract() -> None:
    # Pinned: a change of hash, encoding or seed derivation would move every running visitor.
    allocation = Allocation(plan(experiment(weights=(1, 1, 1, 1))))
    visitors = [f"p_{letter}" for letter in "abcdefghij"]
    assert arms_of(allocation, "ranker", visitors) == ["C", "B", "B", "C", "B", "B", "B", "A", "D", "D"]


def test_changes_in_another_layer_move_nobody_in_this_one() -> None:
    before = plan(
        experiment("ranker", coverage=0.4, layer="ranking"),
        experiment("pool", weights=(1, 3), coverage=0.5, layer="ranking"),
        experiment("banner", weights=(1, 1), coverage=0.3, layer="ui"),
    )
    after = plan(
        experiment("ranker", coverage=0.4, layer="ranking"),
        experiment("pool", weights=(1, 3), coverage=0.5, layer="ranking"),
        experiment("banner", weights=(5, 1, 1), coverage=0.9, layer="ui"),
        experiment("colours", layer="ui", coverage=0.1),
        experiment("copy", layer="texts"),
    )
    for ident in ("ranker", "pool"):
        assert arms_of(Allocation(after), ident, FEW) == arms_of(Allocation(before), ident, FEW)


def test_an_experiment_added_at_the_end_of_its_layer_keeps_the_others_slices() -> None:
    before = plan(experiment("ranker", coverage=0.3))
    after = plan(experiment("ranker", coverage=0.3), experiment("pool", coverage=0.5))
    assert Allocation(after).slices() == {"ranker": (0.0, 0.3), "pool": (0.3, 0.8)}
    assert arms_of(Allocation(after), "ranker", FEW) == arms_of(Allocation(before), "ranker", FEW)


def test_a_visitor_is_in_at_most_one_experiment_per_layer_and_layers_overlap() -> None:
    allocation = Allocation(
        plan(
            experiment("ranker", coverage=0.5, layer="ranking"),
            experiment("pool", coverage=0.5, layer="ranking"),
            experiment("banner", layer="ui"),
        )
    )
    found = [allocation.assign(visitor, NOW) for visitor in FEW]
    assert not any("ranker" in a and "pool" in a for a in found)
    assert all("banner" in a for a in found)
    in_ranker = sum("ranker" in a for a in found)
    assert within_four_standard_errors(in_ranker, len(FEW), 0.5)


def test_coverage_is_the_share_of_traffic_in_the_experiment() -> None:
    allocation = Allocation(plan(experiment(coverage=0.3)))
    inside = sum(arm is not None for arm in arms_of(allocation, "ranker", VISITORS))
    assert within_four_standard_errors(inside, MANY, 0.3)


def test_stopped_and_not_yet_started_experiments_assign_nobody_but_keep_their_slice() -> None:
    allocation = Allocation(
        plan(
            experiment("old", coverage=0.3, status="stopped"),
            experiment("later", coverage=0.3, start="2099-01-01T00:00:00Z"),
            experiment("now", coverage=0.3, start="2020-01-01T00:00:00Z", end="2099-01-01T00:00:00Z"),
        )
    )
    found = Counter(ident for visitor in FEW for ident in allocation.assign(visitor, NOW))
    assert set(found) == {"now"}
    assert allocation.slices()["now"] == pytest.approx((0.6, 0.9))


def test_factorial_cells_are_equally_likely_and_merge_their_levels_overrides() -> None:
    grid = {
        "id": "grid",
        "factors": [
            {"name": "ranker", "levels": [{"name": "A"}, {"name": "B", "overrides": {"rules_version": 7}}]},
            {
                "name": "banner",
                "levels": [{"name": "on", "overrides": {"settings": {"ranking": "popular"}}}, {"name": "off"}],
            },
        ],
    }
    allocation = Allocation(plan(grid))
    counts = Counter(arms_of(allocation, "grid", VISITORS))
    cells = {"ranker=A,banner=on", "ranker=A,banner=off", "ranker=B,banner=on", "ranker=B,banner=off"}
    assert set(counts) == cells
    assert all(within_four_standard_errors(counts[cell], MANY, 0.25) for cell in cells), counts
    merged = {cell.name: cell.overrides for cell in arms(plan(grid).experiments[0])}
    assert merged["ranker=B,banner=on"].rules_version == 7
    assert merged["ranker=B,banner=on"].settings == Knobs(ranking="popular")
    assert merged["ranker=A,banner=off"].given() == {}


def test_an_assignment_names_itself_in_reasons() -> None:
    found = assign(plan(experiment(phase=4)), "p_x", NOW)["ranker"]
    assert found.reason == f"experiment:ranker@4:{found.arm}"


def test_a_weight_change_starts_phase_two_and_draws_everyone_again() -> None:
    old = plan(experiment(weights=(1, 1))).experiments[0]
    new = next_phase(old, plan(experiment(weights=(9, 1))).experiments[0])
    assert (new.phase, new.seed != old.seed) == (2, True)
    before, after = (
        arms_of(Allocation(ExperimentPlan([old])), "ranker", VISITORS),
        arms_of(Allocation(ExperimentPlan([new])), "ranker", VISITORS),
    )
    # Drawn again, a visitor's new arm is independent of the old: of those in B before, 10% are in
    # B now. Had the seed stayed, it would be 20%: the draws in [0.9, 1) of B's old [0.5, 1).
    were_b = [now for was, now in zip(before, after, strict=True) if was == "B"]
    assert within_four_standard_errors(were_b.count("B"), len(were_b), 0.1)


def test_the_same_split_in_other_numbers_is_not_a_new_phase() -> None:
    old = plan(experiment(weights=(1, 3))).experiments[0]
    assert not starts_new_phase(old, plan(experiment(weights=(2, 6))).experiments[0])


def test_renames_and_descriptions_keep_the_phase_and_every_visitor_in_place() -> None:
    old = plan(experiment()).experiments[0]
    renamed = plan(
        {"id": "ranker", "description": "new copy", "variants": [{"name": "control"}, {"name": "treatment"}]}
    ).experiments[0]
    assert not starts_new_phase(old, renamed)
    assert next_phase(old, renamed).phase == 1
    before = arms_of(Allocation(ExperimentPlan([old])), "ranker", FEW)
    after = arms_of(Allocation(ExperimentPlan([renamed])), "ranker", FEW)
    assert [{"A": "control", "B": "treatment"}[arm or ""] for arm in before] == after


def test_changing_what_an_arm_does_starts_a_new_phase() -> None:
    old = plan(experiment()).experiments[0]
    changed = plan(
        {"id": "ranker", "variants": [{"name": "A"}, {"name": "B", "overrides": {"settings": {"recent_limit": 50}}}]}
    ).experiments[0]
    assert starts_new_phase(old, changed)


def test_a_coverage_ramp_keeps_the_phase_and_the_visitors_already_in() -> None:
    old = plan(experiment(coverage=0.2)).experiments[0]
    ramped = next_phase(old, plan(experiment(coverage=0.6)).experiments[0])
    assert ramped.phase == 1
    before = arms_of(Allocation(ExperimentPlan([old])), "ranker", FEW)
    after = arms_of(Allocation(ExperimentPlan([ramped])), "ranker", FEW)
    assert all(was == now for was, now in zip(before, after, strict=True) if was is not None)


def test_phases_never_go_back_and_can_be_raised_by_hand() -> None:
    old = plan(experiment(phase=3)).experiments[0]
    assert next_phase(old, plan(experiment()).experiments[0]).phase == 3
    assert next_phase(old, plan(experiment(phase=5)).experiments[0]).phase == 5


INVALID = [
    (experiment(weights=(1, 0)), "experiments[0].variants[1].weight", "Expected `float` > 0.0"),
    (
        {"id": "ranker", "variants": [{"name": "A"}, {"name": "A"}]},
        "experiments[0].variants[1].name",
        "another variant",
    ),
    ({"id": "ranker"}, "experiments[0].variants", "exactly one of"),
    (
        {**experiment(), "factors": [{"name": "f", "levels": [{"name": "x"}, {"name": "y"}]}]},
        "experiments[0].variants",
        "exactly one of",
    ),
    (experiment(weights=(1,)), "experiments[0].variants", "at least two"),
    (experiment(coverage=0), "experiments[0].coverage", "> 0.0"),
    (experiment(coverage=1.5), "experiments[0].coverage", "<= 1"),
    (
        {"id": "ranker", "variants": [{"name": "A"}, {"name": "B", "overrides": {"settings": {"ranker": 3}}}]},
        "experiments[0].variants[1].overrides.settings",
        "unknown field `ranker`",
    ),
    (experiment(start="2026-01-01T00:00:00"), "experiments[0].start", "timezone"),
    (experiment(start="2026-02-01T00:00:00Z", end="2026-01-01T00:00:00Z"), "experiments[0].end", "ends before"),
    (
        {
            "id": "ranker",
            "factors": [
                {"name": "f", "levels": [{"name": "x", "overrides": {"rules_version": 2}}, {"name": "y"}]},
                {"name": "g", "levels": [{"name": "x"}, {"name": "y", "overrides": {"rules_version": 3}}]},
            ],
        },
        "experiments[0].factors[1].levels[1].overrides.rules_version",
        "a setting belongs to one factor",
    ),
]


@pytest.mark.parametrize(("entry", "field", "message"), INVALID)
def test_an_invalid_experiment_is_named_with_its_field(entry: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ExperimentError, match=message) as raised:
        plan(entry)
    assert (raised.value.experiment, raised.value.field) == ("ranker", field)


def test_a_second_experiment_with_the_same_id_is_named() -> None:
    with pytest.raises(ExperimentError) as raised:
        plan(experiment("pool", coverage=0.3), experiment("ranker", coverage=0.3), experiment("ranker", coverage=0.3))
    assert (raised.value.experiment, raised.value.field) == ("ranker", "experiments[2].id")


def test_a_layer_cannot_hold_more_than_all_traffic() -> None:
    with pytest.raises(ExperimentError, match="layer 'default' is full") as raised:
        plan(experiment("pool", coverage=0.7), experiment("ranker", coverage=0.4))
    assert (raised.value.experiment, raised.value.field) == ("ranker", "experiments[1].coverage")


def test_two_layers_cannot_override_the_same_setting() -> None:
    pool = {"name": "B", "overrides": {"settings": {"ranking": "popular"}}}
    with pytest.raises(ExperimentError, match="experiment 'pool' in layer 'ranking'") as raised:
        plan(
            {"id": "pool", "layer": "ranking", "variants": [{"name": "A"}, pool]},
            {"id": "ranker", "layer": "ui", "variants": [pool, {"name": "A"}]},
        )
    assert (raised.value.experiment, raised.value.field) == (
        "ranker",
        "experiments[1].variants[0].overrides.settings.ranking",
    )


def test_the_knobs_have_the_gateway_settings_bounds() -> None:
    ours = typing.get_type_hints(Knobs, include_extras=True)
    theirs = typing.get_type_hints(gateway_settings.Settings, include_extras=True)
    shared = [knob for knob in Knobs.__struct_fields__ if knob in theirs]
    assert shared == ["recent_limit"]
    for knob in shared:
        assert msgspec.inspect.type_info(ours[knob]) == msgspec.inspect.type_info(theirs[knob] | None)


arm_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,5}\Z")
variant_lists = st.lists(
    st.builds(lambda name, weight: {"name": name, "weight": weight}, arm_names, st.floats(1e-6, 1e6)),
    min_size=2,
    max_size=4,  # three factors of four levels: the most cells an experiment may have
    unique_by=lambda v: v["name"],
)
factor_lists = st.lists(
    st.builds(lambda name, levels: {"name": name, "levels": levels}, arm_names, variant_lists),
    min_size=1,
    max_size=3,
    unique_by=lambda f: f["name"],
)
experiment_entries = st.builds(
    lambda arms_of_it, layer, coverage, status: {
        **arms_of_it,
        "layer": layer,
        "coverage": coverage,
        "status": status,
    },
    st.one_of(variant_lists.map(lambda v: {"variants": v}), factor_lists.map(lambda f: {"factors": f})),
    st.sampled_from(["default", "ui", "ranking"]),
    st.floats(0.01, 0.25),  # four experiments at most: a layer never overflows
    st.sampled_from(["draft", "running", "stopped"]),
)
plans = st.lists(experiment_entries, max_size=4).map(
    lambda entries: {"experiments": [{"id": f"e{n}", **entry} for n, entry in enumerate(entries)]}
)


@settings(max_examples=200, deadline=None)
@given(plans, st.text(alphabet=st.characters(codec=None), max_size=40))
def test_assignment_never_raises_and_always_names_an_arm(document: dict[str, Any], visitor: str) -> None:
    valid = parse(msgspec.json.encode(document))
    found = assign(valid, visitor, NOW)
    by_id = {e.id: e for e in valid.experiments}
    for ident, assignment in found.items():
        assert by_id[ident].status == "running"
        assert assignment.arm in {arm.name for arm in arms(by_id[ident])}
    layers = [by_id[ident].layer for ident in found]
    assert len(layers) == len(set(layers))


def test_an_experiment_round_trips_through_json() -> None:
    original = plan(experiment(coverage=0.5, layer="ui")).experiments[0]
    assert msgspec.json.decode(msgspec.json.encode(original), type=Experiment) == original
