"""This node's experiments: the active plan, who is in which arm, what an arm changes in an answer,
and the bookkeeping a report is read from.

The plan is a versioned document like a rule set (gateway.store.documents): every node follows the
active version and makes an `Allocation` of it, so a visitor's arms are computed, not looked up, and
agree on every node (gateway.experiments.plan). Per request, `enrol` gives the arms of the visitor's
pseudonym and what they change: the rule-set version to serve (compiled here for the served
snapshot, beside the active one), the ranking, the recent events folded in; every item's reasons
then name the experiment, phase and arm.

Exposures are counted once per visitor per phase in the ledger (gateway.store.ledger), which holds
the first arm each visitor was served; they are written in batches off the request path, and a
node remembers whom it has already written so that a visitor's later requests write nothing.
Conversions: a stored click carrying the `request_id` of an answer (a click on a recommended item),
add-to-cart, purchase (and custom event types an experiment lists as metrics) count once per
visitor per metric for every experiment the visitor was exposed in; a purchase's `value` is revenue.
Only what the visitor's analytics consent lets the gateway store is counted: an exposure when the
profile read found consent, a conversion when the event was stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.experiments.plan import Allocation, Assignment, Experiment, ExperimentPlan, advance, arms, parse
from gateway.rules.book import Book
from gateway.rules.document import RuleSet, RuleSetError
from gateway.rules.document import parse as parse_rules
from gateway.snapshot import Snapshot
from gateway.store import Recorded, StoreError
from gateway.store.documents import Documents, Follower, State
from gateway.store.ledger import Exposure, Ledger
from gateway.tasks import stop as stop_task

log = logging.getLogger("tailor.experiments")

REVENUE = "revenue"
# A purchase worth more than this is a unit mistake or an attack, not revenue: its square would
# swamp (or overflow) the variance of every other visitor's.
MAX_REVENUE = 1e9
CLICK = "click"
Ranking = Literal["personal", "popular"]


@dataclass(frozen=True, slots=True)
class Enrolment:
    """A visitor's arms, and what they change in the answer."""

    assignments: tuple[Assignment, ...]
    reasons: tuple[str, ...]  # "experiment:<id>@<phase>:<arm>", one per assignment
    rules: Book | Literal["active"] | None  # the rules to serve: a version's, the active ones, none
    ranking: Ranking
    recent_limit: int | None


# What a visitor in no experiment gets: the active rules, the model's ranking, the usual settings.
OUTSIDE = Enrolment((), (), "active", "personal", None)

Compile = Callable[[RuleSet, int, Snapshot], Book]


