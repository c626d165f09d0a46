"""The long-lived state of one gateway process and its lifecycle: settings, store, the snapshot
being served and its swaps, the rule and experiment keepers, triggers, metrics. It knows nothing of
HTTP: the routes (gateway.api) read and call it, and gateway.app wires the two together.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

from gateway import settings as config
from gateway.catalog.keeper import CatalogKeeper
from gateway.catalog.view import derive
from gateway.experiments.keeper import OUTSIDE, Enrolment, ExperimentKeeper
from gateway.metrics import Metrics
from gateway.privacy import keys as privacy
from gateway.privacy.access import Access
from gateway.recommend import kernels
from gateway.recommend.pipeline import Answer, Recommender
from gateway.rules.book import Book
from gateway.rules.conditions import NO_CONTEXT, Context
from gateway.rules.document import RuleSet
from gateway.rules.keeper import RuleKeeper
from gateway.rules.triggers import TriggerEngine
from gateway.snapshot import Snapshot, SnapshotRefusedError, current_version, load, load_current
from gateway.store import (
    PURPOSES,
    Requirement,
    Retention,
    Store,
    open_catalog,
    open_documents,
    open_ledger,
    open_store,
)
from gateway.store.guard import GuardedStore
from gateway.tasks import stop as stop_task
from index_builder import snapshot as published
from index_builder.schema import BUILT_IN_EVENTS, LiveItem

log = logging.getLogger("tailor.gateway")

T = TypeVar("T")


class Reloaded(NamedTuple):
    changed: bool
    version: str
    previous: str | None


class Gateway:
    """The long-lived state of one gateway process."""

    def __init__(
        self,
        settings: config.Settings,
        store: Store | None = None,
        *,
        prepare: Callable[[Snapshot], Snapshot] = lambda snap: snap,
    ) -> None:
        """`prepare` readies a loaded snapshot for serving (the API encodes its items' fragments), in
        the thread that loads it."""
        self.settings = settings
        self._prepare = prepare
        self.root = Path(settings.snapshots)
        self.metrics = Metrics()
        self.store = (
            store
            if store is not None
            else open_store(settings.store, event_log=settings.event_log, event_log_keep_s=settings.event_log_ttl_s)
        )
        self.retention = Retention(
            keep=settings.recent_keep,
            ttl=settings.profile_ttl_s,
            ids=settings.event_ids_keep,
            windows=tuple(settings.counter_windows_s),
            max_counters=settings.max_counters,
            log=settings.event_log_max,
            log_ttl=settings.event_log_ttl_s,
        )
        self.secret, pseudonym_key = privacy.keys(settings)
        self.pseudonym = privacy.Pseudonyms(pseudonym_key)
        # What each purpose needs under the consent model: a choice decides, none means the default.
        self.requirements = {p: Requirement(p, default=settings.consent_mode == "opt-out") for p in PURPOSES}
        self.personalization = self.requirements["personalization"]
        self.analytics = self.requirements["analytics"]
        self.event_types = frozenset(BUILT_IN_EVENTS) | frozenset(settings.custom_events)
        self.access = Access(
            public_keys=settings.public_keys,
            admin_keys=settings.admin_keys,
            rate_per_s=settings.rate_limit_per_s,
            burst=settings.rate_limit_burst,
        )
        if not self.access.enabled:
            log.warning("no API keys configured (public_keys, admin_keys): every route is open to every caller")
        self.guard = GuardedStore(
            self.store,
            timeout_s=settings.store_timeout_ms / 1000,
            retry_after_s=settings.store_retry_after_s,
            on_error=lambda kind: self.metrics.store_errors.labels(kind).inc(),
        )
        self.executor = ThreadPoolExecutor(settings.compute_threads, thread_name_prefix="tailor-compute")
        self.recommender: Recommender | None = None
        self.base: Snapshot | None = None  # the snapshot as loaded; the one served is the live catalog over it
        self.catalog = CatalogKeeper(
            open_catalog(self.store, settings.catalog_file),
            apply=self._apply_catalog,
            poll_s=settings.catalog_poll_s,
            on_applied=self.metrics.catalog_applied,
        )
        # Told the ids of items withheld by a catalog change that were served before it.
        self._on_catalog: list[Callable[[frozenset[str]], None]] = []
        self.refused: dict[str, list[str]] = {}
        self.rules = RuleKeeper(
            open_documents(self.store, "rules", settings.rules_dir),
            windows=self.retention.windows,
            install=self._install_book,
            snapshot=lambda: self.recommender.snap if self.recommender is not None else None,
            activated=self._rules_activated,
            poll_s=settings.rules_poll_s,
        )
        self.experiments = ExperimentKeeper(
            open_documents(self.store, "experiments", settings.experiments_dir),
            open_ledger(self.store),
            rules=self.rules.documents,
            compile_rules=lambda ruleset, version, snap: self.rules.compile(
                ruleset, version, snap, self.rules.state.flags, strict=False
            ),
            snapshot=lambda: self.recommender.snap if self.recommender is not None else None,
            ttl=settings.experiment_ttl_s,
            poll_s=settings.rules_poll_s,
            on_exposed=self.metrics.experiment_exposures.inc,
        )
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex() + "-"
        self._on_swap: list[Callable[[], None]] = []  # told when a new snapshot replaced the one served
        self.marketing = self.requirements["marketing"]
        self.triggers = TriggerEngine(
            self.store,
            requires=self.marketing,
            windows=self.retention.windows,
            poll_s=settings.trigger_poll_s,
            inbox_keep=settings.trigger_inbox_keep,
            inbox_ttl_s=settings.trigger_inbox_ttl_s,
            on_fired=lambda trigger: self.metrics.triggers_fired.labels(trigger).inc(),
            on_scheduled=lambda trigger: self.metrics.trigger_timers_scheduled.labels(trigger).inc(),
            on_cancelled=lambda trigger: self.metrics.trigger_timers_cancelled.labels(trigger).inc(),
        )

    async def start(self) -> None:
        await self.catalog.start()  # the live records first: the first snapshot is served with them
        records, read = self.catalog.pending(), self.catalog.seq
        try:
            base, snap, refusals = await asyncio.to_thread(self._load_current, records, read)
        except SnapshotRefusedError as refused:
            refusals = [refused]
            log.error("no snapshot to serve yet: %s", refused)
        else:
            self._install(base, snap)
        await self.rules.start()
        await self.experiments.start()
        for refusal in refusals:
            self.metrics.reloads.labels("refused").inc()
            if refusal.version is not None:
                self.refused[refusal.version] = refusal.problems
        if not await self.guard.ping():
            log.warning("store %s is not reachable yet; serving popular items until it is", self.settings.store)
        if self.settings.watch_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="snapshot-watcher")
        self._flusher = asyncio.create_task(self._flush_metrics(), name="metrics-flush")
        self.triggers.start()

    async def stop(self) -> None:
        await self.triggers.stop()
        await self.experiments.stop()
        await self.rules.stop()
        await self.catalog.stop()
        await stop_task(self._flusher)
        await stop_task(self._watcher)
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # Run in a worker thread: reading, verifying and preparing a snapshot takes a while.
    def _load_current(
        self, records: list[tuple[int, LiveItem]], read: int
    ) -> tuple[Snapshot, Snapshot, list[SnapshotRefusedError]]:
        snap, refusals = load_current(self.root, verify=self.settings.verify_snapshots)
        base = self._prepared(snap)
        return base, self._view(base, records, read), refusals

    def _load(self, directory: Path, records: list[tuple[int, LiveItem]], read: int) -> tuple[Snapshot, Snapshot]:
        base = self._prepared(load(directory, verify=self.settings.verify_snapshots))
        return base, self._view(base, records, read)

    def _view(self, prev: Snapshot, records: list[tuple[int, LiveItem]], read: int) -> Snapshot:
        """What to serve: `prev` (a loaded snapshot, or the view of it served now) with the live
        records after it applied, every change up to `read` among them (gateway.catalog.view)."""
        return derive(prev, records, read_upto=read, serve_out_of_stock=self.settings.serve_out_of_stock)

    def _prepared(self, snap: Snapshot) -> Snapshot:
        """`snap` ready to serve: the kernels compiled for its arrays, then `prepare`."""
        kernels.warm_up(snap.item_vectors, snap.gram_inverse, snap.neighbour_rows)
        return self._prepare(snap)

    def _install(self, base: Snapshot, snap: Snapshot, book: Book | None = None) -> str | None:
        """Serve `snap` (the live catalog over `base`, a newly loaded snapshot), with `book` (the
        active rules compiled for it) from its first request."""
        previous = self.recommender.snap.version if self.recommender is not None else None
        self.base = base
        self._serve(snap, book)
        # Types the build weighs (say, `rating`) are accepted too.
        self.event_types = (
            frozenset(BUILT_IN_EVENTS) | frozenset(self.settings.custom_events) | snap.event_weights.keys()
        )
        self.metrics.serving(snap.version, snap.created, previous)
        self.metrics.reloads.labels("ok").inc()
        if previous is not None:
            for swapped in self._on_swap:
                swapped()
        log.info("serving snapshot %s (%d items, index %s)", snap.version, len(snap.item_ids), snap.method)
        return previous

    def _serve(self, snap: Snapshot, book: Book | None) -> None:
        """Answer from `snap` from the next request on: a new recommender, so nothing cached of the
        one before (another snapshot, or the same one before a catalog change) is served again."""
        s = self.settings
        recommender = Recommender(
            snap,
            self.guard,
            offload=self.offload,
            pool_size=s.candidate_pool,
            cache_entries=s.cache_entries,
            recent_limit=s.recent_limit,
            max_age_s=s.max_snapshot_age_s,
        )
        recommender.book = book
        self.recommender = recommender
        self.rules.adopt(book)
        # A snapshot is hundreds of thousands of long-lived objects (item table, category sets); left
        # in the collector's generations they make every full collection a pause of tens to hundreds
        # of milliseconds. Frozen, the cyclic collector skips them; reference counting still frees
        # them when a reload drops the old snapshot. (O(1): no collection runs here.)
        gc.freeze()
        self.metrics.catalog_items.set(len(snap.item_ids))
        self.metrics.catalog_withheld.set(len(snap.withheld))
        self.metrics.catalog_live.set(sum(item.changed > snap.created for _, item in self.catalog.items.values()))

    async def _apply_catalog(self) -> None:
        """Serve the live records as they are now (the catalog keeper calls this after changes):
        the view made again over the loaded snapshot, the rules compiled for it, swapped in whole."""
        async with self._reload_lock:
            rec = self.recommender
            if rec is None:
                return  # applied with the first snapshot
            before = rec.snap
            records, read = self.catalog.pending(before.live_seq), self.catalog.seq
            snap = await asyncio.to_thread(self._view, before, records, read)
            book = await asyncio.to_thread(self.rules.compile_for, snap)
            arm_books = await asyncio.to_thread(self.experiments.books_for, snap)
            self._serve(snap, book)
            self.experiments.adopt(arm_books)
        withdrawn = _ids(snap, snap.withheld) - _ids(before, before.withheld)
        if withdrawn:
            for told in self._on_catalog:
                told(withdrawn)

    def on_catalog(self, withdrawn: Callable[[frozenset[str]], None]) -> None:
        """Call `withdrawn(item ids)` whenever a catalog change stops serving items that were served."""
        self._on_catalog.append(withdrawn)

    async def reload(self) -> Reloaded:
        """Load what CURRENT names and swap it in; raise SnapshotRefusedError and keep serving if it fails."""
        async with self._reload_lock:
            version = await asyncio.to_thread(current_version, self.root)
            if version is None:
                raise SnapshotRefusedError(None, [f"no {published.POINTER} pointer under {self.root}"])
            serving = self.recommender.snap.version if self.recommender is not None else None
            if version == serving:
                return Reloaded(changed=False, version=version, previous=serving)
            try:
                records, read = self.catalog.pending(), self.catalog.seq
                base, snap = await asyncio.to_thread(self._load, self.root / version, records, read)
            except SnapshotRefusedError as refused:
                self.metrics.reloads.labels("refused").inc()
                self.refused[version] = refused.problems
                log.error("%s; still serving %s", refused, serving)
                raise
            self.refused.pop(version, None)
            book = await asyncio.to_thread(self.rules.compile_for, snap)
            arm_books = await asyncio.to_thread(self.experiments.books_for, snap)
            previous = self._install(base, snap, book)
            self.experiments.adopt(arm_books)
            return Reloaded(changed=True, version=version, previous=previous)

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.metrics.flush()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                version = await asyncio.to_thread(current_version, self.root)
                serving = self.recommender.snap.version if self.recommender is not None else None
                if version is not None and version != serving and version not in self.refused:
                    await self.reload()
            except SnapshotRefusedError:
                pass  # logged by reload(); retried when the pointer names another version
            except Exception:
                log.exception("snapshot watcher")

    def _rules_activated(self, ruleset: RuleSet | None, version: int) -> None:
        """A rule-set version became active (None: none is): its triggers replace the others."""
        try:
            self.triggers.use(ruleset.triggers if ruleset is not None else [], version)
        except ValueError as exc:  # checked when stored; only a changed gateway setting gets here
            log.error("rules version %s: triggers not used: %s", version, exc)

    def _install_book(self, book: Book | None) -> None:
        """Called by the rule keeper: serve `book` from the next request on (if it was compiled for
        the snapshot being served; otherwise the keeper compiles again for this one)."""
        rec = self.recommender
        if rec is None:
            return
        if book is not None and book.snap is not rec.snap:
            self.rules.changed()
            return
        rec.book = book
        self.experiments.rules_changed()  # the arms' rule sets follow the flags
        self.metrics.rules_version.set(book.version or 0 if book is not None else 0)

    def offload(self, compute: Callable[[], T]) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, compute)

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    async def recommendation(
        self,
        rec: Recommender,
        key: str | None,
        user: str | None,
        *,
        n: int,
        categories: list[str],
        exclude: Collection[str],
        context: Context = NO_CONTEXT,
        inbox: Requirement | None = None,
    ) -> tuple[Answer, Enrolment | None]:
        """The visitor's answer, made as the arms of the experiments they are in say; an exposure is
        counted when the answer was made from their profile and their consent allows analytics."""
        now = time.time()
        enrolment = self.experiments.enrol(key, rec.snap, now) if key is not None else None
        arms = enrolment or OUTSIDE
        answer = await rec.recommend(
            key=key,
            user=user,
            n=n,
            categories=categories,
            exclude=exclude,
            requires=self.personalization,
            now=now,
            context=context,
            inbox=inbox,
            rules=arms.rules,
            ranking=arms.ranking,
            recent_limit=arms.recent_limit,
        )
        if enrolment is None:
            return answer, None
        read = answer.read
        if key is not None and read is not None and self.analytics.permits(read.consent, now):
            self.experiments.exposed(key, enrolment)
        return answer, enrolment

    def on_swap(self, swapped: Callable[[], None]) -> None:
        """Call `swapped()` whenever a new snapshot replaces the one being served."""
        self._on_swap.append(swapped)


def _ids(snap: Snapshot, rows: frozenset[int]) -> frozenset[str]:
    item_ids = snap.item_ids
    return frozenset(item_ids[row] for row in rows)
