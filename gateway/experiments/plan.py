"""Experiments as data (an `ExperimentPlan`), and which arm of each a visitor is in.

An experiment has arms: either `variants` (weighted), or `factors` whose levels combine into cells
(a 2-level "ranker" and a 2-level "banner" make 4 cells, "ranker=A,banner=on" and so on; a cell's
weight is the product of its levels' shares). An arm's `overrides` are data: the rule-set version
to use and a few recommender settings (`Knobs`). A cell merges its levels' overrides; a setting
may be overridden by the levels of one factor only (two factors setting it would leave a cell with
two answers), so such a plan is rejected rather than resolved by an order nobody remembers.

Traffic. Experiments live in layers. A visitor's place in a layer is a hash of the layer's name and
the visitor, a number in [0, 1); the layer's experiments own consecutive slices of that interval,
each as wide as its `coverage`, in the order the plan lists them. So a visitor is in at most one
experiment per layer, layers are independent of each other, and an experiment added at the end of
its layer takes free space and moves nobody. What moves a slice: removing an experiment, or
changing the coverage of one, shifts the slices listed after it in the same layer. So a stopped
experiment keeps its slice (nobody is assigned there) until the layer is retired; an experiment
whose coverage will ramp up goes last in its layer. Two layers must not override the same setting,
since a visitor can be in one experiment of each.

Arms. Within its experiment, a visitor's arm is a hash of the experiment's phase seed, its id and
the visitor, independent of the layer's hash: nothing but the experiment's own definition and its
layer's allocation decides it, so it is the same on every node and every request, whatever other
experiments do. Pass the visitor's pseudonym (gateway.privacy.keys), never the raw id: assignments are
then unpredictable without the pseudonym key, and the raw id never reaches this code.

Phases. Changing the split of traffic between arms (their weights, their number) or what an arm
does (its overrides) starts a new phase: the phase number goes up and the seed, derived from the
id and the phase, changes, so every visitor is drawn again and results are read per phase (mixing
periods with different splits biases the comparison: Simpson's paradox). Renames, descriptions,
metrics, coverage, layer and status keep the phase: the arms a visitor is in stay where they were.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

import msgspec

from gateway import crossfield
from gateway.rules.conditions import Slug, entry_id
from gateway.settings import Count

# Arm names end up in cell names ("ranker=A,banner=on") and reasons, so they keep out `,`, `=`, `:`.
ArmName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Weight = Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]
Moment = Annotated[datetime, msgspec.Meta(tz=True, extra_json_schema={"pattern": crossfield.DATETIME_WITH_OFFSET})]
MetricName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.:-]*$", max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=2000)]
Status = Literal["draft", "running", "stopped"]
DEFAULT_METRICS = ("click", "add_to_cart", "purchase", "revenue")
MAX_CELLS = 64


class Knobs(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Recommender settings an arm may change. `ranking`: "personal" (the model, as configured) or
    "popular" (popular items only: the baseline a recommender must beat); `recent_limit`: how many of
    the visitor's recent events the live profile folds in (gateway.settings.Settings.recent_limit)."""

    ranking: Literal["personal", "popular"] | None = None
    recent_limit: Count | None = None


