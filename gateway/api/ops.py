"""Operations: `GET /healthz` (alive), `GET /readyz` (a snapshot loaded and the store reachable),
`GET /metrics` (Prometheus) and `POST /admin/reload` (swap to the current snapshot now)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import wire
from gateway.api.http import ApiError, json_response
from gateway.runtime import Gateway
from gateway.snapshot import SnapshotRefusedError
from gateway.store import MemoryStore


class OpsApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def healthz(self, request: Request) -> Response:
        return json_response(wire.Health())

    async def readyz(self, request: Request) -> Response:
        gateway = self.gateway
        problems: list[str] = []
        rec = gateway.recommender
        store_ok = await gateway.guard.ping()
        if rec is None:
            problems.append("no snapshot loaded")
        if not store_ok:
            problems.append(f"store {gateway.settings.store} unreachable")
        problems.extend(f"snapshot {v} refused: {'; '.join(p)}" for v, p in gateway.refused.items())
        age = rec.snap.age() if rec is not None else None
        body = wire.Readiness(
            ready=rec is not None and store_ok,
            snapshot=rec.snap.version if rec is not None else None,
            snapshot_age_s=round(age, 1) if age is not None else None,
            stale=rec is not None and rec.stale(time.time()),
            store="ok" if store_ok else "unreachable",
            problems=problems,
        )
        return json_response(body, 200 if body.ready else 503)

    async def metrics_page(self, request: Request) -> Response:
        gateway = self.gateway
        rec = gateway.recommender
        if rec is not None:
            cache = rec.candidates.cache
            gateway.metrics.cache_lookups.labels("hit").set(cache.hits)
            gateway.metrics.cache_lookups.labels("miss").set(cache.misses)
            gateway.metrics.cache_entries.set(len(cache))
        if isinstance(gateway.store, MemoryStore):
            gateway.metrics.store_visitors.set(len(gateway.store))
            gateway.metrics.store_bytes.set(gateway.store.bytes)
        text = gateway.metrics.exposition(lambda: rec.snap.age() if rec is not None else None)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def admin_reload(self, request: Request) -> Response:
        gateway = self.gateway
        try:
            reloaded = await gateway.reload()
            return json_response(wire.ReloadResult(reloaded.changed, reloaded.version, reloaded.previous))
        except SnapshotRefusedError as refused:
            raise ApiError(
                409, "snapshot-refused", str(refused), problems=refused.problems, field=refused.version
            ) from None
