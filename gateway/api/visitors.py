"""The routes about one visitor's data: erasure, export, and consent (see docs/privacy.md)."""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import wire
from gateway.api.callers import acting_for, token_of
from gateway.api.http import SMALL_BODY_BYTES, ApiError, field_of, json_response, parse_query, read_body
from gateway.api.push import Hub
from gateway.rules.triggers import Delivered
from gateway.runtime import Gateway
from gateway.store import Consent, StoreError

log = logging.getLogger("tailor.gateway")
ERASURE_WAIT_S = 2.0  # how long an erasure waits for the other processes to close the visitor's sockets


class VisitorsApi:
    def __init__(self, gateway: Gateway, hub: Hub) -> None:
        self.gateway = gateway
        self.hub = hub

    async def erase_visitor(self, request: Request) -> Response:
        visitor = request.path_params["visitor_id"]
        key = self.gateway.pseudonym(visitor)
        try:
            forgotten = await self.gateway.store.forget(key)
            await self.gateway.experiments.ledger.forget(key)  # their arms; the anonymous totals stay
        except StoreError as exc:
            raise ApiError(
                503, "store-unavailable", f"nothing erased: {exc}; retry", headers={"retry-after": "1"}
            ) from None
        # This process closes the visitor's sockets first (whether or not its subscription is up), then
        # tells every process sharing the store to close theirs, waiting a moment for their counts.
        closed = await self.hub.disconnect(key)
        try:
            closed += await self.gateway.store.announce_erasure(key, wait=ERASURE_WAIT_S)
        except StoreError as exc:
            log.warning("erasure not announced to other processes (%s): only this one closed sockets", exc)
        receipt = wire.ErasureReceipt(
            receipt=uuid.uuid4().hex,
            visitor=visitor,
            erased_at=time.time(),
            profile=forgotten.profile,
            log_events=forgotten.log_events,
            streams_closed=closed,
        )
        self.gateway.metrics.erasures.inc()
        log.info(
            "erasure %s: profile %s, %d logged events, %d sockets",
            receipt.receipt,
            receipt.profile,
            receipt.log_events,
            closed,
        )
        return json_response(receipt)

    async def export_visitor(self, request: Request) -> Response:
        visitor = request.path_params["visitor_id"]
        key = self.gateway.pseudonym(visitor)
        now = time.time()
        try:
            profile = await self.gateway.store.profile(key, limit=self.gateway.settings.recent_keep, now=now)
            logged = await self.gateway.store.logged(key)
            triggered = await self.gateway.store.trigger_state(key, now=now)
            arms = await self.gateway.experiments.ledger.marks(key)
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc), headers={"retry-after": "1"}) from None
        body = wire.VisitorExport(
            visitor=visitor,
            exported_at=now,
            recent=[wire.ExportedInteraction(i.item, i.event, i.ts) for i in profile.recent],
            counters=profile.counters,
            last_seen=profile.last_seen,
            events=logged,
            pseudonym=key,
            consent=profile.consent,
            messages=[msgspec.json.decode(message, type=Delivered) for message in triggered.messages],
            pending_triggers={timer.trigger: timer.due for timer in triggered.timers},
            fired_triggers=triggered.fired,
            experiments=arms,
        )
        return json_response(body)

    # -- consent ------------------------------------------------------------------------------
    def _consent_view(self, visitor: str, consent: dict[str, Consent], now: float) -> wire.ConsentView:
        purposes: dict[str, wire.PurposeConsent] = {}
        for purpose, requirement in self.gateway.requirements.items():
            allowed = requirement.permits(consent, now)
            choice = consent.get(purpose)
            purposes[purpose] = (
                wire.PurposeConsent(allowed)
                if choice is None
                else wire.PurposeConsent(allowed, choice.state, choice.at, choice.source, choice.expires_at)
            )
        return wire.ConsentView(visitor=visitor, mode=self.gateway.settings.consent_mode, purposes=purposes)

    def _consent_subject(self, request: Request, visitor: str | None, token: str | None) -> str:
        subject = acting_for(self.gateway, request, visitor, token)
        if subject is None:
            raise ApiError(
                400, "invalid-parameter", "name the visitor: `token` (or, with an admin key, `visitor`)", field="token"
            )
        return subject

    async def get_consent(self, request: Request) -> Response:
        q = parse_query(request, wire.ConsentQuery)
        visitor = self._consent_subject(request, q.visitor, q.token)
        now = time.time()
        try:
            profile = await self.gateway.store.profile(
                self.gateway.pseudonym(visitor), limit=0, now=now, counters=False
            )
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc), headers={"retry-after": "1"}) from None
        return json_response(self._consent_view(visitor, profile.consent, now))

    async def put_consent(self, request: Request) -> Response:
        try:
            update = msgspec.json.decode(await read_body(request, SMALL_BODY_BYTES), type=wire.ConsentUpdate)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raise ApiError(400, "invalid-body", str(exc), field=field_of(str(exc))) from None
        token = token_of(request, update.token)
        visitor = self._consent_subject(request, update.visitor, token)
        now = time.time()
        if update.expires_at is not None and update.expires_at <= now:
            raise ApiError(400, "invalid-body", "`expires_at` is in the past", field="expires_at")
        if token is not None:
            if update.source is not None:
                raise ApiError(400, "invalid-body", "a visitor's own choice has source `visitor`", field="source")
            source = "visitor"
        else:
            source = update.source or "site"
        choices: dict[str, Consent] = {
            p: Consent(state, now, source, update.expires_at) for p, state in update.choices.items()
        }
        key = self.gateway.pseudonym(visitor)
        try:
            await self.gateway.store.set_consent(key, choices, ttl=self.gateway.settings.profile_ttl_s, now=now)
            profile = await self.gateway.store.profile(key, limit=0, now=now, counters=False)
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", f"{exc}; retry", headers={"retry-after": "1"}) from None
        for purpose, choice in choices.items():
            self.gateway.metrics.consent_changes.labels(purpose, choice.state).inc()
        return json_response(self._consent_view(visitor, profile.consent, now))
