"""The ASGI application: routes, lifespan (store, snapshot, watcher) and the handlers.

Everything here is translation between HTTP and the domain: parse and validate the query or body
into a declared type (`gateway.api.wire`, with `gateway.api.http` and `gateway.api.ingest`), call the pipeline
(`gateway.recommend.pipeline`), encode the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway import settings as config
from gateway.api import wire
from gateway.api.events import EventsApi
from gateway.api.experiments import ExperimentsApi
from gateway.api.http import (
    ApiError,
    JSONBytes,
    by_method,
    country_of,
    http_error,
    json_response,
    parse_query,
    unexpected_error,
)
from gateway.api.ops import OpsApi
from gateway.api.pages import PagesApi
from gateway.api.push import Hub
from gateway.api.rules import RulesApi
from gateway.api.stream import StreamApi
from gateway.api.visitors import VisitorsApi
from gateway.experiments.keeper import OUTSIDE, Enrolment, ExperimentKeeper
from gateway.metrics import Metrics
from gateway.privacy import keys as privacy
from gateway.privacy import tokens
from gateway.privacy.access import Access, AccessError, Scope
from gateway.privacy.access import key_of as access_key
from gateway.recommend import kernels
from gateway.recommend.pipeline import Answer, Recommender
from gateway.rules.book import Book
from gateway.rules.conditions import NO_CONTEXT, Context
from gateway.rules.document import RuleSet
from gateway.rules.keeper import RuleKeeper
from gateway.rules.plans import with_reasons
from gateway.rules.triggers import TriggerEngine
from gateway.snapshot import Snapshot, SnapshotRefusedError, current_version, load, load_current
from gateway.store import PURPOSES, Requirement, Retention, Store, open_documents, open_ledger, open_store
from gateway.store.guard import GuardedStore
from gateway.tasks import stop as stop_task
from index_builder import snapshot as published

log = logging.getLogger("tailor.gateway")

T = TypeVar("T")


class Gateway:
    """The long-lived state of one gateway process."""

    def __init__(self, settings: config.Settings, store: Store | None = None) -> None:
        self.settings = settings
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
        self.event_types = frozenset(wire.BUILT_IN_EVENTS) | frozenset(settings.custom_events)
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
        self.refused: dict[str, list[str]] = {}
        self.rules = RuleKeeper(
            open_documents(self.store, "rules", settings.rules_dir),
            windows=self.retention.windows,
            install=self._install_book,
            snapshot=lambda: self.recommender.snap if self.recommender is not None else None,
            activated=self._rules_activated,
            poll_s=settings.rules_poll_s,
        )
        self.rules_api = RulesApi(self, self.rules)
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
        self.experiments_api = ExperimentsApi(self, self.experiments)
        self.visitors_api = VisitorsApi(self)
        self.events_api = EventsApi(self)
        self.stream_api = StreamApi(self)
        self.pages_api = PagesApi(self)
        self.ops_api = OpsApi(self)
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex() + "-"
        self.hub = Hub(
            self.stream_api.answer,
            debounce_s=settings.push_debounce_ms / 1000,
            queue_size=settings.stream_queue,
            heartbeat_s=settings.heartbeat_s,
            max_streams=settings.max_streams,
            on_push=lambda cause: self.metrics.pushes.labels(cause).inc(),
            on_drop=lambda reason: self.metrics.stream_drops.labels(reason).inc(),
            on_count=self.metrics.streams.set,
        )
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

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            snap, refusals = await asyncio.to_thread(self._load_current)
        except SnapshotRefusedError as refused:
            refusals = [refused]
            log.error("no snapshot to serve yet: %s", refused)
        else:
            self._install(snap)
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
        self.store.subscribe(self.hub.changed)  # events taken here or by another process on the same store
        self.store.subscribe_messages(self.hub.deliver)  # triggers fired here or by another process
        self.store.subscribe_erasures(self.hub.disconnect)  # erasures taken here or by another process
        self.triggers.start()

    async def stop(self) -> None:
        await self.triggers.stop()
        await self.hub.close()
        await self.experiments.stop()
        await self.rules.stop()
        await stop_task(self._flusher)
        await stop_task(self._watcher)
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # Run in a worker thread: reading, verifying and preparing a snapshot takes a while.
    def _load_current(self) -> tuple[Snapshot, list[SnapshotRefusedError]]:
        snap, refusals = load_current(self.root, verify=self.settings.verify_snapshots)
        return _prepared(snap), refusals

    def _load(self, directory: Path) -> Snapshot:
        return _prepared(load(directory, verify=self.settings.verify_snapshots))

    def _install(self, snap: Snapshot, book: Book | None = None) -> str | None:
        """Serve `snap`, with `book` (the active rules compiled for it) from its first request."""
        previous = self.recommender.snap.version if self.recommender is not None else None
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
        # Types the build weighs (say, `rating`) are accepted too.
        self.event_types = (
            frozenset(wire.BUILT_IN_EVENTS) | frozenset(self.settings.custom_events) | snap.event_weights.keys()
        )
        self.metrics.serving(snap.version, snap.created, previous)
        self.metrics.reloads.labels("ok").inc()
        if previous is not None:
            self.hub.snapshot_swapped()
        log.info("serving snapshot %s (%d items, index %s)", snap.version, len(snap.item_ids), snap.method)
        return previous

    async def reload(self) -> wire.ReloadResult:
        """Load what CURRENT names and swap it in; raise SnapshotRefusedError and keep serving if it fails."""
        async with self._reload_lock:
            version = await asyncio.to_thread(current_version, self.root)
            if version is None:
                raise SnapshotRefusedError(None, [f"no {published.POINTER} pointer under {self.root}"])
            serving = self.recommender.snap.version if self.recommender is not None else None
            if version == serving:
                return wire.ReloadResult(changed=False, version=version, previous=serving)
            try:
                snap = await asyncio.to_thread(self._load, self.root / version)
            except SnapshotRefusedError as refused:
                self.metrics.reloads.labels("refused").inc()
                self.refused[version] = refused.problems
                log.error("%s; still serving %s", refused, serving)
                raise
            self.refused.pop(version, None)
            book = await asyncio.to_thread(self.rules.compile_for, snap)
            arm_books = await asyncio.to_thread(self.experiments.books_for, snap)
            previous = self._install(snap, book)
            self.experiments.adopt(arm_books)
            return wire.ReloadResult(changed=True, version=version, previous=previous)

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

    def request_id(self, request: Request) -> str:
        """The caller's X-Request-ID (UTF-8, so that it is echoed in the header byte for byte and in
        the body as the same text), or a new id when it is absent, over 128 characters, not UTF-8
        or not printable."""
        for name, value in request.scope["headers"]:  # ASGI lower-cases header names
            if name == b"x-request-id":
                try:
                    given: str = value.decode()
                except UnicodeDecodeError:
                    break
                if given and len(given) <= 128 and given.isprintable():
                    return given
                break
        return self.new_request_id()

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def serving(self) -> Recommender:
        if self.recommender is None:
            raise ApiError(503, "no-snapshot", "no snapshot loaded yet", headers={"retry-after": "5"})
        return self.recommender

    # -- routes ------------------------------------------------------------------------------
    def serving_for(self, categories: list[str]) -> Recommender:
        rec = self.serving()
        unknown = rec.unknown_categories(categories)
        if unknown:
            message = f"no category {unknown[0]!r} in snapshot {rec.snap.version}"
            raise ApiError(400, "unknown-category", message, field="category")
        return rec

    def n_of(self, n: int | None) -> int:
        value = self.settings.default_n if n is None else n
        if value > self.settings.max_n:
            raise ApiError(400, "invalid-parameter", f"n must be at most {self.settings.max_n}", field="n")
        return value

    # -- who a request acts for ----------------------------------------------------------------------
    def binds(self, connection: Request | WebSocket) -> bool:
        """Whether this caller must prove which visitor it is with a token: with API keys configured,
        every caller but an admin key (the site's backend). A browser holds only a public key, so
        it can read or write a visitor's data only with that visitor's token."""
        access = self.access
        if not access.enabled:
            return False
        return not access.is_admin(access_key(connection.scope["headers"], connection.scope.get("query_string", b"")))

    def token_of(self, connection: Request | WebSocket, given: str | None) -> str | None:
        if given is not None:
            return given
        for name, value in connection.scope["headers"]:
            if name == b"x-tailor-token":
                token: str = value.decode("latin-1")
                return token
        return None

    def acting_for(
        self, connection: Request | WebSocket, claimed: str | None, token: str | None, *, required: bool = False
    ) -> str | None:
        """The raw visitor id this request may read or write: its token's (a `claimed` id must then
        be the same), else the id it claims, which only a caller `binds` does not hold may do.
        `required`: a caller `binds` holds must show a token even when it claims no id."""
        token = self.token_of(connection, token)
        if token is not None:
            try:
                visitor, _ = tokens.verify(self.secret, token)
            except tokens.TokenError as refused:
                raise ApiError(401, refused.code, str(refused), field="token") from None
            if claimed is not None and claimed != visitor:
                raise ApiError(403, "not-your-visitor", "the token is for another visitor", field="visitor")
            return visitor
        if (claimed is not None or required) and self.binds(connection):
            raise ApiError(
                401,
                "token-required",
                "with a public key, a visitor is named by their token (`token` or X-Tailor-Token), not by id",
                field="token",
            )
        return claimed

    def _answer(
        self, request: Request, rec: Recommender, answer: Answer, enrolment: Enrolment | None = None
    ) -> Response:
        if answer.fallback is not None:
            self.metrics.fallbacks.labels(answer.fallback).inc()
        rid = self.request_id(request)
        body = wire.encode_recommendations(
            rec.snap,
            rid,
            with_reasons(answer.picks, enrolment.reasons) if enrolment is not None else answer.picks,
            answer.fallback,
            answer.profile,
            segments=answer.segments,
            rules=answer.rules,
            content=answer.content,
            messages=answer.messages,
            experiments=enrolment.reasons if enrolment is not None else (),
        )
        self.metrics.rules_changed(answer.rules)
        return JSONBytes(body, request_id=rid)

    async def recommend(self, request: Request) -> Response:
        q = parse_query(request, wire.RecommendQuery)
        rec = self.serving_for(q.category)
        if q.user is not None and q.visitor is not None:
            raise ApiError(400, "invalid-parameter", "give `user` or `visitor`, not both", field="visitor")
        raw = self.acting_for(request, q.user if q.user is not None else q.visitor, q.token)
        key = None if raw is None else self.pseudonym(raw)
        answer, enrolment = await self.recommendation(
            rec,
            key,
            raw,
            n=self.n_of(q.n),
            categories=q.category,
            exclude=q.exclude,
            context=Context(q.device, q.country or country_of(request), q.referrer, q.page),
            inbox=self.marketing,
        )
        return self._answer(request, rec, answer, enrolment)

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

    async def similar(self, request: Request) -> Response:
        q = parse_query(request, wire.SimilarQuery)
        rec = self.serving_for(q.category)
        item = request.path_params["item_id"]
        row = rec.snap.row_of.get(item)
        if row is None:
            raise ApiError(404, "unknown-item", f"no item {item!r} in snapshot {rec.snap.version}", field="item_id")
        answer = await rec.similar(row, n=self.n_of(q.n), categories=q.category, exclude=q.exclude)
        return self._answer(request, rec, answer)

    async def popular(self, request: Request) -> Response:
        q = parse_query(request, wire.PopularQuery)
        rec = self.serving_for(q.category)
        answer = rec.popular_answer(n=self.n_of(q.n), categories=q.category, exclude=q.exclude)
        return self._answer(request, rec, answer)

    def routes(self) -> list[BaseRoute]:
        # Routes are matched in order: the probes first (orchestrators call them all the time, and
        # the benchmark's ceiling is /healthz: it must not pay for matching the API's paths).
        table: list[tuple[str, str, Callable[[Request], Awaitable[Response]], str, Scope]] = [
            ("/healthz", "healthz", self.ops_api.healthz, "GET", "open"),
            ("/readyz", "readyz", self.ops_api.readyz, "GET", "open"),
            ("/v1/recommend", "recommend", self.recommend, "GET", "public"),
            ("/v1/items/{item_id}/similar", "similar", self.similar, "GET", "public"),
            ("/v1/popular", "popular", self.popular, "GET", "public"),
            *self.events_api.table(),
            ("/v1/token", "token", self.stream_api.token, "POST", "public"),
            *self.visitors_api.table(),
            ("/metrics", "metrics", self.ops_api.metrics_page, "GET", "admin"),
            ("/admin/reload", "reload", self.ops_api.admin_reload, "POST", "admin"),
            *self.rules_api.table(),
            *self.experiments_api.table(),
            *self.pages_api.table(),
        ]
        # One Route per path (a 405's Allow header then lists every method of the path).
        by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
        for path, name, handler, method, scope in table:
            by_path.setdefault(path, {})[method] = self._observed(name, handler, scope)
        routes: list[BaseRoute] = [
            Route(path, by_method(handlers), methods=list(handlers)) for path, handlers in by_path.items()
        ]
        routes.append(WebSocketRoute("/v1/stream", self.stream_api.stream))
        return routes

    def admit(self, scope: Scope, connection: Request | WebSocket) -> None:
        """Raise AccessError unless the caller's key allows `scope` and its bucket has a request left."""
        access = self.access
        key = access_key(connection.scope["headers"], connection.scope.get("query_string", b""))
        access.check(scope, key)
        if scope != "open":
            client = connection.client
            access.take(key or (client.host if client is not None else "?"), time.monotonic())

    def _observed(
        self, route: str, handler: Callable[[Request], Awaitable[Response]], scope: Scope
    ) -> Callable[[Request], Awaitable[Response]]:
        latency = self.metrics.latency.labels(route)
        responses = self.metrics.responses
        by_status: dict[int, Any] = {}  # labels() costs more than the increment it selects
        access = self.access

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if access.active:
                    try:
                        self.admit(scope, request)
                    except AccessError as refused:
                        raise ApiError(refused.status, refused.code, str(refused), headers=refused.headers) from None
                response = await handler(request)
            except ApiError as error:
                response = json_response(error.body, error.status, error.headers)
            latency.observe(time.perf_counter() - started)
            status = response.status_code
            counter = by_status.get(status)
            if counter is None:
                counter = by_status[status] = responses.labels(route, str(status))
            counter.inc()
            return response

        return endpoint


def create_app(settings: config.Settings, *, store: Store | None = None) -> Starlette:
    gateway = Gateway(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    middleware = []
    if settings.cors_origins:
        # Browsers on the listed origins may call the API. Event batches are sent as text/plain,
        # a "simple" request, so a page can send them without a preflight.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["content-type", "x-request-id", "x-tailor-key"],
                expose_headers=["x-request-id", "retry-after"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=gateway.routes(),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
    )
    app.state.gateway = gateway
    return app


def _prepared(snap: Snapshot) -> Snapshot:
    """`snap` ready to serve: item fragments encoded, the kernels compiled for its arrays."""
    kernels.warm_up(snap.item_vectors, snap.gram_inverse, snap.neighbour_rows)
    return wire.prepare(snap)
