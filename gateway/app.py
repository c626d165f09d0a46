"""The ASGI application: the gateway's state (gateway.runtime), one object per API resource, the
socket hub, and the Starlette routes made from the route table (gateway.api.routes), with a lifespan
that starts and stops them in order."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from gateway import settings as config
from gateway.api import encoding, stream
from gateway.api.callers import observed
from gateway.api.events import EventsApi
from gateway.api.experiments import ExperimentsApi
from gateway.api.http import by_method, http_error, unexpected_error
from gateway.api.items import ItemsApi
from gateway.api.ops import OpsApi
from gateway.api.pages import PagesApi
from gateway.api.push import Hub
from gateway.api.recommend import RecommendApi
from gateway.api.routes import ENDPOINTS
from gateway.api.rules import RulesApi
from gateway.api.visitors import VisitorsApi
from gateway.runtime import Gateway
from gateway.store import Store

Handler = Callable[[Request], Awaitable[Response]]


def make_hub(gateway: Gateway) -> Hub:
    settings, metrics = gateway.settings, gateway.metrics
    return Hub(
        functools.partial(stream.live_answer, gateway),
        debounce_s=settings.push_debounce_ms / 1000,
        queue_size=settings.stream_queue,
        heartbeat_s=settings.heartbeat_s,
        max_streams=settings.max_streams,
        on_push=lambda cause: metrics.pushes.labels(cause).inc(),
        on_drop=lambda reason: metrics.stream_drops.labels(reason).inc(),
        on_count=metrics.streams.set,
    )


def routes(gateway: Gateway, hub: Hub) -> list[BaseRoute]:
    """The Starlette routes of ENDPOINTS, in its order, each served by its resource's method."""
    resources: dict[str, Any] = {
        "ops": OpsApi(gateway),
        "recommend": RecommendApi(gateway),
        "events": EventsApi(gateway),
        "items": ItemsApi(gateway),
        "stream": stream.StreamApi(gateway, hub),
        "visitors": VisitorsApi(gateway, hub),
        "rules": RulesApi(gateway, gateway.rules),
        "experiments": ExperimentsApi(gateway, gateway.experiments),
        "pages": PagesApi(gateway),
    }
    # One Route per path (a 405's Allow header then lists every method of the path); sockets last.
    by_path: dict[str, dict[str, Handler]] = {}
    sockets: list[BaseRoute] = []
    for endpoint in ENDPOINTS:
        resource, _, method = endpoint.handler.partition(".")
        handler = getattr(resources[resource], method)
        if endpoint.websocket:
            sockets.append(WebSocketRoute(endpoint.path, handler))
        else:
            wrapped = observed(gateway, endpoint.name, handler, endpoint.scope)
            by_path.setdefault(endpoint.path, {})[endpoint.method.upper()] = wrapped
    plain: list[BaseRoute] = [
        Route(path, by_method(handlers), methods=list(handlers)) for path, handlers in by_path.items()
    ]
    return plain + sockets


def create_app(settings: config.Settings, *, store: Store | None = None) -> Starlette:
    gateway = Gateway(settings, store, prepare=encoding.prepare)
    hub = make_hub(gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway.store.subscribe(hub.changed)  # events taken here or by another process on the same store
        gateway.store.subscribe_messages(hub.deliver)  # triggers fired here or by another process
        gateway.store.subscribe_erasures(hub.disconnect)  # erasures taken here or by another process
        gateway.on_swap(hub.snapshot_swapped)
        gateway.on_catalog(hub.withdrawn)
        await gateway.start()
        try:
            yield
        finally:
            await hub.close()
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
        routes=routes(gateway, hub),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
    )
    app.state.gateway = gateway
    return app