class ExperimentKeeper(Follower):
    def __init__(
        self,
        documents: Documents,
        ledger: Ledger,
        *,
        rules: Documents,
        compile_rules: Compile,
        snapshot: Callable[[], Snapshot | None],
        ttl: float,
        poll_s: float = 5.0,
        flush_s: float = 0.2,
        remembered: int = 50_000,
        on_exposed: Callable[[int], None] = lambda count: None,
    ) -> None:
        super().__init__(documents, poll_s=poll_s)
        self.ledger = ledger
        self.rules_documents = rules
        self._compile = compile_rules  # a rule set for a snapshot, items it lacks skipped
        self._snapshot = snapshot
        self.ttl = ttl
        self.flush_s = flush_s
        self.state = State()
        self.plan = ExperimentPlan()
        self.allocation = Allocation(self.plan)
        self.metric_events: frozenset[str] = frozenset()
        self.problem: str | None = None
        # The rule-set versions arms serve, parsed, and compiled for one snapshot.
        self.rulesets: dict[int, RuleSet] = {}
        self.books: dict[int, Book] = {}
        self._lock = asyncio.Lock()
        self._recompile = True
        self._queue: list[Exposure] = []
        self._written: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self._remembered = remembered
        self._on_exposed = on_exposed
        self._flusher: asyncio.Task[None] | None = None

    # -- following the active plan --------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        self._flusher = asyncio.create_task(self._flush_every(), name="experiments-exposures")

    async def stop(self) -> None:
        await stop_task(self._flusher)
        await self.flush()
        await super().stop()
        await self.ledger.close()

    def rules_changed(self) -> None:
        """The rules' flags or the snapshot changed: compile the arms' rule sets again."""
        self._recompile = True
        self.changed()

    async def refresh(self) -> None:
        """Serve the plan the documents say is active (and compile the rule sets its arms use)."""
        async with self._lock:
            try:
                state = await self.documents.state()
            except StoreError as exc:
                log.warning("experiments: cannot read the active version (%s); keeping %s", exc, self.state.active)
                return
            if state == self.state and not self._recompile:
                return
            self._recompile = False
            plan = ExperimentPlan()
            if state.active is not None:
                try:
                    body = await self.documents.get(state.active)
                except StoreError as exc:
                    log.warning("experiments: cannot read version %s (%s)", state.active, exc)
                    return
                if body is None:
                    self.problem = f"version {state.active} is missing"
                    log.error("experiments: %s; keeping %s", self.problem, self.state.active)
                    return
                plan = parse(body)
            rulesets = await self._rulesets(plan)
            if rulesets is None:
                return
            snap = self._snapshot()
            books = await asyncio.to_thread(self.books_for, snap, rulesets) if snap is not None else {}
            self.rulesets, self.books = rulesets, books
            self.plan, self.allocation, self.state, self.problem = plan, Allocation(plan), state, None
            self.metric_events = frozenset(
                metric for e in plan.experiments if e.status == "running" for metric in e.metrics if metric != REVENUE
            )
            log.info("experiments: serving version %s (%d experiments)", state.active, len(plan.experiments))

    async def _rulesets(self, plan: ExperimentPlan) -> dict[int, RuleSet] | None:
        """The rule sets the plan's running arms serve; None (keep the old plan) if one cannot be read."""
        found: dict[int, RuleSet] = {}
        for version in sorted(rule_versions(plan)):
            if version in self.rulesets:
                found[version] = self.rulesets[version]
                continue
            try:
                body = await self.rules_documents.get(version)
            except StoreError as exc:
                log.warning("experiments: cannot read rule-set version %s (%s)", version, exc)
                return None
            if body is None:
                self.problem = f"rule-set version {version}, which an arm serves, is missing"
                log.error("experiments: %s; keeping %s", self.problem, self.state.active)
                return None
            found[version] = parse_rules(body)
        return found

    def books_for(self, snap: Snapshot, rulesets: dict[int, RuleSet] | None = None) -> dict[int, Book]:
        """The arms' rule sets compiled for `snap` (in a worker thread: compiling takes a while)."""
        books = {}
        for version, ruleset in (self.rulesets if rulesets is None else rulesets).items():
            try:
                books[version] = self._compile(ruleset, version, snap)
            except RuleSetError as exc:
                log.error("experiments: rule-set version %s does not fit snapshot %s: %s", version, snap.version, exc)
        return books

    def adopt(self, books: dict[int, Book]) -> None:
        """A snapshot swap compiled `books` for the new snapshot."""
        self.books = books

    # -- per request ------------------------------------------------------------------------------
    def enrol(self, key: str, snap: Snapshot, now: float) -> Enrolment | None:
        """The visitor's arms and what they change; None when they are in no experiment, or an arm's
        rules are not compiled for `snap` yet (a snapshot swap in progress: served as if outside)."""
        if not self.plan.experiments:
            return None
        assigned = self.allocation.assign(key, now)
        if not assigned:
            return None
        rules: Book | Literal["active"] | None = "active"
        ranking: Ranking = "personal"
        recent_limit = None
        for assignment in assigned.values():
            overrides = assignment.overrides
            version = overrides.rules_version
            if version == 0:
                rules = None
            elif version is not None:
                book = self.books.get(version)
                if book is None or book.snap is not snap:
                    return None
                rules = book
            knobs = overrides.settings
            ranking = knobs.ranking or ranking
            recent_limit = knobs.recent_limit or recent_limit
        assignments = tuple(assigned.values())
        return Enrolment(assignments, tuple(a.reason for a in assignments), rules, ranking, recent_limit)

    def exposed(self, key: str, enrolment: Enrolment) -> None:
        """The visitor was served `enrolment`: count the exposure (once per phase; written soon)."""
        written = self._written
        for a in enrolment.assignments:
            mark = (key, a.experiment, a.phase)
            if mark in written:
                written.move_to_end(mark)
                continue
            written[mark] = None
            if len(written) > self._remembered:
                written.popitem(last=False)
            self._queue.append(Exposure(key, a.experiment, a.phase, a.arm))

    async def flush(self) -> None:
        """Write the queued exposures, one round trip; on a store failure they are dropped (logged)."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        try:
            fresh = await self.ledger.expose(queue, ttl=self.ttl)
        except StoreError as exc:
            for exposure in queue:  # written next time they are served
                self._written.pop((exposure.visitor, exposure.experiment, exposure.phase), None)
            log.warning("experiments: %d exposures not written: %s", len(queue), exc)
            return
        self._on_exposed(sum(fresh))

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def convert(self, key: str, events: Sequence[Recorded]) -> int:
        """Count the conversions in a visitor's stored events; the experiments they were credited to."""
        metrics = self.metric_events
        if not metrics:
            return 0
        found: set[str] = set()
        revenue = 0.0
        for event in events:
            if event.event == CLICK and event.request_id is None:
                continue  # a click on something else than a recommendation
            if event.event in metrics:
                found.add(event.event)
            if event.event == "purchase" and event.value is not None and 0 < event.value <= MAX_REVENUE:
                revenue += event.value
        if not found and revenue <= 0:
            return 0
        if any(exposure.visitor == key for exposure in self._queue):
            await self.flush()  # the visitor's exposure must be counted before their conversion
        try:
            credited = await self.ledger.convert(key, sorted(found), revenue, ttl=self.ttl)
        except StoreError as exc:
            log.warning("experiments: conversions not counted: %s", exc)
            return 0
        return len(credited)

    def experiment(self, experiment_id: str) -> Experiment | None:
        return next((e for e in self.plan.experiments if e.id == experiment_id), None)


def rule_versions(plan: ExperimentPlan) -> set[int]:
    """The rule-set versions (not 0: none) the running experiments' arms serve."""
    return {
        arm.overrides.rules_version
        for experiment in plan.experiments
        if experiment.status != "stopped"
        for arm in arms(experiment)
        if arm.overrides.rules_version
    }


async def stored(documents: Documents) -> list[Experiment]:
    """Every experiment of every stored plan version, oldest version first."""
    found: list[Experiment] = []
    for revision in await documents.revisions():
        body = await documents.get(revision.version)
        if body is not None:
            found.extend(parse(body).experiments)
    return found


async def history(documents: Documents) -> dict[str, Experiment]:
    """Each experiment ever stored, as its latest stored version has it (the phases to advance from)."""
    return {e.id: e for e in await stored(documents)}


async def design(documents: Documents, experiment_id: str, phase: int) -> Experiment | None:
    """The experiment as the latest stored version of its phase `phase` has it (arms and weights
    stay the same within a phase)."""
    return {e.phase: e for e in await stored(documents) if e.id == experiment_id}.get(phase)


def advanced(plan: ExperimentPlan, before: dict[str, Experiment]) -> ExperimentPlan:
    """`plan` with the phases that follow from every experiment's last stored design."""
    return advance(ExperimentPlan([before[e.id] for e in plan.experiments if e.id in before]), plan)
