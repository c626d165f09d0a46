"""`GET /v1/recommend`, `GET /v1/items/{id}/similar` and `GET /v1/popular`; and what every route that
answers from the served snapshot checks first (`serving`, `serving_for`, `n_of`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import encoding, wire
from gateway.api.callers import acting_for, request_id
from gateway.api.http import ApiError, JSONBytes, country_of, parse_query
from gateway.experiments.keeper import Enrolment
from gateway.recommend.pipeline import Answer, Recommender
from gateway.rules.conditions import Context
from gateway.rules.picks import with_reasons
from gateway.runtime import Gateway


def serving(gateway: Gateway) -> Recommender:
    if gateway.recommender is None:
        raise ApiError(503, "no-snapshot", "no snapshot loaded yet", headers={"retry-after": "5"})
    return gateway.recommender


def serving_for(gateway: Gateway, categories: list[str]) -> Recommender:
    rec = serving(gateway)
    unknown = rec.unknown_categories(categories)
    if unknown:
        message = f"no category {unknown[0]!r} in snapshot {rec.snap.version}"
        raise ApiError(400, "unknown-category", message, field="category")
    return rec


def n_of(gateway: Gateway, n: int | None) -> int:
    value = gateway.settings.default_n if n is None else n
    if value > gateway.settings.max_n:
        raise ApiError(400, "invalid-parameter", f"n must be at most {gateway.settings.max_n}", field="n")
    return value


class RecommendApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def recommend(self, request: Request) -> Response:
        gateway = self.gateway
        q = parse_query(request, wire.RecommendQuery)
        rec = serving_for(gateway, q.category)
        if q.user is not None and q.visitor is not None:
            raise ApiError(400, "invalid-parameter", "give `user` or `visitor`, not both", field="visitor")
        raw = acting_for(gateway, request, q.user if q.user is not None else q.visitor, q.token)
        key = None if raw is None else gateway.pseudonym(raw)
        answer, enrolment = await gateway.recommendation(
            rec,
            key,
            raw,
            n=n_of(gateway, q.n),
            categories=q.category,
            exclude=q.exclude,
            context=Context(q.device, q.country or country_of(request), q.referrer, q.page),
            inbox=gateway.marketing,
        )
        return self._answer(request, rec, answer, enrolment)

    async def similar(self, request: Request) -> Response:
        q = parse_query(request, wire.SimilarQuery)
        rec = serving_for(self.gateway, q.category)
        item = request.path_params["item_id"]
        row = rec.snap.row_of.get(item)
        if row is None:
            raise ApiError(404, "unknown-item", f"no item {item!r} in snapshot {rec.snap.version}", field="item_id")
        answer = await rec.similar(row, n=n_of(self.gateway, q.n), categories=q.category, exclude=q.exclude)
        return self._answer(request, rec, answer)

    async def popular(self, request: Request) -> Response:
        q = parse_query(request, wire.PopularQuery)
        rec = serving_for(self.gateway, q.category)
        answer = rec.popular_answer(n=n_of(self.gateway, q.n), categories=q.category, exclude=q.exclude)
        return self._answer(request, rec, answer)

    def _answer(
        self, request: Request, rec: Recommender, answer: Answer, enrolment: Enrolment | None = None
    ) -> Response:
        if answer.fallback is not None:
            self.gateway.metrics.fallbacks.labels(answer.fallback).inc()
        rid = request_id(self.gateway, request)
        body = encoding.encode_recommendations(
            rec.snap,
            rid,
            with_reasons(answer.picks, enrolment.reasons) if enrolment is not None else answer.picks,
            answer.fallback,
            answer.profile,
            segments=answer.segments,
            rules=answer.rules,
            content=answer.content,
            messages=answer.messages,
            experiments=enrolment.reasons if enrolment is not None else (),
        )
        self.gateway.metrics.rules_changed(answer.rules)
        return JSONBytes(body, request_id=rid)
