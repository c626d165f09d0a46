"""Prometheus metrics of one gateway process, in a registry of its own (so tests can build many apps)."""

from __future__ import annotations

import collections
import gc
import logging
import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Sub-millisecond resolution where the gateway lives, up to a second for the pathological tail.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SLOW_GC_S = 0.05

log = logging.getLogger("tailor.gateway")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "tailor_request_seconds", "Request latency by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.responses = Counter("tailor_responses", "Responses by route and status", ["route", "status"], registry=r)
        self.fallbacks = Counter("tailor_fallbacks", "Answers from popular items, by cause", ["cause"], registry=r)
        self.store_errors = Counter("tailor_store_errors", "Store calls that failed, by kind", ["kind"], registry=r)
        # Read from the cache's own counters at scrape time, so the hot path pays nothing for them.
        self.cache_lookups = Gauge(
            "tailor_candidate_cache_lookups",
            "Candidate pool lookups since the snapshot was loaded, by result",
            ["result"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_entries = Gauge(
            "tailor_candidate_cache_entries", "Candidate pools cached", registry=r, multiprocess_mode="livesum"
        )
        self.pushes = Counter("tailor_stream_pushes", "Lists pushed to sockets, by cause", ["cause"], registry=r)
        self.stream_drops = Counter(
            "tailor_stream_refusals", "Sockets refused or dropped, by reason", ["reason"], registry=r
        )
        self.store_visitors = Gauge(
            "tailor_store_visitors",
            "Visitors the memory store of this process holds (memory:// only)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_bytes = Gauge(
            "tailor_store_bytes",
            "Estimated resident bytes of the visitors the memory store holds (bounded by ?max_mb)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams = Gauge("tailor_streams_open", "Open WebSocket streams", registry=r, multiprocess_mode="livesum")
        self.gc_pauses = Histogram(
            "tailor_gc_pause_seconds",
            "Garbage collections by generation",
            ["generation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.experiment_exposures = Counter(
            "tailor_experiment_exposures", "Visitors newly exposed to an experiment's phase (written)", registry=r
        )
        self.experiment_conversions = Counter(
            "tailor_experiment_conversions",
            "Event batches credited to an experiment a visitor was exposed in",
            registry=r,
        )
        self.erasures = Counter("tailor_erasures", "Visitors erased (DELETE /v1/visitors/{id})", registry=r)
        self.reloads = Counter("tailor_snapshot_reloads", "Snapshot loads by result", ["result"], registry=r)
        self.events = Counter("tailor_events_accepted", "Behaviour events stored, by type", ["event"], registry=r)
        self.events_rejected = Counter(
            "tailor_events_rejected", "Events refused in accepted batches, by reason", ["code"], registry=r
        )
        self.events_duplicate = Counter("tailor_events_duplicate", "Events whose id was stored before", registry=r)
        self.events_unconsented = Counter(
            "tailor_events_unconsented",
            "Valid events not stored: their visitor has not allowed analytics (an anonymous count)",
            ["event"],
            registry=r,
        )
        self.consent_changes = Counter(
            "tailor_consent_changes", "Consent choices recorded, by purpose and state", ["purpose", "state"], registry=r
        )
        self.rule_hits = Counter(
            "tailor_rule_hits",
            "Answers a rule changed (filtered, re-ranked, placed, capped, attached)",
            ["rule"],
            registry=r,
        )
        # Answers per list of rules that changed them, until `flush` sums them per rule: one dict
        # update per answer (collections.Counter.update over the list cost about 2 µs an answer).
        self._rule_hits: dict[tuple[str, ...], int] = {}
        self.rules_version = Gauge(
            "tailor_rules_version", "The active rule-set version (0: none)", registry=r, multiprocess_mode="max"
        )
        self.triggers_fired = Counter(
            "tailor_trigger_fired", "Trigger messages recorded (and pushed), by trigger", ["trigger"], registry=r
        )
        self.trigger_timers_scheduled = Counter(
            "tailor_trigger_timers_scheduled", "Trigger timers set, by trigger", ["trigger"], registry=r
        )
        self.trigger_timers_cancelled = Counter(
            "tailor_trigger_timers_cancelled",
            "Trigger timers cancelled by their `unless` event",
            ["trigger"],
            registry=r,
        )
        self.snapshot_info = Gauge(
            "tailor_snapshot_info",
            "The snapshot being served (value 1)",
            ["version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.snapshot_created = Gauge(
            "tailor_snapshot_created_seconds",
            "Build time of the served snapshot (Unix seconds)",
            registry=r,
            multiprocess_mode="max",
        )
        self.snapshot_age = Gauge(
            "tailor_snapshot_age_seconds", "Age of the served snapshot", registry=r, multiprocess_mode="max"
        )

        self.catalog_items = Gauge(
            "tailor_catalog_items",
            "Items the served catalog holds (the snapshot's and those added live), withheld ones included",
            registry=r,
            multiprocess_mode="max",
        )
        self.catalog_withheld = Gauge(
            "tailor_catalog_withheld",
            "Items of the served catalog no route serves (retired, unavailable, out of stock)",
            registry=r,
            multiprocess_mode="max",
        )
        self.catalog_live = Gauge(
            "tailor_catalog_live_items",
            "Items with a live record newer than the snapshot (changed through the catalog API)",
            registry=r,
            multiprocess_mode="max",
        )
        self.catalog_changes = Counter(
            "tailor_catalog_changes_applied", "Live catalog changes this node applied", registry=r
        )
        self.catalog_lag = Histogram(
            "tailor_catalog_lag_seconds",
            "From a catalog change taken (on any node) to this node serving it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )

    def catalog_applied(self, lags: list[float]) -> None:
        self.catalog_changes.inc(len(lags))
        for lag in lags:
            self.catalog_lag.observe(max(lag, 0.0))

    def rules_changed(self, refs: list[str]) -> None:
        """Count an answer's rules ("rule:<id>@<version>"): a dict update here, the Prometheus
        counters (a few µs per labelled increment) at `flush` time."""
        if refs:
            pending, key = self._rule_hits, tuple(refs)
            pending[key] = pending.get(key, 0) + 1

    def flush(self) -> None:
        """Hand what the hot path counted to Prometheus (every second, and at each scrape)."""
        pending, self._rule_hits = self._rule_hits, {}
        hits: collections.Counter[str] = collections.Counter()
        for refs, answers in pending.items():
            for ref in refs:
                hits[ref] += answers
        for ref, count in hits.items():
            self.rule_hits.labels(ref.partition("@")[0].removeprefix("rule:")).inc(count)

    def watch_gc(self) -> None:
        """Time every garbage collection: long pauses hold every request and push of the process."""
        started: dict[int, float] = {}
        pauses = self.gc_pauses

        def callback(phase: str, info: dict[str, int]) -> None:
            generation = info["generation"]
            if phase == "start":
                started[generation] = time.perf_counter()
                return
            began = started.pop(generation, None)
            if began is None:
                return
            seconds = time.perf_counter() - began
            pauses.labels(str(generation)).observe(seconds)
            if seconds > SLOW_GC_S:
                log.warning("garbage collection of generation %d took %.0f ms", generation, seconds * 1000)

        gc.callbacks.append(callback)

    def serving(self, version: str, created: float, previous: str | None) -> None:
        if previous is not None and previous != version:
            # 0 rather than remove(): removal does not reach the files of multi-process mode.
            self.snapshot_info.labels(previous).set(0)
        self.snapshot_info.labels(version).set(1)
        self.snapshot_created.set(created)

    def exposition(self, age: Callable[[], float | None]) -> bytes:
        self.flush()
        current = age()
        if current is not None:
            self.snapshot_age.set(current)
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            # Several workers: add up what every process wrote to the shared directory.
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
