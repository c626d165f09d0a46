"""Who a request comes from and whom it acts for: the API key's scope and rate limit (`admit`), the
visitor a token names (`acting_for`), the request id; and `observed`, the wrapper every route runs in
(admission, the answer to an ApiError, latency and status metrics)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from gateway.api.http import ApiError, json_response
from gateway.privacy import tokens
from gateway.privacy.access import AccessError, Scope
from gateway.privacy.access import key_of as access_key
from gateway.runtime import Gateway

Handler = Callable[[Request], Awaitable[Response]]
REQUEST_ID_MAX = 128


def request_id(gateway: Gateway, request: Request) -> str:
    """The caller's X-Request-ID (UTF-8, so that it is echoed in the header byte for byte and in
    the body as the same text), or a new id when it is absent, over 128 characters, not UTF-8
    or not printable."""
    for name, value in request.scope["headers"]:  # ASGI lower-cases header names
        if name == b"x-request-id":
            try:
                given: str = value.decode()
            except UnicodeDecodeError:
                break
            if given and len(given) <= REQUEST_ID_MAX and given.isprintable():
                return given
            break
    return gateway.new_request_id()


def admit(gateway: Gateway, scope: Scope, connection: Request | WebSocket) -> None:
    """Raise AccessError unless the caller's key allows `scope` and its bucket has a request left."""
    access = gateway.access
    key = access_key(connection.scope["headers"], connection.scope.get("query_string", b""))
    access.check(scope, key)
    if scope != "open":
        client = connection.client
        access.take(key or (client.host if client is not None else "?"), time.monotonic())


def binds(gateway: Gateway, connection: Request | WebSocket) -> bool:
    """Whether this caller must prove which visitor it is with a token: with API keys configured,
    every caller but an admin key (the site's backend). A browser holds only a public key, so
    it can read or write a visitor's data only with that visitor's token."""
    access = gateway.access
    if not access.enabled:
        return False
    return not access.is_admin(access_key(connection.scope["headers"], connection.scope.get("query_string", b"")))


def token_of(connection: Request | WebSocket, given: str | None) -> str | None:
    if given is not None:
        return given
    for name, value in connection.scope["headers"]:
        if name == b"x-tailor-token":
            token: str = value.decode("latin-1")
            return token
    return None


def acting_for(
    gateway: Gateway,
    connection: Request | WebSocket,
    claimed: str | None,
    token: str | None,
    *,
    required: bool = False,
) -> str | None:
    """The raw visitor id this request may read or write: its token's (a `claimed` id must then
    be the same), else the id it claims, which only a caller `binds` does not hold may do.
    `required`: a caller `binds` holds must show a token even when it claims no id."""
    token = token_of(connection, token)
    if token is not None:
        try:
            visitor, _ = tokens.verify(gateway.secret, token)
        except tokens.TokenError as refused:
            raise ApiError(401, refused.code, str(refused), field="token") from None
        if claimed is not None and claimed != visitor:
            raise ApiError(403, "not-your-visitor", "the token is for another visitor", field="visitor")
        return visitor
    if (claimed is not None or required) and binds(gateway, connection):
        raise ApiError(
            401,
            "token-required",
            "with a public key, a visitor is named by their token (`token` or X-Tailor-Token), not by id",
            field="token",
        )
    return claimed


def observed(gateway: Gateway, route: str, handler: Handler, scope: Scope) -> Handler:
    """`handler` behind the access check, with an ApiError answered as its JSON body, and its latency
    and status counted under `route`."""
    latency = gateway.metrics.latency.labels(route)
    responses = gateway.metrics.responses
    by_status: dict[int, Any] = {}  # labels() costs more than the increment it selects
    access = gateway.access

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        try:
            if access.active:
                try:
                    admit(gateway, scope, request)
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
