"""`WS /v1/stream` (live recommendations and trigger messages, gateway.api.push.Hub) and
`POST /v1/token`, which gives a browser the signed visitor token the stream asks for."""

from __future__ import annotations

from collections.abc import Hashable

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from gateway.api import encoding, wire
from gateway.api.callers import admit, binds
from gateway.api.http import SMALL_BODY_BYTES, ApiError, field_of, json_response, parse_query, read_body
from gateway.api.push import Hub
from gateway.api.recommend import n_of, serving, serving_for
from gateway.privacy import tokens
from gateway.privacy.access import AccessError
from gateway.rules.picks import with_reasons
from gateway.runtime import Gateway


async def live_answer(
    gateway: Gateway, key: str, user: str, n: int | None, categories: list[str]
) -> tuple[Hashable, bytes, frozenset[str]]:
    """What the hub pushes to a visitor: their recommendations, and what tells whether they changed."""
    rec = serving(gateway)
    answer, enrolment = await gateway.recommendation(
        rec, key, user, n=n_of(gateway, n), categories=categories, exclude=()
    )
    if answer.fallback is not None:
        gateway.metrics.fallbacks.labels(answer.fallback).inc()
    # A new snapshot always counts as a change: its rows are other rows, and clients learn its version.
    picks = with_reasons(answer.picks, enrolment.reasons) if enrolment is not None else answer.picks
    same = (rec.snap.version, tuple((pick.row, pick.reason) for pick in picks))
    gateway.metrics.rules_changed(answer.rules)
    body = encoding.encode_recommendations(
        rec.snap,
        gateway.new_request_id(),
        picks,
        answer.fallback,
        answer.profile,
        segments=answer.segments,
        rules=answer.rules,
        content=answer.content,
        experiments=enrolment.reasons if enrolment is not None else (),
    )
    item_ids = rec.snap.item_ids
    return same, body, frozenset(item_ids[pick.row] for pick in picks)


class StreamApi:
    def __init__(self, gateway: Gateway, hub: Hub) -> None:
        self.gateway = gateway
        self.hub = hub

    async def token(self, request: Request) -> Response:
        gateway = self.gateway
        body = await read_body(request, SMALL_BODY_BYTES)  # a token is at most 1 KB: larger is a 400 up to here
        renew: str | None = None
        named: str | None = None
        if body:  # no body: a new anonymous visitor; anything else must be a TokenRequest
            try:
                asked = msgspec.json.decode(body, type=wire.TokenRequest)
            except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
                raise ApiError(400, "invalid-body", str(exc), field=field_of(str(exc))) from None
            renew, named = asked.token, asked.visitor
            if renew is not None and named is not None:
                raise ApiError(400, "invalid-body", "give `token` or `visitor`, not both", field="visitor")
        if named is not None:  # the site's backend signs its user in
            if binds(gateway, request):
                raise ApiError(
                    403, "forbidden", "only an admin key may mint a token for a named visitor", field="visitor"
                )
            visitor = named
        elif renew is None:
            visitor = tokens.new_visitor_id()
        else:
            try:
                visitor, _ = tokens.verify(gateway.secret, renew, grace_s=gateway.settings.token_renew_s)
            except tokens.TokenError as refused:
                raise ApiError(401, refused.code, str(refused), field="token") from None
        token = tokens.mint(gateway.secret, visitor, gateway.settings.token_ttl_s)
        expires = int(tokens.verify(gateway.secret, token)[1])
        return json_response(wire.StreamToken(visitor=visitor, token=token, expires_at=expires))

    async def stream(self, websocket: WebSocket) -> None:
        gateway = self.gateway
        # Accept first, then close with a code and reason: a refusal before the handshake reaches a
        # browser only as an anonymous failure.
        await websocket.accept()
        try:
            if gateway.access.active:
                admit(gateway, "public", websocket)
            q = parse_query(websocket, wire.StreamQuery)
            visitor, _ = tokens.verify(gateway.secret, q.token)
            rec = serving_for(gateway, q.category)
            n_of(gateway, q.n)
        except tokens.TokenError as refused:
            gateway.metrics.stream_drops.labels(refused.code).inc()
            await websocket.close(4401, refused.code)
            return
        except AccessError as refused:
            gateway.metrics.stream_drops.labels(refused.code).inc()
            await websocket.close({401: 4401, 403: 4403, 429: 4429}[refused.status], refused.code)
            return
        except ApiError as error:
            code = 1013 if error.status == 503 else 4400
            await websocket.close(code, f"{error.body.error.code}: {error.body.error.message}"[:120])
            return
        del rec
        await self.hub.serve(websocket, gateway.pseudonym(visitor), user=visitor, n=q.n, categories=q.category)
