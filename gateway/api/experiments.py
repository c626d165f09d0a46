"""`/admin/experiments`: store experiment plans as versions, activate and roll back, start and stop
one experiment, and read its report.

PUT  /admin/experiments                          store a plan (?activate=true to run it at once)
GET  /admin/experiments                          the active plan's experiments, versions, activations
GET  /admin/experiments/versions/{version}       one stored version
POST /admin/experiments/versions/{version}/activate
POST /admin/experiments/rollback                 the version active before the current one
POST /admin/experiments/deactivate               no experiments
POST /admin/experiments/{experiment_id}/start    a new version with it running, activated
POST /admin/experiments/{experiment_id}/stop     a new version with it stopped, activated
GET  /admin/experiments/{experiment_id}/report   exposures, conversions, revenue, tests, SRM

A stored plan carries each experiment's phase: a plan that changes an experiment's design (weights,
arms, overrides) is stored with that experiment's next phase (gateway.experiments.plan.next_phase),
whatever phase it says, so a new split never mixes with data of the old one.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import wire
from gateway.api.http import ApiError, json_response, parse_query, read_body
from gateway.api.versions import VersionsApi
from gateway.experiments import stats as experiment_stats
from gateway.experiments.keeper import REVENUE, ExperimentKeeper, advanced, design, history, rule_versions
from gateway.experiments.plan import Experiment, ExperimentError, ExperimentPlan, Overrides, arms, parse
from gateway.rules.document import RuleSetError
from gateway.rules.document import parse as parse_rules
from gateway.runtime import Gateway
from gateway.store import StoreError
from gateway.store.documents import Activation

MAX_PLAN_BODY = 1024 * 1024


class ExperimentsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    activate: Annotated[bool, msgspec.Meta(description="Make the stored version active at once.")] = False
    note: Annotated[str, msgspec.Meta(max_length=500, description="Why this version (kept in the history).")] = ""


class PhaseOf(msgspec.Struct, frozen=True):
    id: str
    phase: int
    new_phase: Annotated[bool, msgspec.Meta(description="The design changed: visitors are drawn again.")]


class ExperimentsStored(msgspec.Struct, frozen=True):
    """An experiment plan stored as a new version."""

    version: int
    sha256: str
    created_at: float
    active: Annotated[bool, msgspec.Meta(description="Whether this version is now the active one.")]
    experiments: list[PhaseOf]


class ArmShare(msgspec.Struct, frozen=True):
    name: str
    share: Annotated[float, msgspec.Meta(description="Of the experiment's visitors.")]
    overrides: Overrides


class ExperimentState(msgspec.Struct, frozen=True):
    id: str
    layer: str
    status: str
    phase: int
    coverage: float
    slice: Annotated[list[float], msgspec.Meta(description="The part [low, high) of its layer's traffic it owns.")]
    arms: list[ArmShare]


class ExperimentsOverview(msgspec.Struct, frozen=True):
    active: Annotated[int | None, msgspec.Meta(description="The version every node serves (null: none).")]
    serving: Annotated[int | None, msgspec.Meta(description="The version this node serves right now.")]
    experiments: Annotated[list[ExperimentState], msgspec.Meta(description="Of the version this node serves.")]
    versions: list[wire.DocumentVersion]
    activations: list[Activation]
    problem: str | None = None


class ReportQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    phase: Annotated[int, msgspec.Meta(ge=1, description="Default: the experiment's current phase.")] | None = None
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=0.5)] = 0.05


class ExperimentReport(msgspec.Struct, frozen=True):
    """Per arm: exposures (visitors), conversion rates (visitors who converted at least once) and
    revenue per visitor with confidence intervals; each arm against the control (the first variant,
    or the cell of every factor's first level): chi-square for rates, Welch's t-test for revenue,
    Holm-adjusted across all comparisons; the sample-ratio-mismatch check; notes."""

    experiment: str
    phase: int
    status: str
    report: experiment_stats.Report


class ExperimentsApi(VersionsApi[ExperimentKeeper]):
    noun = "plan version"

    def __init__(self, gateway: Gateway, keeper: ExperimentKeeper) -> None:
        super().__init__(keeper)
        self.gateway = gateway

    async def check(self, body: bytes, number: int) -> None:
        await self._check(parse(body))  # the rule sets or the catalog may have changed since it was stored

    # -- storing ------------------------------------------------------------------------------------
    async def _check(self, plan: ExperimentPlan) -> None:
        """The rule-set versions arms serve exist and fit the served snapshot."""
        rules = self.keeper.rules_documents
        for index, experiment in enumerate(plan.experiments):
            for version in sorted(rule_versions(ExperimentPlan([experiment]))):
                try:
                    body = await rules.get(version)
                except StoreError as exc:
                    raise ApiError(503, "store-unavailable", str(exc)) from None
                field = f"experiments[{index}]"
                if body is None:
                    raise ApiError(
                        422,
                        "invalid-experiments",
                        f"experiment {experiment.id!r}: an arm serves rule-set version {version}, which is not stored",
                        field=field,
                        experiment=experiment.id,
                    )
                rec = self.gateway.recommender
                if rec is None:
                    continue
                try:
                    await asyncio.to_thread(self.gateway.rules.compile, parse_rules(body), version, rec.snap)
                except RuleSetError as exc:
                    raise ApiError(
                        422,
                        "invalid-experiments",
                        f"experiment {experiment.id!r}: rule-set version {version} does not fit the served "
                        f"snapshot: {exc}",
                        field=field,
                        experiment=experiment.id,
                    ) from None

    async def _store(self, plan: ExperimentPlan, *, activate: bool, note: str) -> ExperimentsStored:
        await self._check(plan)
        documents = self.keeper.documents
        try:
            before = await history(documents)
            plan = advanced(plan, before)
            revision = await documents.put(msgspec.json.encode(plan), now=time.time(), note=note)
            if activate:
                await documents.activate(revision.version, now=time.time())
                await self.keeper.refresh()
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        phases = [PhaseOf(e.id, e.phase, e.id in before and e.phase != before[e.id].phase) for e in plan.experiments]
        return ExperimentsStored(revision.version, revision.sha256, revision.created_at, activate, phases)

    async def put(self, request: Request) -> Response:
        q = parse_query(request, ExperimentsQuery)
        body = await read_body(request, MAX_PLAN_BODY)
        try:
            plan = parse(body)
        except ExperimentError as exc:
            raise ApiError(422, "invalid-experiments", str(exc), field=exc.field, experiment=exc.experiment) from None
        return json_response(await self._store(plan, activate=q.activate, note=q.note), 201)

    async def _switch(self, request: Request, status: str) -> Response:
        experiment_id = request.path_params["experiment_id"]
        plan = self.keeper.plan
        found = self.keeper.experiment(experiment_id)
        if found is None:
            raise ApiError(
                404, "not-found", f"no experiment {experiment_id!r} in the active plan", field="experiment_id"
            )
        changed = ExperimentPlan(
            [msgspec.structs.replace(e, status=status) if e.id == experiment_id else e for e in plan.experiments]
        )
        await self._store(changed, activate=True, note=f"{status} {experiment_id}")
        return await self._overview()

    async def start(self, request: Request) -> Response:
        return await self._switch(request, "running")

    async def stop(self, request: Request) -> Response:
        return await self._switch(request, "stopped")

    # -- versions ------------------------------------------------------------------------------------
    async def overview(self, request: Request) -> Response:
        return await self._overview()

    async def _overview(self) -> Response:
        state, versions, activations = await self.history()
        keeper = self.keeper
        slices = keeper.allocation.slices()
        experiments = [
            ExperimentState(e.id, e.layer, e.status, e.phase, e.coverage, list(slices[e.id]), _shares(e))
            for e in keeper.plan.experiments
        ]
        return json_response(
            ExperimentsOverview(
                active=state.active,
                serving=keeper.state.active,
                experiments=experiments,
                versions=versions,
                activations=activations,
                problem=keeper.problem,
            )
        )

    # -- report ------------------------------------------------------------------------------------
    async def report(self, request: Request) -> Response:
        q = parse_query(request, ReportQuery)
        experiment_id = request.path_params["experiment_id"]
        experiment = self.keeper.experiment(experiment_id)
        if experiment is None:
            try:
                experiment = (await history(self.keeper.documents)).get(experiment_id)
            except StoreError as exc:
                raise ApiError(503, "store-unavailable", str(exc)) from None
        if experiment is None:
            raise ApiError(404, "not-found", f"no experiment {experiment_id!r}", field="experiment_id")
        await self.keeper.flush()  # this node's exposures queued so far count too
        phase = experiment.phase if q.phase is None else q.phase
        if phase > experiment.phase:
            raise ApiError(
                404, "not-found", f"experiment {experiment_id!r} is in phase {experiment.phase}", field="phase"
            )
        try:
            totals = await self.keeper.ledger.totals(experiment_id, phase)
            then = (
                experiment if phase == experiment.phase else await design(self.keeper.documents, experiment_id, phase)
            )
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        # The arms and weights of that phase; an arm with data the design lacks (none should) shows
        # with weight 0, which the sample-ratio check flags.
        shares = {arm.name: arm.share for arm in _shares(then)} if then is not None else {}
        variants = [
            experiment_stats.VariantData(
                name=name,
                weight=shares.get(name, 0.0),
                exposures=arm.exposures if arm else 0,
                conversions=dict(arm.conversions) if arm else {},
                revenue_sum=arm.revenue_sum if arm else 0.0,
                revenue_sum_squares=arm.revenue_sum_squares if arm else 0.0,
            )
            for name in [*shares, *sorted(set(totals) - set(shares))]
            for arm in [totals.get(name)]
        ]
        if not variants:
            raise ApiError(404, "not-found", f"no data for phase {phase} of {experiment_id!r}", field="phase")
        metrics = [m for m in experiment.metrics if m != REVENUE]
        body = experiment_stats.report(
            variants,
            control=variants[0].name,
            metrics=metrics,
            alpha=q.alpha,
            min_sample=experiment.min_sample,
            revenue=REVENUE in experiment.metrics,
        )
        return json_response(ExperimentReport(experiment_id, phase, experiment.status, body))


def _shares(experiment: Experiment) -> list[ArmShare]:
    cells = arms(experiment)
    total = math.fsum(cell.weight for cell in cells)
    return [ArmShare(cell.name, cell.weight / total, cell.overrides) for cell in cells]
