"""The route table: every route of the gateway, once. The app makes its Starlette routes from it
(gateway.app) and the OpenAPI document is generated from it (gateway.api.openapi), so the two cannot
disagree.

Routes are matched in this order: the probes first (orchestrators call them all the time, and the
benchmarks' ceiling is /healthz: it must not pay for matching the API's paths), and a fixed path
before a templated one beside it (`/admin/rules/rollback` before `/admin/rules/{version}`).
"""

from __future__ import annotations

import msgspec

from gateway.api import demo, http, wire
from gateway.api import events as events_api
from gateway.api import experiments as xapi
from gateway.api import items as items_api
from gateway.api import rules as rules_api
from gateway.catalog.records import ItemFields
from gateway.experiments.plan import ExperimentPlan
from gateway.privacy.access import Scope
from gateway.rules.document import RuleSet

JSON = "application/json"


class Endpoint(msgspec.Struct, frozen=True):
    """One route: what serves it (`handler`, "resource.method": the resource object the app makes and
    its method), the label its metrics carry (`name`), and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: str
    name: str
    summary: str
    query: type[msgspec.Struct] | None = None
    body: type[msgspec.Struct] | None = None
    body_required: bool = True
    answer: type[msgspec.Struct] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    path_parameters: tuple[str, ...] = ()
    media_type: str = JSON
    scope: Scope = "open"  # "public" and "admin" routes need a key once keys are configured
    body_limit: int = 0  # bytes; a larger body is a 413
    body_array: bool = False  # the body is a JSON array of `body`

    @property
    def websocket(self) -> bool:
        return self.status == 101


ENDPOINTS = (
    Endpoint("get", "/healthz", "ops.healthz", "healthz", "Liveness: the process answers.", answer=wire.Health),
    Endpoint(
        "get",
        "/readyz",
        "ops.readyz",
        "readyz",
        "Readiness: a snapshot is loaded and the store answers (503 otherwise, with the problems).",
        answer=wire.Readiness,
        errors=(503,),
    ),
    Endpoint(
        "get",
        "/v1/recommend",
        "recommend.recommend",
        "recommend",
        "Recommendations for a known user (`user`) or an anonymous visitor (`visitor`), or the visitor a "
        "`token` names (with API keys configured a public key must use the token). Items the visitor has seen "
        "are left out; a visitor without history gets popular items with `fallback: cold-start`, one who has not "
        "allowed personalization (consent_mode) popular items with `fallback: no-consent`.",
        query=wire.RecommendQuery,
        answer=wire.Recommendations,
        errors=(400, 403, 503),
        scope="public",
    ),
    Endpoint(
        "get",
        "/v1/items/{item_id}/similar",
        "recommend.similar",
        "similar",
        "Items most similar to one item (cosine of item vectors).",
        query=wire.SimilarQuery,
        answer=wire.Recommendations,
        errors=(400, 404, 503),
        path_parameters=("item_id",),
        scope="public",
    ),
    Endpoint(
        "post",
        "/v1/items",
        "items.bulk",
        "items",
        "Create or replace many items (at most max_items_per_call): a JSON array of items, or JSON lines (one "
        "item per line), each with its `item_id` and the fields of `PUT /v1/items/{item_id}`. Each row is checked "
        "on its own: the valid ones are stored, in one change, and the others listed in `rejected` (with the "
        "field); 422 `invalid-items` when no row is valid. Every node serves the change within about a second.",
        body=items_api.BulkItem,
        body_array=True,
        answer=items_api.ItemsStored,
        errors=(400, 413, 422, 503),
        scope="admin",
        body_limit=items_api.MAX_BULK_BODY,
    ),
    Endpoint(
        "get",
        "/v1/items/{item_id}",
        "items.get",
        "items",
        "One item as this node knows it: its last live change (source `live`, changed through this API after the "
        "snapshot was built) or the snapshot's, and whether it is served now.",
        answer=items_api.ItemView,
        errors=(400, 404),
        path_parameters=("item_id",),
        scope="admin",
    ),
    Endpoint(
        "put",
        "/v1/items/{item_id}",
        "items.put",
        "items",
        "Create or replace an item: `title`, `categories`, `tags`, `price`, `stock`, `available` "
        "(false: never served) and any other field, kept in `attributes`. Every node serves it within about a "
        "second: a new item gets a vector from the snapshot's content model (its categories and tags), so it "
        "is among similar items and category lists at once. 422 `invalid-item` names a field of the wrong type; "
        "400 for an id over 256 characters.",
        body=ItemFields,
        answer=items_api.ItemStored,
        errors=(400, 413, 422, 503),
        path_parameters=("item_id",),
        scope="admin",
        body_limit=items_api.MAX_ITEM_BODY,
    ),
    Endpoint(
        "patch",
        "/v1/items/{item_id}",
        "items.patch",
        "items",
        'Change some fields of an item (`{"stock": 0}`; null clears price or stock; attributes are merged). '
        "404 for an item that does not exist or is retired.",
        body=ItemFields,
        answer=items_api.ItemStored,
        errors=(400, 404, 413, 422, 503),
        path_parameters=("item_id",),
        scope="admin",
        body_limit=items_api.MAX_ITEM_BODY,
    ),
    Endpoint(
        "delete",
        "/v1/items/{item_id}",
        "items.delete",
        "items",
        "Retire an item: no route serves it again (answers cached before included), and the next build leaves "
        "it out when it reads the live catalog. Pushes go to visitors whose list held it.",
        answer=items_api.ItemStored,
        errors=(400, 404, 503),
        path_parameters=("item_id",),
        scope="admin",
    ),
    Endpoint(
        "get",
        "/v1/popular",
        "recommend.popular",
        "popular",
        "The most popular items, overall or in categories (recency-weighted).",
        query=wire.PopularQuery,
        answer=wire.Recommendations,
        errors=(400, 503),
        scope="public",
    ),
    Endpoint(
        "post",
        "/v1/events",
        "events.events",
        "events",
        "Record behaviour events (a batch); the visitor's next recommendation uses them. Valid events are kept "
        "and invalid ones listed in `rejected`. With a `token` every event is that visitor's (with API keys "
        "configured a public key must send one). Events of a visitor who has not allowed analytics "
        "(consent_mode) are not stored, only counted (`unconsented`).",
        body=wire.EventBatch,
        answer=wire.EventsAccepted,
        status=202,
        errors=(400, 413, 415, 422, 503),
        scope="public",
        body_limit=events_api.MAX_BODY_BYTES,
    ),
    Endpoint(
        "post",
        "/v1/token",
        "stream.token",
        "token",
        "A new anonymous visitor id and a signed, expiring token to open WS /v1/stream as that visitor. "
        'With a body `{"token": ...}` it renews that token for the same visitor instead (also one expired '
        "less than token_renew_s ago; 401 for a bad one). Your backend mints tokens for signed-in users with an "
        'admin key (`{"visitor": "user-42"}`) or the shared secret (`tailor token`).',
        body=wire.TokenRequest,
        body_required=False,
        answer=wire.StreamToken,
        errors=(400, 401, 403, 413),
        scope="public",
        body_limit=http.SMALL_BODY_BYTES,
    ),
    Endpoint(
        "get",
        "/v1/consent",
        "visitors.get_consent",
        "consent",
        "A visitor's consent per purpose (analytics, personalization, marketing) and whether each is allowed "
        "now, for the visitor of `token`, or (admin key) of `visitor`.",
        query=wire.ConsentQuery,
        answer=wire.ConsentView,
        errors=(400, 403, 503),
        scope="public",
    ),
    Endpoint(
        "put",
        "/v1/consent",
        "visitors.put_consent",
        "consent",
        "Record a visitor's choices (granted, denied, revoked; optional expiry): the visitor, authenticated by "
        "their `token` (source `visitor`), or the site's backend with an admin key naming `visitor`. Every change "
        "is appended to the consent audit log. Answers the consent as now applied.",
        body=wire.ConsentUpdate,
        answer=wire.ConsentView,
        errors=(400, 403, 413, 503),
        scope="public",
        body_limit=http.SMALL_BODY_BYTES,
    ),
    Endpoint(
        "get",
        "/v1/stream",
        "stream.stream",
        "stream",
        "WebSocket (upgrade with `GET`): live recommendations for the token's visitor. The server sends JSON "
        'text frames: `{"type": "recommendations", "cause": "connect"|"events"|"snapshot"|"catalog", "seq": N, '
        '"recommendations": <the body of GET /v1/recommend>}` on connect, after the visitor\'s events when the '
        "list changed (debounced), after a snapshot swap, and when a catalog change stops serving an item of "
        'the list; `{"type": "message", "trigger", "version", '
        '"message", "id", "at"}` when one of the visitor\'s triggers fires (the same object as in the next '
        'recommendation\'s `messages`); `{"type": "ping", "ts": <unix seconds>}` when '
        "quiet for heartbeat_s. Refusals close the socket after the handshake: 4401 (reason `bad-token` or "
        "`expired-token`), 4400 (invalid parameter), 1013 (no snapshot yet or too many sockets); a client too "
        "slow to take its messages is closed with 4429 `too-slow`. Reconnect with backoff; the first message "
        "after a reconnect is the current list.",
        query=wire.StreamQuery,
        status=101,
        scope="public",
    ),
    Endpoint(
        "get", "/metrics", "ops.metrics_page", "metrics", "Prometheus metrics.", media_type="text/plain", scope="admin"
    ),
    Endpoint(
        "delete",
        "/v1/visitors/{visitor_id}",
        "visitors.erase_visitor",
        "erase",
        "Erase everything stored about a visitor: profile, counters, consent, event ids, trigger timers, fired "
        "marks and messages, their events in the event log; their open WebSockets are closed (4410). Answers a "
        "receipt. (The consent audit log keeps its lines, under the pseudonym, as the record of what was "
        "consented to.)",
        answer=wire.ErasureReceipt,
        errors=(503,),
        path_parameters=("visitor_id",),
        scope="admin",
    ),
    Endpoint(
        "get",
        "/v1/visitors/{visitor_id}/export",
        "visitors.export_visitor",
        "export",
        "Everything stored about a visitor, as JSON: recent interactions, counters, last-seen time, consent, "
        "logged events, and the pseudonym they are stored under.",
        answer=wire.VisitorExport,
        errors=(503,),
        path_parameters=("visitor_id",),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/reload",
        "ops.admin_reload",
        "reload",
        "Load the snapshot CURRENT names and swap it in; 409 if it fails verification (the old one keeps serving).",
        answer=wire.ReloadResult,
        errors=(409,),
        scope="admin",
    ),
    Endpoint(
        "put",
        "/admin/rules",
        "rules.put",
        "rules",
        "Store a rule set (rules, segments; see docs/rules.md) as a new version, after checking it "
        "against the served snapshot: 422 `invalid-rules` names the rule (`rule`) and the field (`field`). "
        "`?activate=true` serves it at once on every node.",
        query=wire.RulesQuery,
        body=RuleSet,
        answer=wire.RulesStored,
        status=201,
        errors=(400, 413, 422, 503),
        scope="admin",
        body_limit=rules_api.MAX_RULES_BODY,
    ),
    Endpoint(
        "get",
        "/admin/rules",
        "rules.overview",
        "rules",
        "The active rule-set version, the one this node serves, runtime flags, every stored version and every "
        "activation (newest last).",
        answer=wire.RulesOverview,
        errors=(503,),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/rules/rollback",
        "rules.rollback",
        "rules",
        "Serve again the version that was active before the current one, on every node.",
        answer=wire.RulesOverview,
        errors=(409, 422, 503),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/rules/deactivate",
        "rules.deactivate",
        "rules",
        "Serve no rules (stored versions stay).",
        answer=wire.RulesOverview,
        errors=(503,),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/rules/preview",
        "rules.preview",
        "rules-preview",
        "Dry run: for each visitor, the list as served now and with the candidate rule set instead, with the "
        "rules that fired and changed it, segments and attached content. Nothing is stored.",
        body=wire.PreviewRequest,
        answer=wire.Preview,
        errors=(400, 413, 422, 503),
        scope="admin",
        body_limit=rules_api.MAX_RULES_BODY,
    ),
    Endpoint(
        "put",
        "/admin/rules/flags/{rule_id}",
        "rules.flag",
        "rules",
        "Switch a rule on or off on every node at runtime (`null`: back to the rule's own `enabled`).",
        body=wire.FlagUpdate,
        answer=wire.RulesOverview,
        errors=(400, 413, 503),
        path_parameters=("rule_id",),
        scope="admin",
        body_limit=rules_api.MAX_FLAG_BODY,
    ),
    Endpoint(
        "get",
        "/admin/rules/{version}",
        "rules.version",
        "rules",
        "One stored rule-set version, byte for byte as it was stored.",
        answer=RuleSet,
        errors=(404, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/rules/{version}/activate",
        "rules.activate",
        "rules",
        "Serve this version on every node (checked against the served snapshot first: 422 if it no longer fits).",
        answer=wire.RulesOverview,
        errors=(404, 422, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Endpoint(
        "put",
        "/admin/experiments",
        "experiments.put",
        "experiments",
        "Store an experiment plan (experiments with variants or factors, layers, coverage, status; see "
        "docs/experiments.md) as a new version. An experiment whose design (weights, arms, overrides) "
        "differs from its last stored one gets the next phase. 422 `invalid-experiments` names the experiment "
        "(`experiment`) and the field (`field`). `?activate=true` runs it at once on every node.",
        query=xapi.ExperimentsQuery,
        body=ExperimentPlan,
        answer=xapi.ExperimentsStored,
        status=201,
        errors=(400, 413, 422, 503),
        scope="admin",
        body_limit=xapi.MAX_PLAN_BODY,
    ),
    Endpoint(
        "get",
        "/admin/experiments",
        "experiments.overview",
        "experiments",
        "The active plan's experiments (phase, slice of the layer, arms and shares), every stored version and "
        "every activation.",
        answer=xapi.ExperimentsOverview,
        errors=(503,),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/experiments/rollback",
        "experiments.rollback",
        "experiments",
        "Run again the plan version that was active before the current one, on every node.",
        answer=xapi.ExperimentsOverview,
        errors=(409, 422, 503),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/experiments/deactivate",
        "experiments.deactivate",
        "experiments",
        "Run no experiments (stored versions and their data stay).",
        answer=xapi.ExperimentsOverview,
        errors=(503,),
        scope="admin",
    ),
    Endpoint(
        "get",
        "/admin/experiments/versions/{version}",
        "experiments.version",
        "experiments",
        "One stored plan version, with the phases it was stored with.",
        answer=ExperimentPlan,
        errors=(404, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/experiments/versions/{version}/activate",
        "experiments.activate",
        "experiments",
        "Run this plan version on every node.",
        answer=xapi.ExperimentsOverview,
        errors=(404, 422, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/experiments/{experiment_id}/start",
        "experiments.start",
        "experiments",
        "Store and activate a new plan version with this experiment running.",
        answer=xapi.ExperimentsOverview,
        errors=(404, 422, 503),
        path_parameters=("experiment_id",),
        scope="admin",
    ),
    Endpoint(
        "post",
        "/admin/experiments/{experiment_id}/stop",
        "experiments.stop",
        "experiments",
        "Store and activate a new plan version with this experiment stopped (its visitors get the default).",
        answer=xapi.ExperimentsOverview,
        errors=(404, 422, 503),
        path_parameters=("experiment_id",),
        scope="admin",
    ),
    Endpoint(
        "get",
        "/admin/experiments/{experiment_id}/report",
        "experiments.report",
        "experiments-report",
        "Per arm exposures, conversion rates and revenue per visitor with confidence intervals; chi-square tests "
        "for rates and Welch's t-test for revenue against the control, Holm-adjusted; the sample-ratio-mismatch "
        "check (flagged below p = 0.001); notes (minimum sample not reached, ...).",
        query=xapi.ReportQuery,
        answer=xapi.ExperimentReport,
        errors=(400, 404, 503),
        path_parameters=("experiment_id",),
        scope="admin",
    ),
    Endpoint("get", "/openapi.json", "pages.openapi_json", "openapi", "This document.", media_type=JSON),
    Endpoint(
        "get",
        "/demo",
        "pages.demo_page",
        "demo",
        "The demo shop page (setting `demo`): client_js over this snapshot's catalog.",
        media_type="text/html",
        errors=(404,),
    ),
    Endpoint(
        "get",
        "/demo/catalog.json",
        "pages.demo_catalog",
        "demo",
        "The demo page's catalog: top-level categories and their most popular items.",
        answer=demo.DemoCatalog,
        errors=(404, 503),
    ),
    Endpoint(
        "get",
        "/client/{name}",
        "pages.client_script",
        "client",
        "The browser snippet: `tailor.min.js` (classic script) or `tailor.esm.min.js` (ES module).",
        media_type="text/javascript",
        errors=(404,),
        path_parameters=("name",),
    ),
    Endpoint("get", "/docs", "pages.docs", "docs", "The API as a web page.", media_type="text/html"),
)
