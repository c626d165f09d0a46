"""The OpenAPI 3.1 document and the human-readable API page, both generated from `gateway.api.wire`.

Query parameters come from the query Structs' own JSON Schema, so a field added to a Struct shows
up here without another edit.
"""

from __future__ import annotations

import functools
import html
from typing import Any

import msgspec

from gateway.api import demo, http, wire
from gateway.api import events as events_api
from gateway.api import experiments as xapi
from gateway.api import rules as rules_api
from gateway.experiments.plan import ExperimentPlan
from gateway.rules.document import RuleSet
from gateway.settings import Settings

REF = "#/components/schemas/{name}"
JSON = "application/json"


class Operation(msgspec.Struct, frozen=True):
    method: str
    path: str
    summary: str
    query: type[msgspec.Struct] | None = None
    body: type[msgspec.Struct] | None = None
    body_required: bool = True
    answer: type[msgspec.Struct] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    path_parameters: tuple[str, ...] = ()
    media_type: str = JSON
    scope: str = "open"  # gateway.privacy.access: "public" and "admin" routes need a key once keys are configured
    body_limit: int = 0  # bytes; a larger body is a 413


OPERATIONS = (
    Operation(
        "get",
        "/v1/recommend",
        "Recommendations for a known user (`user`) or an anonymous visitor (`visitor`), or the visitor a "
        "`token` names (with API keys configured a public key must use the token). Items the visitor has seen "
        "are left out; a visitor without history gets popular items with `fallback: cold-start`, one who has not "
        "allowed personalization (consent_mode) popular items with `fallback: no-consent`.",
        query=wire.RecommendQuery,
        answer=wire.Recommendations,
        errors=(400, 403, 503),
        scope="public",
    ),
    Operation(
        "get",
        "/v1/items/{item_id}/similar",
        "Items most similar to one item (cosine of item vectors).",
        query=wire.SimilarQuery,
        answer=wire.Recommendations,
        errors=(400, 404, 503),
        path_parameters=("item_id",),
        scope="public",
    ),
    Operation(
        "get",
        "/v1/popular",
        "The most popular items, overall or in categories (recency-weighted).",
        query=wire.PopularQuery,
        answer=wire.Recommendations,
        errors=(400, 503),
        scope="public",
    ),
    Operation(
        "post",
        "/v1/events",
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
    Operation(
        "post",
        "/v1/token",
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
    Operation(
        "get",
        "/v1/consent",
        "A visitor's consent per purpose (analytics, personalization, marketing) and whether each is allowed "
        "now, for the visitor of `token`, or (admin key) of `visitor`.",
        query=wire.ConsentQuery,
        answer=wire.ConsentView,
        errors=(400, 403, 503),
        scope="public",
    ),
    Operation(
        "put",
        "/v1/consent",
        "Record a visitor's choices (granted, denied, revoked; optional expiry): the visitor, authenticated by "
        "their `token` (source `visitor`), or the site's backend with an admin key naming `visitor`. Every change "
        "is appended to the consent audit log. Answers the consent as now applied.",
        body=wire.ConsentUpdate,
        answer=wire.ConsentView,
        errors=(400, 403, 413, 503),
        scope="public",
        body_limit=http.SMALL_BODY_BYTES,
    ),
    Operation(
        "get",
        "/v1/stream",
        "WebSocket (upgrade with `GET`): live recommendations for the token's visitor. The server sends JSON "
        'text frames: `{"type": "recommendations", "cause": "connect"|"events"|"snapshot", "seq": N, '
        '"recommendations": <the body of GET /v1/recommend>}` on connect, after the visitor\'s events when the '
        'list changed (debounced), and after a snapshot swap; `{"type": "message", "trigger", "version", '
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
    Operation("get", "/healthz", "Liveness: the process answers.", answer=wire.Health),
    Operation(
        "get",
        "/readyz",
        "Readiness: a snapshot is loaded and the store answers (503 otherwise, with the problems).",
        answer=wire.Readiness,
        errors=(503,),
    ),
    Operation("get", "/metrics", "Prometheus metrics.", media_type="text/plain", scope="admin"),
    Operation(
        "delete",
        "/v1/visitors/{visitor_id}",
        "Erase everything stored about a visitor: profile, counters, consent, event ids, trigger timers, fired "
        "marks and messages, their events in the event log; their open WebSockets are closed (4410). Answers a "
        "receipt. (The consent audit log keeps its lines, under the pseudonym, as the record of what was "
        "consented to.)",
        answer=wire.ErasureReceipt,
        errors=(503,),
        path_parameters=("visitor_id",),
        scope="admin",
    ),
    Operation(
        "get",
        "/v1/visitors/{visitor_id}/export",
        "Everything stored about a visitor, as JSON: recent interactions, counters, last-seen time, consent, "
        "logged events, and the pseudonym they are stored under.",
        answer=wire.VisitorExport,
        errors=(503,),
        path_parameters=("visitor_id",),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/reload",
        "Load the snapshot CURRENT names and swap it in; 409 if it fails verification (the old one keeps serving).",
        answer=wire.ReloadResult,
        errors=(409,),
        scope="admin",
    ),
    Operation(
        "put",
        "/admin/rules",
        "Store a rule set (rules, segments; see the README's Rules section) as a new version, after checking it "
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
    Operation(
        "get",
        "/admin/rules",
        "The active rule-set version, the one this node serves, runtime flags, every stored version and every "
        "activation (newest last).",
        answer=wire.RulesOverview,
        errors=(503,),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/rules/rollback",
        "Serve again the version that was active before the current one, on every node.",
        answer=wire.RulesOverview,
        errors=(409, 422, 503),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/rules/deactivate",
        "Serve no rules (stored versions stay).",
        answer=wire.RulesOverview,
        errors=(503,),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/rules/preview",
        "Dry run: for each visitor, the list as served now and with the candidate rule set instead, with the "
        "rules that fired and changed it, segments and attached content. Nothing is stored.",
        body=wire.PreviewRequest,
        answer=wire.Preview,
        errors=(400, 413, 422, 503),
        scope="admin",
        body_limit=rules_api.MAX_RULES_BODY,
    ),
    Operation(
        "put",
        "/admin/rules/flags/{rule_id}",
        "Switch a rule on or off on every node at runtime (`null`: back to the rule's own `enabled`).",
        body=wire.FlagUpdate,
        answer=wire.RulesOverview,
        errors=(400, 413, 503),
        path_parameters=("rule_id",),
        scope="admin",
        body_limit=rules_api.MAX_FLAG_BODY,
    ),
    Operation(
        "get",
        "/admin/rules/{version}",
        "One stored rule-set version, byte for byte as it was stored.",
        answer=RuleSet,
        errors=(404, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/rules/{version}/activate",
        "Serve this version on every node (checked against the served snapshot first: 422 if it no longer fits).",
        answer=wire.RulesOverview,
        errors=(404, 422, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Operation(
        "put",
        "/admin/experiments",
        "Store an experiment plan (experiments with variants or factors, layers, coverage, status; see the "
        "README's Experiments section) as a new version. An experiment whose design (weights, arms, overrides) "
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
    Operation(
        "get",
        "/admin/experiments",
        "The active plan's experiments (phase, slice of the layer, arms and shares), every stored version and "
        "every activation.",
        answer=xapi.ExperimentsOverview,
        errors=(503,),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/experiments/rollback",
        "Run again the plan version that was active before the current one, on every node.",
        answer=xapi.ExperimentsOverview,
        errors=(409, 422, 503),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/experiments/deactivate",
        "Run no experiments (stored versions and their data stay).",
        answer=xapi.ExperimentsOverview,
        errors=(503,),
        scope="admin",
    ),
    Operation(
        "get",
        "/admin/experiments/versions/{version}",
        "One stored plan version, with the phases it was stored with.",
        answer=ExperimentPlan,
        errors=(404, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/experiments/versions/{version}/activate",
        "Run this plan version on every node.",
        answer=xapi.ExperimentsOverview,
        errors=(404, 422, 503),
        path_parameters=("version",),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/experiments/{experiment_id}/start",
        "Store and activate a new plan version with this experiment running.",
        answer=xapi.ExperimentsOverview,
        errors=(404, 422, 503),
        path_parameters=("experiment_id",),
        scope="admin",
    ),
    Operation(
        "post",
        "/admin/experiments/{experiment_id}/stop",
        "Store and activate a new plan version with this experiment stopped (its visitors get the default).",
        answer=xapi.ExperimentsOverview,
        errors=(404, 422, 503),
        path_parameters=("experiment_id",),
        scope="admin",
    ),
    Operation(
        "get",
        "/admin/experiments/{experiment_id}/report",
        "Per arm exposures, conversion rates and revenue per visitor with confidence intervals; chi-square tests "
        "for rates and Welch's t-test for revenue against the control, Holm-adjusted; the sample-ratio-mismatch "
        "check (flagged below p = 0.001); notes (minimum sample not reached, ...).",
        query=xapi.ReportQuery,
        answer=xapi.ExperimentReport,
        errors=(400, 404, 503),
        path_parameters=("experiment_id",),
        scope="admin",
    ),
    Operation("get", "/openapi.json", "This document.", media_type=JSON),
    Operation(
        "get",
        "/demo",
        "The demo shop page (setting `demo`): client_js over this snapshot's catalog.",
        media_type="text/html",
        errors=(404,),
    ),
    Operation(
        "get",
        "/demo/catalog.json",
        "The demo page's catalog: top-level categories and their most popular items.",
        answer=demo.DemoCatalog,
        errors=(404, 503),
    ),
    Operation(
        "get",
        "/client/{name}",
        "The browser snippet: `tailor.min.js` (classic script) or `tailor.esm.min.js` (ES module).",
        media_type="text/javascript",
        errors=(404,),
        path_parameters=("name",),
    ),
    Operation("get", "/docs", "The API as a web page.", media_type="text/html"),
)


Bounds = tuple[tuple[str, Any], ...]  # (setting, value) for every setting the schemas name


@functools.cache
def _schemas() -> tuple[dict[type[msgspec.Struct], dict[str, Any]], dict[str, Any]]:
    types: list[Any] = [wire.ErrorBody]
    for op in OPERATIONS:
        types.extend(t for t in (op.query, op.body, op.answer) if t is not None)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    return dict(zip(types, refs, strict=True)), components


def _named_settings(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = set(node.get(wire.BOUND, {}).values())
        return found.union(*(_named_settings(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_named_settings(value) for value in node))
    return set()


def _bounds(settings: Settings | None) -> Bounds:
    chosen = Settings() if settings is None else settings
    return tuple((name, getattr(chosen, name)) for name in sorted(_named_settings(_schemas()[1])))


def _resolved(node: Any, bounds: dict[str, Any]) -> Any:
    """`node` with each wire.bounded_by placeholder replaced by the setting's value."""
    if isinstance(node, dict):
        out = {key: _resolved(value, bounds) for key, value in node.items() if key != wire.BOUND}
        out.update((keyword, bounds[setting]) for keyword, setting in node.get(wire.BOUND, {}).items())
        return out
    if isinstance(node, list):
        return [_resolved(value, bounds) for value in node]
    return node


def _parameters(op: Operation, components: dict[str, Any]) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in op.path_parameters
    ]
    if op.query is None:
        return parameters
    schema = components[op.query.__name__]
    required = set(schema.get("required", []))
    for name, declared in schema["properties"].items():
        prop = _not_null(declared)
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            parameter["description"] = prop["description"]
        if prop.get("type") == "array":
            parameter["style"], parameter["explode"] = "form", True
        parameters.append(parameter)
    return parameters


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a value, never JSON null: drop the null branch of `X | None`."""
    variants = [v for v in schema.get("anyOf", []) if v != {"type": "null"}]
    if len(variants) != 1:
        return schema
    return {**variants[0], **{k: v for k, v in schema.items() if k not in ("anyOf", "default")}}


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The document of a gateway with `settings` (default: the defaults), stating the limits it
    enforces."""
    return _document(_bounds(settings))


@functools.cache
def _document(bounds: Bounds) -> dict[str, Any]:
    refs, raw = _schemas()
    components = _resolved(raw, dict(bounds))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        content: dict[str, Any] = {op.media_type: {"schema": refs[op.answer]} if op.answer else {}}
        responses: dict[str, Any] = {str(op.status): {"description": "OK", "content": content}}
        refused = {"public": (401, 429), "admin": (401, 403, 429)}.get(op.scope, ())
        for status in (*op.errors, *refused):
            responses[str(status)] = {"description": "Error", "content": {JSON: {"schema": refs[wire.ErrorBody]}}}
        description = op.summary
        if op.body_limit:
            description += (
                f" The body is JSON of at most {op.body_limit:,} bytes (413 `body-too-large` beyond), nested at "
                f"most {http.MAX_JSON_DEPTH} levels deep (400 `invalid-body` beyond)."
            )
        operation: dict[str, Any] = {
            "summary": op.summary.split(". ")[0].rstrip("."),
            "description": description,
            "parameters": _parameters(op, components),
            "responses": responses,
        }
        if op.scope != "open":
            # Required once the gateway has keys (public_keys, admin_keys); without any, routes are open.
            operation["security"] = [{"apiKey": []}, {"bearer": []}, {}]
        if op.body is not None:
            operation["requestBody"] = {"required": op.body_required, "content": {JSON: {"schema": refs[op.body]}}}
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tailor gateway",
            "version": "1",
            "description": "Personalised recommendations in milliseconds from your own data. A request line "
            "(path and query) over 64 KB is refused by the HTTP server itself (400, plain text).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Tailor-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def document_bytes(settings: Settings | None = None) -> bytes:
    return _document_bytes(_bounds(settings))


@functools.cache
def _document_bytes(bounds: Bounds) -> bytes:
    return msgspec.json.encode(_document(bounds))


def _type_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type_text(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {_type_text(schema.get('items', {}))}"
    limits = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "minLength", "maxLength") if k in schema]
    return str(schema.get("type", "any")) + (f" ({', '.join(limits)})" if limits else "")


def html_page(settings: Settings | None = None) -> str:
    return _html_page(_bounds(settings))


@functools.cache
def _html_page(bounds: Bounds) -> str:
    doc = _document(bounds)
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Tailor gateway API</title>",
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "code{background:#f3f3f3;padding:0 .2em}table{border-collapse:collapse}td,th{border:1px solid #ddd;"
        "padding:.2em .5em;text-align:left;vertical-align:top}h2{margin-top:2em}</style></head><body>",
        "<h1>Tailor gateway API</h1><p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Errors are "
        '<code>{"error": {"code", "message", "field"}}</code> with a 4xx status.</p>',
    ]
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            out.append(
                f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(op['description'])}</p>"
            )
            if op["parameters"]:
                out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>about</th></tr>")
                for p in op["parameters"]:
                    out.append(
                        f"<tr><td><code>{p['name']}</code></td><td>{p['in']}</td>"
                        f"<td>{html.escape(_type_text(p['schema']))}</td>"
                        f"<td>{html.escape(p.get('description', ''))}</td></tr>"
                    )
                out.append("</table>")
            if "requestBody" in op:
                body = op["requestBody"]["content"][JSON]["schema"]
                out.append(f"<p>Body: <code>{html.escape(_type_text(body))}</code></p>")
            answers = ", ".join(
                f"{status}: {html.escape(_type_text(r['content'][next(iter(r['content']))].get('schema', {})))}"
                for status, r in op["responses"].items()
            )
            out.append(f"<p>Responses: {answers}</p>")
    out.append("<h2>Types</h2>")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f"<h3 id='{name}'>{name}</h3>")
        if schema.get("description"):
            out.append(f"<p>{html.escape(schema['description'])}</p>")
        out.append("<table><tr><th>field</th><th>type</th><th>about</th></tr>")
        for field, prop in schema.get("properties", {}).items():
            out.append(
                f"<tr><td><code>{field}</code></td><td>{html.escape(_type_text(prop))}</td>"
                f"<td>{html.escape(prop.get('description', ''))}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
