"""`/v1/items`: the live catalog API (admin key). Changes are stored (gateway.store.catalog), announced
to every node and served over the snapshot (gateway.catalog); see docs/catalog.md.

PUT    /v1/items/{id}    create or replace an item
PATCH  /v1/items/{id}    change some of its fields (`{"stock": 0}`)
DELETE /v1/items/{id}    retire it: never served again, left out of the next build
GET    /v1/items/{id}    the item as this node knows it, with its source and when it last changed
POST   /v1/items         create or replace many (a JSON array, or JSON lines), each row on its own
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.http import ApiError, decoded_json, json_response, read_body
from gateway.catalog import records
from gateway.catalog.records import MAX_ID_LENGTH, InvalidItemError, ItemFields
from gateway.runtime import Gateway
from gateway.snapshot import Snapshot
from gateway.store import StoreError
from index_builder.schema import Attribute, LiveItem

MAX_ITEM_BODY = 256 * 1024
MAX_BULK_BODY = 32 * 1024 * 1024


class BulkItem(ItemFields, frozen=True, kw_only=True):
    """One row of `POST /v1/items`: an item with its id."""

    item_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]


class ItemView(msgspec.Struct, frozen=True):
    """An item as this node knows it."""

    item_id: str
    title: str
    categories: list[str]
    tags: list[str]
    price: float | None
    stock: Annotated[int | None, msgspec.Meta(description="null: unknown (served, and matches no in_stock rule).")]
    available: bool
    attributes: Annotated[
        dict[str, Attribute],
        msgspec.Meta(description="The fields not named above, as last set through this API (the snapshot keeps none)."),
    ]
    retired: bool
    source: Annotated[
        Literal["snapshot", "live"],
        msgspec.Meta(description="`live`: as last set through this API, after the snapshot was built."),
    ]
    changed: Annotated[float, msgspec.Meta(description="When it last changed (Unix seconds): the change or the build.")]
    served: Annotated[
        bool,
        msgspec.Meta(
            description="Whether this node serves it now (not retired, available, in stock or serve_out_of_stock; "
            "a change reaches every node within about a second)."
        ),
    ]


class ItemStored(msgspec.Struct, frozen=True):
    item: ItemView
    seq: Annotated[int, msgspec.Meta(description="The change's number in the catalog's sequence.")]


class RejectedItem(msgspec.Struct, frozen=True, omit_defaults=True):
    index: Annotated[int, msgspec.Meta(description="Position of the row in the body (0-based).")]
    code: Annotated[str, msgspec.Meta(description="invalid-item")]
    message: str
    item_id: str | None = None
    field: str | None = None


class ItemsStored(msgspec.Struct, frozen=True):
    """What happened to a bulk call: the valid rows are stored (all of them, in one change) even
    when others are rejected."""

    stored: Annotated[int, msgspec.Meta(description="Rows stored.")]
    rejected: list[RejectedItem] = []
    seq: Annotated[int, msgspec.Meta(description="The last change's number (0: nothing stored).")] = 0


class ItemsApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    # -- one item ---------------------------------------------------------------------------------
    async def get(self, request: Request) -> Response:
        item_id = _path_id(request)
        current = self._current(item_id)
        if current is None:
            raise ApiError(404, "unknown-item", f"no item {item_id!r}", field="item_id")
        return json_response(self._view(*current))

    async def put(self, request: Request) -> Response:
        item_id = _path_id(request)
        body = _object(await read_body(request, MAX_ITEM_BODY))
        if body.get("item_id", item_id) != item_id:
            raise ApiError(422, "invalid-item", "`item_id` in the body differs from the path", field="item_id")
        fields = _fields(body)
        return await self._store(records.replaced(item_id, fields, now=time.time()))

    async def patch(self, request: Request) -> Response:
        item_id = _path_id(request)
        body = _object(await read_body(request, MAX_ITEM_BODY))
        if body.get("item_id", item_id) != item_id:
            raise ApiError(422, "invalid-item", "`item_id` in the body differs from the path", field="item_id")
        fields = _fields(body)
        current = self._current(item_id)
        if current is None or current[0].retired:
            raise ApiError(404, "unknown-item", f"no item {item_id!r} (PUT creates one)", field="item_id")
        given = frozenset(body) - {"item_id"}
        return await self._store(records.patched(current[0], fields, given, now=time.time()))

    async def delete(self, request: Request) -> Response:
        item_id = _path_id(request)
        current = self._current(item_id)
        if current is None or current[0].retired:
            raise ApiError(404, "unknown-item", f"no item {item_id!r}", field="item_id")
        return await self._store(records.retired(current[0], now=time.time()))

    # -- many -------------------------------------------------------------------------------------
    async def bulk(self, request: Request) -> Response:
        gateway = self.gateway
        body = await read_body(request, MAX_BULK_BODY)
        # Decoding and checking thousands of rows takes tens of milliseconds: in a worker thread,
        # so the event loop keeps answering meanwhile.
        rows = await asyncio.to_thread(_rows, body)
        limit = gateway.settings.max_items_per_call
        if len(rows) > limit:
            raise ApiError(413, "batch-too-large", f"at most {limit} items per call", field="items")
        good, rejected = await asyncio.to_thread(_checked, rows, time.time())
        if not good:
            problems = [f"items[{r.index}]{'.' + r.field if r.field else ''}: {r.message}" for r in rejected[:20]]
            raise ApiError(422, "invalid-items", "no row of the call is a valid item", problems=problems)
        seq = await self._put(good)
        return json_response(ItemsStored(len(good), rejected, seq))

    # -- helpers ----------------------------------------------------------------------------------
    async def _store(self, item: LiveItem) -> Response:
        seq = await self._put([item])
        return json_response(ItemStored(self._view(item, "live"), seq))

    async def _put(self, items: list[LiveItem]) -> int:
        try:
            return await self.gateway.catalog.put(items)
        except StoreError as exc:
            raise ApiError(503, "store-unavailable", f"not stored: {exc}", headers={"retry-after": "1"}) from None

    def _current(self, item_id: str) -> tuple[LiveItem, Literal["snapshot", "live"]] | None:
        """The item as this node knows it: its newest live record, else the snapshot's."""
        gateway = self.gateway
        live = gateway.catalog.get(item_id)
        base = gateway.base
        if live is not None and (base is None or live.changed > base.created):
            return live, "live"
        if base is None:
            return None
        row = base.row_of.get(item_id)
        if row is None:
            return None
        return _from_snapshot(base, row), "snapshot"

    def _view(self, item: LiveItem, source: Literal["snapshot", "live"]) -> ItemView:
        rec = self.gateway.recommender
        served = False
        if rec is not None:
            row = rec.snap.row_of.get(item.item_id)
            served = row is not None and row not in rec.snap.withheld and not item.retired
        return ItemView(
            item.item_id,
            item.title,
            item.categories,
            item.tags,
            item.price,
            item.stock,
            item.available,
            item.attributes,
            item.retired,
            source,
            item.changed,
            served,
        )


