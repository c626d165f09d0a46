"""`POST /v1/events`: a batch of behaviour events, each checked on its own (gateway.ingest), stored per
visitor in one store call each, then shown to the triggers and the experiments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from gateway import wire
from gateway.access import Scope
from gateway.http import ApiError, json_response, read_body
from gateway.ingest import EVENT_MEDIA_TYPES, check_event, decode_events
from gateway.store import Recorded, StoreError

if TYPE_CHECKING:
    from gateway.app import Gateway

MAX_BODY_BYTES = 4 << 20
Handler = Callable[[Request], Awaitable[Response]]


class EventsApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def table(self) -> list[tuple[str, str, Handler, str, Scope]]:
        return [("/v1/events", "events", self.events, "POST", "public")]

    async def events(self, request: Request) -> Response:
        gateway = self.gateway
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in EVENT_MEDIA_TYPES:
            raise ApiError(415, "unsupported-media-type", f"send JSON as application/json or text/plain, not {media!r}")
        raw, token = decode_events(await read_body(request, MAX_BODY_BYTES))
        # With a token, every event is its visitor's; a public key must send one.
        owner = gateway.acting_for(request, None, token, required=True)
        if len(raw) > gateway.settings.max_events_per_batch:
            raise ApiError(
                413,
                "batch-too-large",
                f"at most {gateway.settings.max_events_per_batch} events per batch",
                field="events",
            )
        now = time.time()
        snap = gateway.recommender.snap if gateway.recommender is not None else None
        rejected: list[wire.Rejected] = []
        by_visitor: dict[str, list[Recorded]] = {}
        for index, item in enumerate(raw):
            checked = check_event(index, item, now, event_types=gateway.event_types, snap=snap, visitor=owner)
            if isinstance(checked, wire.Rejected):
                rejected.append(checked)
                gateway.metrics.events_rejected.labels(checked.code).inc()
            else:
                key, recorded = checked
                by_visitor.setdefault(key, []).append(recorded)
        if not by_visitor:
            problems = [f"events[{r.index}]{'.' + r.field if r.field else ''}: {r.code}: {r.message}" for r in rejected]
            raise ApiError(422, "invalid-events", "no event in the batch is valid", problems=problems)
        for events in by_visitor.values():
            events.sort(key=lambda recorded: recorded.ts)  # stored oldest first, whatever the batch order
        retention, pseudonym, analytics = gateway.retention, gateway.pseudonym, gateway.analytics
        try:
            async with asyncio.timeout(max(gateway.settings.store_timeout_ms / 1000 * 10, 1.0)):
                outcomes = await asyncio.gather(
                    *(
                        gateway.store.record(pseudonym(key), events, retention=retention, now=now, requires=analytics)
                        for key, events in by_visitor.items()
                    )
                )
        except (StoreError, TimeoutError) as exc:
            gateway.metrics.store_errors.labels("timeout" if isinstance(exc, TimeoutError) else "error").inc()
            raise ApiError(
                503,
                "store-unavailable",
                f"events not stored: {exc or 'timeout'}; retry with the same event ids and none is counted twice",
                headers={"retry-after": "1"},
            ) from None
        accepted = duplicates = unconsented = 0
        for events, stored in zip(by_visitor.values(), outcomes, strict=True):
            if stored is None:  # no analytics consent: not stored, counted here without who
                unconsented += len(events)
                for event in events:
                    gateway.metrics.events_unconsented.labels(event.event).inc()
                continue
            for event, fresh in zip(events, stored, strict=True):
                if fresh:
                    accepted += 1
                    gateway.metrics.events.labels(event.event).inc()
                else:
                    duplicates += 1
        if duplicates:
            gateway.metrics.events_duplicate.inc(duplicates)
        # Triggers and experiments see what was stored (the duplicates left out), once it is.
        fresh_events = [
            (pseudonym(key), [e for e, fresh in zip(events, stored, strict=True) if fresh])
            for (key, events), stored in zip(by_visitor.items(), outcomes, strict=True)
            if stored
        ]
        await asyncio.gather(*(gateway.triggers.on_recorded(key, events, now) for key, events in fresh_events))
        if gateway.experiments.metric_events:
            credited = await asyncio.gather(*(gateway.experiments.convert(key, events) for key, events in fresh_events))
            gateway.metrics.experiment_conversions.inc(sum(credited))
        return json_response(wire.EventsAccepted(accepted, duplicates, rejected, unconsented), 202)
