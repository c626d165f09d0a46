"""Run the gateway under uvicorn with the fast loop and parser (3x the pure-Python default here)."""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from gateway import privacy
from gateway.metrics import MULTIPROC_ENV
from gateway.settings import SETTINGS_ENV, Settings, encode
from gateway.store import open_store


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
            "gateway.app:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http="httptools",
            log_level=settings.log_level,
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
