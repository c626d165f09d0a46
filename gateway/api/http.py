"""The HTTP edge: errors with a machine-readable body, JSON answers, bodies read with a limit, and
query strings parsed into declared types (gateway.api.wire)."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from gateway.api import wire

S = TypeVar("S", bound=msgspec.Struct)
JSON = "application/json"
LIST_PARAMETERS = frozenset({"category", "exclude"})
# Read by the access check (gateway.privacy.access), not by the routes.
IGNORED_PARAMETERS = frozenset({"key"})
# The body limit of the routes that take a small document (a consent change, a token request).
SMALL_BODY_BYTES = 16 * 1024
# Arrays and objects in a body may nest this deep. msgspec decodes nested values by recursion, so an
# unbounded depth ends in RecursionError (a 500); no document the API takes needs more than a few
# dozen levels (a rule's conditions nest two JSON levels per `all`/`any`/`not`).
MAX_JSON_DEPTH = 64

_encoder = msgspec.json.Encoder()
log = logging.getLogger("tailor.gateway")


class ApiError(Exception):
    """An answer other than 2xx, with a machine-readable body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        problems: list[str] | None = None,
        headers: dict[str, str] | None = None,
        rule: str | None = None,
        experiment: str | None = None,
        stored: list[int] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = wire.ErrorBody(wire.ErrorDetail(code, message, field, problems, rule, experiment, stored))
        self.headers = headers


def json_response(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(value), status, headers, JSON)


class JSONBytes(Response):
    """An already encoded JSON answer; sets its three headers directly rather than through
    Response.init_headers (a few µs on a path that costs a few hundred)."""

    def __init__(self, body: bytes, *, request_id: str, status_code: int = 200) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            (b"x-request-id", request_id.encode()),
        ]


async def read_body(request: Request, limit: int) -> bytes:
    """The (JSON) body, refused with 413 as soon as it passes `limit` bytes (never read whole into
    memory), and with 400 `invalid-body` when it nests deeper than MAX_JSON_DEPTH."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body-too-large", f"at most {limit} bytes per request")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body-too-large", f"at most {limit} bytes per request")
        chunks.append(chunk)
    body = b"".join(chunks)
    if nesting_exceeds(body, MAX_JSON_DEPTH):
        raise ApiError(400, "invalid-body", f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def decoded_json(body: bytes) -> Any:
    """`body` as JSON, or 400 `invalid-body` saying why it is not JSON."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid-body", f"not JSON: {exc}") from None


_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(set(range(256)) - set(b'"[]{}'))


def nesting_exceeds(body: bytes, limit: int) -> bool:
    """Whether the JSON in `body` nests arrays and objects more than `limit` levels deep (for
    malformed JSON, which the decoder reports, any answer will do). Byte operations done in C, about
    as fast as decoding the body; bodies with few brackets are not even scanned."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Outside strings valid JSON has no backslash, so escapes pair up left to right: drop `\\`
    # first, then `\"`; every quote left opens or closes a string.
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _NOT_BRACKETS)
    # Two adjacent quotes are an empty string or the end and start of two strings: dropping them
    # leaves every string's brackets inside a string still (and most strings hold none).
    skeleton = skeleton.replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = _STRING.sub(b"", skeleton)
    # `[` and `{` have bit 1 set, `]` and `}` clear: +1 and -1 steps, the depth their running sum.
    steps = (np.frombuffer(skeleton, np.uint8) & 2).astype(np.int32) - 1
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def field_of(message: str) -> str | None:
    # msgspec ends validation messages with "- at `$.events[3].item`".
    _, sep, path = message.rpartition(" - at `$.")
    return path.rstrip("`") if sep else None


def parse_query(request: Request | WebSocket, kind: type[S]) -> S:
    data: dict[str, Any] = {}
    # What Starlette's request.query_params does, without building its multi-dict.
    for name, value in parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True):
        if name in IGNORED_PARAMETERS:
            continue
        if name in LIST_PARAMETERS:
            parts = value.split(",")
            if "" in parts:
                raise ApiError(400, "invalid-parameter", f"`{name}` has an empty value", field=name)
            data.setdefault(name, []).extend(parts)
        elif name in data:
            raise ApiError(400, "invalid-parameter", f"`{name}` may be given once", field=name)
        else:
            data[name] = value
    try:
        parsed = msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.startswith("Object contains unknown field"):
            name = message.split("`")[1]
            allowed = ", ".join(kind.__struct_fields__)
            raise ApiError(
                400, "unknown-parameter", f"unknown parameter `{name}`; allowed: {allowed}", field=name
            ) from None
        raise ApiError(400, "invalid-parameter", message, field=field_of(message)) from None
    for name in data:
        # Lax conversion reads "null" as None for a number; a given parameter must have a value.
        if getattr(parsed, name, None) is None:
            raise ApiError(400, "invalid-parameter", f"`{name}` needs a value", field=name)
    return parsed


def by_method(
    handlers: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    """One endpoint for the methods of one path (HEAD answered as GET)."""
    if len(handlers) == 1:
        return next(iter(handlers.values()))

    async def endpoint(request: Request) -> Response:
        method = request.method
        return await handlers["GET" if method == "HEAD" else method](request)

    return endpoint


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, with the API's error body."""
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    body = wire.ErrorBody(wire.ErrorDetail(code, f"{request.method} {request.url.path}: {exc.detail}"))
    return json_response(body, exc.status_code, dict(exc.headers or {}))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """A bug: logged, and a 500 with the API's error body (no traceback to the caller)."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response(wire.ErrorBody(wire.ErrorDetail("internal", "internal error; see the gateway log")), 500)


def country_of(request: Request) -> str | None:
    """The visitor's country as a CDN in front of the gateway tells it (Cloudflare's header)."""
    for name, value in request.scope["headers"]:
        if name == b"cf-ipcountry":
            code = value.decode("latin-1")
            return code if len(code) == 2 and code.isalpha() else None
    return None