def _checked(rows: list[Any], now: float) -> tuple[list[LiveItem], list[RejectedItem]]:
    """The valid rows of a bulk call as items, and the others."""
    good: list[LiveItem] = []
    rejected: list[RejectedItem] = []
    for index, row in enumerate(rows):
        try:
            if isinstance(row, Unreadable):
                raise InvalidItemError(row.message)
            if not isinstance(row, dict):
                raise InvalidItemError("each row must be a JSON object")
            item_id = records.check_id(row.get("item_id"))
            good.append(records.replaced(item_id, records.fields_of(row, ignore=frozenset({"item_id"})), now=now))
        except InvalidItemError as exc:
            named = row.get("item_id") if isinstance(row, dict) else None
            shown = named[:MAX_ID_LENGTH] if isinstance(named, str) else None
            rejected.append(RejectedItem(index, "invalid-item", str(exc), shown, exc.field))
    return good, rejected


def _from_snapshot(snap: Snapshot, row: int) -> LiveItem:
    price = float(snap.prices[row]) if len(snap.prices) > row else float("nan")
    stock = int(snap.stock[row]) if len(snap.stock) > row else -1
    return LiveItem(
        snap.item_ids[row],
        snap.created,
        title=snap.titles[row],
        categories=list(snap.categories[row]),
        tags=sorted(snap.item_tags[row]) if len(snap.item_tags) > row else [],
        price=None if price != price else price,  # noqa: PLR0124 - NaN: unknown
        stock=None if stock < 0 else stock,
        available=row not in snap.unavailable,
        attributes=dict(snap.item_attributes[row]) if len(snap.item_attributes) > row else {},
    )


def _path_id(request: Request) -> str:
    item_id: str = request.path_params["item_id"]
    if len(item_id) > MAX_ID_LENGTH:
        raise ApiError(400, "invalid-parameter", f"an item id is at most {MAX_ID_LENGTH} characters", field="item_id")
    return item_id


def _object(body: bytes) -> dict[str, Any]:
    raw = decoded_json(body)
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid-body", "expected a JSON object (an item)")
    return raw


def _fields(body: dict[str, Any]) -> ItemFields:
    try:
        return records.fields_of(body, ignore=frozenset({"item_id"}))
    except InvalidItemError as exc:
        raise ApiError(422, "invalid-item", str(exc), field=exc.field) from None


class Unreadable(msgspec.Struct, frozen=True):
    """A line of a JSON-lines body that is not JSON: that row is rejected, the others go on."""

    message: str


def _rows(body: bytes) -> list[Any]:
    """The rows of a bulk body: a JSON array of items, or JSON lines (one item per line)."""
    stripped = body.lstrip()
    if not stripped:
        raise ApiError(400, "invalid-body", "no items", field="items")
    if stripped.startswith(b"["):
        rows = decoded_json(stripped)
        if not isinstance(rows, list):
            raise ApiError(400, "invalid-body", "expected a JSON array of items or JSON lines")
        return rows
    found: list[Any] = []
    for number, line in enumerate(stripped.splitlines()):
        if not line.strip():
            continue
        try:
            found.append(msgspec.json.decode(line))
        except msgspec.DecodeError as exc:
            found.append(Unreadable(f"line {number + 1} is not JSON: {exc}"))
    return found
