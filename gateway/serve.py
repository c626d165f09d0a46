"""Run the gateway under uvicorn with the fast loop and parser (about 3x the pure-Python default's throughput)."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import uvicorn
from threadpoolctl import threadpool_limits
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import logs, workers
from gateway import settings as config
from gateway.metrics import MULTIPROC_ENV
from gateway.privacy import keys as privacy
from gateway.settings import SETTINGS_ENV, Settings, encode
from gateway.store import open_store

if TYPE_CHECKING:
    from starlette.applications import Starlette


def serve(settings: Settings) -> None:
    """Run the gateway until interrupted: uvicorn with the fast loop and parser, our log
    configuration, and the header deadline."""
    open_store(settings.store)  # a bad URL fails here, with its message, not inside every worker
    privacy.keys(settings)  # an unreadable secret_file fails here; a missing one is made before workers race for it
    # Workers are separate processes: they read the resolved settings from the environment.
    os.environ[SETTINGS_ENV] = encode(settings)
    metrics_dir = None
    if settings.workers > 1 and MULTIPROC_ENV not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="tailor-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    options: dict[str, Any] = {
        "app": "gateway.serve:app_from_environment",
        "factory": True,
        "loop": "uvloop",
        "http": HeaderDeadlineProtocol,
        "log_level": settings.log_level,
        "log_config": logs.config(settings),
        "access_log": settings.access_log,
        "lifespan": "on",
        # The sans-I/O websockets protocol: the least memory per socket here (PERF_NOTES), and
        # no per-message compression (several times the memory, half the throughput).
        "ws": "websockets-sansio",
        "ws_per_message_deflate": False,
        "ws_ping_interval": settings.heartbeat_s,
        "ws_ping_timeout": settings.heartbeat_s,
    }
    try:
        if settings.workers > 1:
            workers.supervise(options, host=settings.host, port=settings.port, workers=settings.workers)
        else:
            uvicorn.run(host=settings.host, port=settings.port, **options)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def app_from_environment() -> Starlette:
    """uvicorn's factory for `tailor serve` (in each worker): settings come from the parent process
    or TAILOR_*."""
    from gateway.app import create_app  # noqa: PLC0415 - the app (numba, numpy, the API) only in a worker, not in every CLI call

    encoded = os.environ.get(config.SETTINGS_ENV)
    settings = config.decode(encoded) if encoded else config.resolve()
    # Candidate searches run on several threads at once; BLAS threads of their own would only
    # fight them (and the event loop) for the same cores.
    threadpool_limits(1, "blas")
    # See gc_thresholds in tailor.toml.
    gc.set_threshold(*settings.gc_thresholds)
    app = create_app(settings)
    app.state.gateway.metrics.watch_gc()  # the server's own process only: tests build many apps
    return app


@functools.cache
def _header_timeout_s() -> float:
    encoded = os.environ.get(SETTINGS_ENV)
    return (config.decode(encoded) if encoded else config.resolve()).header_timeout_s


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """httptools' HTTP protocol, closing a connection whose request headers are not complete
    `header_timeout_s` after it opened (or after the request's first byte on a kept-alive
    connection). uvicorn times only the idle gap between requests: a client that opens a socket
    and sends part of a request, or nothing, holds it forever."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(_header_timeout_s(), self._expired)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expired(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
