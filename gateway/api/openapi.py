"""The OpenAPI 3.1 document and the human-readable API page, both generated from `gateway.api.wire`,
with the rules across fields that the types' modules state in JSON Schema (gateway.crossfield).

Query parameters come from the query Structs' own JSON Schema, so a field added to a Struct shows
up here without another edit.
"""

from __future__ import annotations

import functools
import html
from typing import Any

import msgspec

from gateway import __version__
from gateway.api import http, wire
from gateway.api.routes import ENDPOINTS, JSON, Endpoint
from gateway.experiments import plan
from gateway.rules import document as rule_document
from gateway.rules import triggers
from gateway.settings import Settings

REF = "#/components/schemas/{name}"


Bounds = tuple[tuple[str, Any], ...]  # (setting, value) for every setting the schemas name


@functools.cache
def _schemas() -> tuple[dict[type[msgspec.Struct], dict[str, Any]], dict[str, Any]]:
    types: list[Any] = [wire.ErrorBody]
    for op in ENDPOINTS:
        types.extend(t for t in (op.query, op.body, op.answer) if t is not None)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    for stated in (wire.STATED, rule_document.STATED, triggers.STATED, plan.STATED):
        for struct, rule in stated.items():
            component = components[struct.__name__]
            clash = component.keys() & rule.keys()
            if clash:
                raise ValueError(f"{struct.__name__}: the stated rules would replace its {sorted(clash)}")
            component.update(rule)
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


def _parameters(op: Endpoint, components: dict[str, Any]) -> list[dict[str, Any]]:
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
    for op in ENDPOINTS:
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
            schema = {"type": "array", "items": refs[op.body]} if op.body_array else refs[op.body]
            operation["requestBody"] = {"required": op.body_required, "content": {JSON: {"schema": schema}}}
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tailor gateway",
            "version": __version__,  # the gateway's release; the API's own version is in its paths (/v1)
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