class Overrides(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    # The rule-set version to serve: None, the active one; 0, no rules at all.
    rules_version: Annotated[int, msgspec.Meta(ge=0)] | None = None
    settings: Knobs = Knobs()

    def given(self) -> dict[str, int | str]:
        """What these overrides set, by field path (`rules_version`, `settings.ranking`)."""
        paths: dict[str, int | str | None] = {"rules_version": self.rules_version}
        paths.update((f"settings.{name}", value) for name, value in msgspec.structs.asdict(self.settings).items())
        return {path: value for path, value in paths.items() if value is not None}


class Variant(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: ArmName
    weight: Weight = 1.0
    overrides: Overrides = Overrides()
    description: Text | None = None


class Factor(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: ArmName
    levels: Annotated[list[Variant], msgspec.Meta(min_length=2, max_length=16)]


class Experiment(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: Slug
    variants: Annotated[list[Variant], msgspec.Meta(max_length=MAX_CELLS)] = []
    factors: Annotated[list[Factor], msgspec.Meta(max_length=6)] = []
    layer: Slug = "default"
    coverage: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    status: Status = "running"
    start: Moment | None = None
    end: Moment | None = None
    phase: Annotated[int, msgspec.Meta(ge=1)] = 1
    metrics: list[MetricName] = msgspec.field(default_factory=lambda: list(DEFAULT_METRICS))
    min_sample: Annotated[int, msgspec.Meta(ge=1)] = 1000  # visitors per arm before results are read
    description: Text | None = None

    @property
    def seed(self) -> str:
        return phase_seed(self.id, self.phase)


# What _check_arms refuses across fields, for the OpenAPI document (gateway.crossfield): exactly one
# of `variants` (two or more) and `factors`. Not stated: names used twice, more than MAX_CELLS cells,
# a setting overridden by two factors, `end` before `start` (JSON Schema cannot compare values).
STATED: dict[type[msgspec.Struct], crossfield.Schema] = {
    Experiment: {
        "oneOf": [
            {"required": ["variants"], "properties": {"variants": {"minItems": 2}, "factors": {"maxItems": 0}}},
            {"required": ["factors"], "properties": {"factors": {"minItems": 1}, "variants": {"maxItems": 0}}},
        ]
    }
}


class ExperimentPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    experiments: Annotated[list[Experiment], msgspec.Meta(max_length=200)] = []


class ExperimentError(ValueError):
    """An invalid plan; `field` is a path like `experiments[2].variants[0].weight`, `experiment` the
    id of the experiment it is in."""

    def __init__(self, message: str, *, field: str | None = None, experiment: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.experiment = experiment


class Assignment(msgspec.Struct, frozen=True):
    experiment: str
    phase: int
    arm: str
    overrides: Overrides

    @property
    def reason(self) -> str:
        """How an answer names it among an item's `reasons`."""
        return f"experiment:{self.experiment}@{self.phase}:{self.arm}"


def phase_seed(experiment_id: str, phase: int) -> str:
    """The seed of an experiment's phase: derived, so every node agrees without storing it."""
    return hashlib.blake2b(f"{experiment_id}@{phase}".encode(), digest_size=8).hexdigest()


def arms(experiment: Experiment) -> list[Variant]:
    """The variants, or the factors' cells (in the order of the factors' levels, last factor fastest)."""
    if not experiment.factors:
        return list(experiment.variants)
    shares = [_shares(factor.levels) for factor in experiment.factors]
    cells = []
    for picks in itertools.product(*(range(len(factor.levels)) for factor in experiment.factors)):
        levels = [factor.levels[k] for factor, k in zip(experiment.factors, picks, strict=True)]
        cells.append(
            Variant(
                name=",".join(f"{f.name}={level.name}" for f, level in zip(experiment.factors, levels, strict=True)),
                weight=math.prod(share[k] for share, k in zip(shares, picks, strict=True)),
                overrides=_merge([level.overrides for level in levels]),
            )
        )
    return cells


def parse(body: bytes) -> ExperimentPlan:
    """The plan in a JSON body; ExperimentError naming the experiment and the field when invalid."""
    try:
        plan = msgspec.json.decode(body, type=ExperimentPlan)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$.")
        path = at.rstrip("`") or None
        experiment = entry_id(body, path)
        where = f"experiment {experiment!r}: " if experiment else ""
        raise ExperimentError(
            f"{where}{message}" + (f" (at {path})" if path else ""), field=path, experiment=experiment
        ) from None
    except msgspec.DecodeError as exc:
        raise ExperimentError(f"not JSON: {exc}") from None
    return check(plan)


def check(plan: ExperimentPlan) -> ExperimentPlan:
    """`plan`, when its experiments are consistent with each other and within themselves (what the
    declared types cannot say); ExperimentError otherwise."""
    seen: set[str] = set()
    filled: dict[str, float] = {}
    owners: dict[str, tuple[str, str]] = {}  # setting -> (layer, experiment) overriding it
    for index, experiment in enumerate(plan.experiments):
        at = f"experiments[{index}]"
        if experiment.id in seen:
            _fail(experiment, f"{at}.id", "another experiment has this id")
        seen.add(experiment.id)
        _check_arms(experiment, at)
        if experiment.start and experiment.end and experiment.end <= experiment.start:
            _fail(experiment, f"{at}.end", "ends before it starts")
        filled[experiment.layer] = filled.get(experiment.layer, 0.0) + experiment.coverage
        if filled[experiment.layer] > 1 + 1e-9:
            _fail(
                experiment,
                f"{at}.coverage",
                f"layer {experiment.layer!r} is full: its experiments' coverage adds up to more than 1",
            )
        if experiment.status == "stopped":
            continue
        for setting, path in _settings_paths(experiment, at).items():
            layer, other = owners.setdefault(setting, (experiment.layer, experiment.id))
            if layer != experiment.layer:
                _fail(
                    experiment,
                    path,
                    f"experiment {other!r} in layer {layer!r} overrides {setting} too, and a visitor can be in "
                    "both: put them in one layer",
                )
    return plan


@dataclass(frozen=True)
class _Slice:
    experiment: Experiment
    low: float
    high: float
    arms: tuple[Variant, ...]
    bounds: tuple[float, ...]  # the arms' cumulative shares
    seed: str
    starts: float
    ends: float


class Allocation:
    """A plan made ready to assign visitors (made once per plan version, used per request)."""

    def __init__(self, plan: ExperimentPlan) -> None:
        self.layers: dict[str, list[_Slice]] = {}
        for experiment in plan.experiments:
            taken = self.layers.setdefault(experiment.layer, [])
            low = taken[-1].high if taken else 0.0
            variants = tuple(arms(experiment))
            shares = _shares(variants)
            taken.append(
                _Slice(
                    experiment,
                    low,
                    min(1.0, low + experiment.coverage),
                    variants,
                    tuple(itertools.accumulate(shares)),
                    experiment.seed,
                    experiment.start.timestamp() if experiment.start else -math.inf,
                    experiment.end.timestamp() if experiment.end else math.inf,
                )
            )
        self.lows = {layer: [s.low for s in taken] for layer, taken in self.layers.items()}

    def slices(self) -> dict[str, tuple[float, float]]:
        """Experiment id -> the part [low, high) of its layer's unit interval it owns."""
        return {s.experiment.id: (s.low, s.high) for taken in self.layers.values() for s in taken}

    def assign(self, visitor_key: str, now: float | None = None) -> dict[str, Assignment]:
        """Experiment id -> the arm `visitor_key` is in, for the experiments running at `now`."""
        moment = time.time() if now is None else now
        found: dict[str, Assignment] = {}
        for layer, taken in self.layers.items():
            place = _unit("layer", layer, visitor_key)
            here = taken[bisect.bisect_right(self.lows[layer], place) - 1]
            experiment = here.experiment
            if not (place < here.high and experiment.status == "running" and here.starts <= moment < here.ends):
                continue
            draw = _unit("arm", here.seed, experiment.id, visitor_key)
            # Rounding can leave the last cumulative share a hair under 1: the last arm takes the rest.
            arm = here.arms[min(bisect.bisect_right(here.bounds, draw), len(here.arms) - 1)]
            found[experiment.id] = Assignment(experiment.id, experiment.phase, arm.name, arm.overrides)
        return found


def assign(plan: ExperimentPlan, visitor_key: str, now: float | None = None) -> dict[str, Assignment]:
    """Experiment id -> arm for one visitor (for many, make an Allocation once)."""
    return Allocation(plan).assign(visitor_key, now)


def starts_new_phase(old: Experiment, new: Experiment) -> bool:
    """Whether going from `old` to `new` changes the split between arms or what an arm does."""
    return not _same_design(_design(old), _design(new))


def next_phase(old: Experiment, new: Experiment) -> Experiment:
    """`new` with its phase: old's + 1 when the design changed (and so a new seed), else old's or a
    later one `new` asks for (a manual re-draw). Phases never go back."""
    if old.id != new.id:
        raise ValueError(f"not the same experiment: {old.id!r} and {new.id!r}")
    phase = old.phase + 1 if starts_new_phase(old, new) else max(old.phase, new.phase)
    return msgspec.structs.replace(new, phase=phase)


def advance(old: ExperimentPlan, new: ExperimentPlan) -> ExperimentPlan:
    """`new` with every experiment also in `old` given its phase by next_phase."""
    before = {experiment.id: experiment for experiment in old.experiments}
    return ExperimentPlan(
        [next_phase(before[e.id], e) if e.id in before else e for e in new.experiments],
    )


def _unit(*parts: str) -> float:
    """A number in [0, 1), uniform over inputs, the same in every process and Python version.

    Not `hash()`: it is salted per process (PYTHONHASHSEED), so nodes and restarts would disagree.
    BLAKE2b is fast in CPython and its bits are as good as any cryptographic hash's; parts are
    length-prefixed so ("a:b", "c") and ("a", "b:c") differ. Of the 64 bits, the top 53 fill a
    float's mantissa exactly: all 64 divided by 2**64 could round up to 1.0."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(4, "big"))
        digest.update(data)
    return (int.from_bytes(digest.digest(), "big") >> 11) / 2**53


def _shares(variants: Sequence[Variant]) -> list[float]:
    total = math.fsum(variant.weight for variant in variants)
    return [variant.weight / total for variant in variants]


def _merge(parts: Sequence[Overrides]) -> Overrides:
    rules = next((part.rules_version for part in parts if part.rules_version is not None), None)
    knobs: dict[str, Any] = {}
    for part in parts:
        knobs.update((k, v) for k, v in msgspec.structs.asdict(part.settings).items() if v is not None)
    return Overrides(rules_version=rules, settings=Knobs(**knobs))


Design = tuple[tuple[list[float], list[Overrides]], ...]


def _design(experiment: Experiment) -> tuple[bool, Design]:
    groups = [experiment.variants] if experiment.variants else [f.levels for f in experiment.factors]
    return bool(experiment.factors), tuple((_shares(g), [v.overrides for v in g]) for g in groups)


def _same_design(a: tuple[bool, Design], b: tuple[bool, Design]) -> bool:
    # Shares, not weights: [1, 1] and [2, 2] split traffic alike; isclose for float rounding.
    return (
        a[0] == b[0]
        and len(a[1]) == len(b[1])
        and all(
            len(sa) == len(sb) and all(map(math.isclose, sa, sb)) and oa == ob
            for (sa, oa), (sb, ob) in zip(a[1], b[1], strict=True)
        )
    )


def _check_arms(experiment: Experiment, at: str) -> None:
    if bool(experiment.variants) == bool(experiment.factors):
        _fail(experiment, f"{at}.variants", "give exactly one of `variants` and `factors`")
    if experiment.variants and len(experiment.variants) < 2:
        _fail(experiment, f"{at}.variants", "an experiment needs at least two variants")
    _check_unique(experiment, [v.name for v in experiment.variants], f"{at}.variants", "variant")
    _check_unique(experiment, [f.name for f in experiment.factors], f"{at}.factors", "factor")
    for j, factor in enumerate(experiment.factors):
        _check_unique(experiment, [level.name for level in factor.levels], f"{at}.factors[{j}].levels", "level")
    if math.prod(len(factor.levels) for factor in experiment.factors) > MAX_CELLS:
        _fail(experiment, f"{at}.factors", f"more than {MAX_CELLS} cells")
    setters: dict[str, int] = {}
    for j, factor in enumerate(experiment.factors):
        for k, level in enumerate(factor.levels):
            for setting in level.overrides.given():
                first = setters.setdefault(setting, j)
                if first != j:
                    _fail(
                        experiment,
                        f"{at}.factors[{j}].levels[{k}].overrides.{setting}",
                        f"factors {experiment.factors[first].name!r} and {factor.name!r} both override {setting}: "
                        "a setting belongs to one factor",
                    )


def _check_unique(experiment: Experiment, names: list[str], at: str, kind: str) -> None:
    for index, name in enumerate(names):
        if name in names[:index]:
            _fail(experiment, f"{at}[{index}].name", f"another {kind} is named {name!r}")


def _settings_paths(experiment: Experiment, at: str) -> dict[str, str]:
    """Setting -> the field of the first arm overriding it."""
    found: dict[str, str] = {}
    arms_at = [(f"{at}.variants[{j}]", v) for j, v in enumerate(experiment.variants)] + [
        (f"{at}.factors[{j}].levels[{k}]", level)
        for j, factor in enumerate(experiment.factors)
        for k, level in enumerate(factor.levels)
    ]
    for path, arm in arms_at:
        for setting in arm.overrides.given():
            found.setdefault(setting, f"{path}.overrides.{setting}")
    return found


def _fail(experiment: Experiment, field: str, message: str) -> NoReturn:
    raise ExperimentError(
        f"experiment {experiment.id!r}: {message} (at {field})", field=field, experiment=experiment.id
    )
