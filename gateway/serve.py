"""Run the gateway under uvicorn with the fast loop and parser (3x the pure-Python default here)."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import uvicorn
from threadpoolctl import threadpool_limits

from gateway import logs, privacy
from gateway import settings as config
from gateway.metrics import MULTIPROC_ENV
from gateway.settings import SETTINGS_ENV, Settings, encode
from gateway.store import open_store

if TYPE_CHECKING:
    from starlette.applications import Starlette


def serve(settings: Settings) -> None:
    open_store(settings.store)  # a bad URL fails here, with its message, not inside every worker
    privacy.keys(settings)  # an unreadable secret_file fails here; a missing one is made before workers race for it
    # Workers are separate processes: they read the resolved settings from the environment.
    os.environ[SETTINGS_ENV] = encode(settings)
    metrics_dir = None
    if settings.workers > 1 and MULTIPROC_ENV not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="tailor-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run(
            "gateway.serve:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http="httptools",
            log_level=settings.log_level,
            log_config=logs.config(settings),
            access_log=settings.access_log,
            lifespan="on",
            # The sans-I/O websockets protocol: the least memory per socket here (PERF_NOTES), and
            # no per-message compression (several times the memory, half the throughput).
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_ping_interval=settings.heartbeat_s,
            ws_ping_timeout=settings.heartbeat_s,
        )
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
