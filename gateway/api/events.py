"""`POST /v1/events`: a batch of behaviour events, each checked on its own (gateway.api.ingest), stored in
one store call for all its visitors (each visitor's events all or nothing), then shown to the
triggers and the experiments."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import wire
from gateway.api.callers import acting_for
from gateway.api.http import ApiError, json_response, read_body
from gateway.api.ingest import EVENT_MEDIA_TYPES, check_event, decode_events
from gateway.runtime import Gateway
from gateway.store import PartlyStoredError, Recorded, StoreError

MAX_BODY_BYTES = 4 << 20


class EventsApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def events(self, request: Request) -> Response:
        gateway = self.gateway
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in EVENT_MEDIA_TYPES:
            raise ApiError(415, "unsupported-media-type", f"send JSON as application/json or text/plain, not {media!r}")
        raw, token = decode_events(await read_body(request, MAX_BODY_BYTES))
        # With a token, every event is its visitor's; a public key must send one.
        owner = acting_for(gateway, request, None, token, required=True)
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
        by_visitor: dict[str, list[tuple[int, Recorded]]] = {}
        for index, item in enumerate(raw):
            checked = check_event(index, item, now, event_types=gateway.event_types, snap=snap, visitor=owner)
            if isinstance(checked, wire.Rejected):
                rejected.append(checked)
                gateway.metrics.events_rejected.labels(checked.code).inc()
            else:
                key, recorded = checked
                by_visitor.setdefault(key, []).append((index, recorded))
        if not by_visitor:
            problems = [f"events[{r.index}]{'.' + r.field if r.field else ''}: {r.code}: {r.message}" for r in rejected]
            raise ApiError(422, "invalid-events", "no event in the batch is valid", problems=problems)
        for indexed in by_visitor.values():
            indexed.sort(key=lambda pair: pair[1].ts)  # stored oldest first, whatever the batch order
        pseudonym = gateway.pseudonym
        visitors = [(pseudonym(key), [recorded for _, recorded in indexed]) for key, indexed in by_visitor.items()]
        indexes = [[index for index, _ in indexed] for indexed in by_visitor.values()]  # of each event in the batch
        failure: StoreError | None = None
        try:
            outcomes: dict[int, list[bool] | None] = dict(
                enumerate(
                    await gateway.store.record_many(
                        visitors,
                        retention=gateway.retention,
                        now=now,
                        requires=gateway.analytics,
                        timeout=max(gateway.settings.store_timeout_ms / 1000 * 10, 1.0),
                    )
                )
            )
        except PartlyStoredError as exc:
            failure, outcomes = exc, exc.outcomes
        except StoreError as exc:
            failure, outcomes = exc, {}
        accepted = duplicates = unconsented = 0
        stored_indexes: list[int] = []
        fresh_events: list[tuple[str, list[Recorded]]] = []
        for position, stored in outcomes.items():
            key, events = visitors[position]
            if stored is None:  # no analytics consent: not stored, counted here without who
                unconsented += len(events)
                for event in events:
                    gateway.metrics.events_unconsented.labels(event.event).inc()
                continue
            stored_indexes += indexes[position]
            for event, fresh in zip(events, stored, strict=True):
                if fresh:
                    accepted += 1
                    gateway.metrics.events.labels(event.event).inc()
                else:
                    duplicates += 1
            if any(stored):
                fresh_events.append((key, [e for e, fresh in zip(events, stored, strict=True) if fresh]))
        if duplicates:
            gateway.metrics.events_duplicate.inc(duplicates)
        # Triggers and experiments see what was stored (the duplicates left out), once it is, even when
        # the rest failed: a retry brings those events back as duplicates, which they never see.
        await asyncio.gather(*(gateway.triggers.on_recorded(key, events, now) for key, events in fresh_events))
        if gateway.experiments.metric_events:
            credited = await asyncio.gather(*(gateway.experiments.convert(key, events) for key, events in fresh_events))
            gateway.metrics.experiment_conversions.inc(sum(credited))
        if failure is not None:
            timed_out = isinstance(failure.__cause__, TimeoutError)
            gateway.metrics.store_errors.labels("timeout" if timed_out else "error").inc()
            raise ApiError(
                503,
                "store-unavailable",
                f"events not stored: {failure}; those at `stored` (positions in the batch) are stored, the "
                "others not, or, if the store failed mid-way, perhaps: retry the batch with the same event ids, "
                "and none is counted twice (the stored ones come back as duplicates)",
                headers={"retry-after": "1"},
                stored=sorted(stored_indexes),
            ) from None
        return json_response(wire.EventsAccepted(accepted, duplicates, rejected, unconsented), 202)
