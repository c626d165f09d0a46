"""`POST /v1/events` below the HTTP layer: a body's events, each checked on its own."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from gateway.api import wire
from gateway.api.http import ApiError, decoded_json, field_of
from gateway.snapshot import Snapshot
from gateway.store import Recorded
from index_builder.schema import BUILT_IN_EVENTS, ITEMLESS_EVENTS

# The window an event's `ts` must fall in: from 2000-01-01T00:00:00Z (earlier is a client bug, such
# as seconds sent where milliseconds were meant, or an unset clock) to 5 minutes past the gateway's
# clock (devices' clocks drift; beyond that the event would outlive windows it has not lived in).
OLDEST_TS = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
FUTURE_SLACK_S = 300.0
# navigator.sendBeacon sends a string body as text/plain (a CORS-safe type); no type at all is accepted too.
EVENT_MEDIA_TYPES = frozenset({"", "application/json", "text/plain"})
# Built-in types that are about an item (custom types may or may not be).
ITEM_EVENTS = frozenset(BUILT_IN_EVENTS) - ITEMLESS_EVENTS
MILLISECONDS_ABOVE = 1e11  # a larger number is Unix milliseconds: seconds would be beyond the year 5000


def decode_events(body: bytes) -> tuple[list[object], str | None]:
    """The events of a body that is `{"events": [...], "token": ...}` (token optional), a JSON array
    of events, or one event; and the token."""
    raw = decoded_json(body)
    token = None
    if isinstance(raw, dict) and "event" not in raw:
        unknown = sorted(set(raw) - {"events", "token"})
        if unknown:
            raise ApiError(400, "invalid-body", f"unknown field {unknown[0]!r}; expected `events`", field=unknown[0])
        token = raw.get("token")
        if token is not None and (not isinstance(token, str) or not 0 < len(token) <= 1024):
            raise ApiError(400, "invalid-body", "`token` must be a visitor token", field="token")
        raw = raw.get("events")
        if not isinstance(raw, list):
            raise ApiError(400, "invalid-body", "`events` must be an array of events", field="events")
    elif isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ApiError(400, "invalid-body", 'expected an event, an array of events or {"events": [...]}')
    if not raw:
        raise ApiError(400, "invalid-body", "no events", field="events")
    return raw, token


def timestamp(value: float | str) -> float | None:
    """Unix seconds (UTC) of an event's `ts`: seconds, milliseconds or ISO 8601; None for a string
    that is no ISO 8601 time. (Whether it is a sane time is check_event's question.)"""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return value / 1000.0 if value > MILLISECONDS_ABOVE else float(value)


def check_event(  # noqa: PLR0911 - one return per reason to reject
    index: int,
    item: object,
    now: float,
    *,
    event_types: frozenset[str],
    snap: Snapshot | None,
    visitor: str | None = None,
) -> wire.Rejected | tuple[str, Recorded]:
    """One event of a batch: converted and checked, or the reason it is rejected. `visitor` is the
    batch's token's: an event without an id is theirs, one naming somebody else is rejected."""
    try:
        event = msgspec.convert(item, wire.EventIn)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = field_of(message)
        if message.startswith("Object contains unknown field"):
            field = message.split("`")[1]
        return wire.Rejected(index, "invalid-event", message.split(" - at ", maxsplit=1)[0], field)
    key = event.user if event.user is not None else event.visitor
    if visitor is not None:
        if key is not None and key != visitor:
            return wire.Rejected(index, "not-your-visitor", "the batch's token is for another visitor", "visitor")
        key = visitor
    if key is None:
        return wire.Rejected(index, "invalid-event", "needs `user` or `visitor`", "visitor")
    if event.event not in event_types:
        known = ", ".join(sorted(event_types))
        return wire.Rejected(index, "unknown-event", f"unknown event type {event.event!r}; known: {known}", "event")
    if event.item is None and event.event in ITEM_EVENTS:
        return wire.Rejected(index, "missing-item", f"a {event.event} event needs an `item`", "item")
    ts = now if event.ts is None else timestamp(event.ts)
    if ts is None:
        return wire.Rejected(index, "invalid-event", "`ts` is neither a number nor an ISO 8601 time", "ts")
    if ts < OLDEST_TS:
        return wire.Rejected(index, "ts-too-old", "`ts` is before 2000-01-01T00:00:00Z", "ts")
    if ts > now + FUTURE_SLACK_S:
        return wire.Rejected(index, "ts-in-future", "`ts` is more than 5 minutes ahead of the gateway", "ts")
    categories: tuple[str, ...] = ()
    if event.item is not None and snap is not None:
        row = snap.row_of.get(event.item)
        if row is not None:
            categories = tuple(snap.categories[row])
    request_id = event.request_id
    if request_id is None and event.event == "click" and event.query is not None and event.query.startswith("rec:"):
        request_id = event.query[4:] or None  # how earlier snippets sent it
    return key, Recorded(event.event, ts, event.item, event.id, categories, event.query, event.value, request_id)
