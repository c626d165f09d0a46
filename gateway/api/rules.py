"""`/admin/rules`: store rule-set versions, activate and roll back, switch rules at runtime, preview.

PUT  /admin/rules                       store a new version (?activate=true to serve it at once)
GET  /admin/rules                       active version, flags, history of versions and activations
GET  /admin/rules/{version}             one stored version, as stored
POST /admin/rules/{version}/activate    serve it on every node
POST /admin/rules/rollback              serve the version active before the current one
POST /admin/rules/deactivate            serve no rules
PUT  /admin/rules/flags/{rule_id}       {"enabled": true|false|null}: on/off on every node
POST /admin/rules/preview               lists for visitors as served now and with a candidate
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import wire
from gateway.api.http import ApiError, field_of, json_response, parse_query, read_body
from gateway.api.recommend import n_of, serving_for
from gateway.api.versions import VersionsApi
from gateway.recommend.pipeline import Answer, Recommender
from gateway.rules.book import Book
from gateway.rules.conditions import Context
from gateway.rules.document import RuleSet, RuleSetError, parse
from gateway.rules.keeper import RuleKeeper
from gateway.runtime import Gateway
from gateway.store import StoreError

MAX_RULES_BODY = 2 * 1024 * 1024
MAX_FLAG_BODY = 4096


class RulesApi(VersionsApi[RuleKeeper]):
    noun = "rule-set version"

    def __init__(self, gateway: Gateway, keeper: RuleKeeper) -> None:
        super().__init__(keeper)
        self.gateway = gateway

    async def check(self, body: bytes, number: int) -> None:
        await self._checked(parse(body), number)  # the catalog may have changed since it was stored

    def _check(self, ruleset: RuleSet, version: int | None) -> Book | None:
        """Compile against the snapshot being served (unknown items, windows, segments and time
        zones are errors now, not surprises in production); None without a snapshot yet."""
        for index, trigger in enumerate(ruleset.triggers):
            try:
                self.gateway.triggers.check(ruleset.triggers[: index + 1])
            except ValueError as exc:
                raise ApiError(422, "invalid-rules", str(exc), field=f"triggers[{index}]", rule=trigger.id) from None
        rec = self.gateway.recommender
        if rec is None:
            return None
        try:
            return self.keeper.compile(ruleset, version, rec.snap)
        except RuleSetError as exc:
            raise ApiError(422, "invalid-rules", str(exc), field=exc.field, rule=exc.rule) from None

    async def _checked(self, ruleset: RuleSet, version: int | None) -> Book | None:
        return await asyncio.to_thread(self._check, ruleset, version)

    async def put(self, request: Request) -> Response:
        q = parse_query(request, wire.RulesQuery)
        body = await read_body(request, MAX_RULES_BODY)
        try:
            ruleset = parse(body)
        except RuleSetError as exc:
            raise ApiError(422, "invalid-rules", str(exc), field=exc.field, rule=exc.rule) from None
        await self._checked(ruleset, 0)
        documents = self.keeper.documents
        try:
            revision = await documents.put(body, now=time.time(), note=q.note)
            if q.activate:
                await documents.activate(revision.version, now=time.time())
                await self.keeper.refresh()
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        stored = wire.RulesStored(
            revision.version,
            revision.sha256,
            revision.created_at,
            q.activate,
            len(ruleset.rules),
            len(ruleset.segments),
        )
        return json_response(stored, 201)

    async def overview(self, request: Request) -> Response:
        return await self._overview()

    async def _overview(self) -> Response:
        state, versions, activations = await self.history()
        book = self.keeper.book
        body = wire.RulesOverview(
            active=state.active,
            serving=self.keeper.version,
            flags=state.flags,
            versions=versions,
            activations=activations,
            problem=self.keeper.problem,
            warnings=book.warnings if book is not None else [],
        )
        return json_response(body)

    async def flag(self, request: Request) -> Response:
        rule_id = request.path_params["rule_id"]
        try:
            update = msgspec.json.decode(await read_body(request, MAX_FLAG_BODY), type=wire.FlagUpdate)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ApiError(400, "invalid-body", str(exc), field=field_of(str(exc))) from None
        try:
            await self.keeper.documents.set_flag(rule_id, update.enabled)
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", str(exc)) from None
        await self.keeper.refresh()
        return await self._overview()

    async def preview(self, request: Request) -> Response:
        body = await read_body(request, MAX_RULES_BODY)
        try:
            asked = msgspec.json.decode(body, type=wire.PreviewRequest)
        except msgspec.ValidationError as exc:
            message = str(exc)
            path = field_of(message)
            if path is not None and path.startswith("rules."):
                try:
                    parse(msgspec.json.encode(msgspec.json.decode(body)["rules"]))
                except RuleSetError as invalid:
                    raise ApiError(
                        422, "invalid-rules", str(invalid), field=f"rules.{invalid.field}", rule=invalid.rule
                    ) from None
            raise ApiError(400, "invalid-body", message, field=path) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "invalid-body", f"not JSON: {exc}") from None
        gateway = self.gateway
        rec = serving_for(gateway, asked.category)
        candidate = await self._checked(asked.rules, None)
        c = asked.context
        context = Context(c.device, c.country, c.referrer, c.page)
        n = n_of(gateway, asked.n)
        visitors = []
        for visitor in asked.visitors:
            lists = []
            for rules in ("active", candidate):
                answer = await rec.recommend(
                    key=gateway.pseudonym(visitor),
                    user=visitor,
                    n=n,
                    categories=asked.category,
                    exclude=(),
                    requires=gateway.personalization,
                    now=c.at,
                    context=context,
                    rules=rules,
                )
                lists.append(_listed(rec, answer))
            visitors.append(wire.PreviewVisitor(visitor, lists[0], lists[1]))
        active = rec.book.version if rec.book is not None else None
        return json_response(wire.Preview(rec.snap.version, active, visitors))


def _listed(rec: Recommender, answer: Answer) -> wire.PreviewList:
    snap = rec.snap
    items = [
        wire.ScoredItem(
            snap.item_ids[pick.row],
            snap.titles[pick.row],
            snap.categories[pick.row],
            pick.score,
            [pick.reason] if isinstance(pick.reason, str) else list(pick.reason),
        )
        for pick in answer.picks
    ]
    return wire.PreviewList(items, answer.fallback, answer.segments, answer.rules, answer.fired, answer.content)
