"""Declared input records. Every line the builder reads is converted into one of these or rejected."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]

# How much one event of each type says about a visitor's interest in an item. Search events carry
# a query, not an item, so they weigh nothing in training; a removal from the cart weighs nothing
# rather than less than nothing because the add before it already said "interested".
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 4.0,
    "remove_from_cart": 0.0,
    "purchase": 8.0,
    "search": 0.0,
    "rating": 1.0,
}

# The event types the gateway knows without configuration (a shop declares others: `custom_events`).
BUILT_IN_EVENTS = ("view", "click", "add_to_cart", "remove_from_cart", "purchase", "search")
# Event types that carry no item: a missing item_id is valid for them and not for the others.
ITEMLESS_EVENTS = frozenset({"search"})


class Interaction(msgspec.Struct, forbid_unknown_fields=False):
    """One behaviour event. `timestamp` is ISO 8601 or epoch seconds; naive times are taken as UTC."""

    user_id: Id
    event: Id
    timestamp: datetime
    item_id: Id | None = None
    value: float | None = None
    event_id: Id | None = None
    query: str | None = None


Attribute = str | int | float | bool | None


class Item(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """One catalog entry; attributes not named here are kept in `attributes`. An item that is not
    `available` stays in the catalog (its interactions still teach the model) but is never served."""

    item_id: Id
    title: str = ""
    categories: list[str] = []
    tags: list[str] = []
    price: NonNegative | None = None
    stock: int | None = None
    attributes: dict[str, Attribute] = {}
    available: bool = True


class LiveItem(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """An item as the gateway's catalog API last set it (gateway.catalog): the whole item, not the
    change. `changed` is when the node that took the change took it (Unix seconds); `retired`:
    deleted, never served again and left out of the next build. The gateway stores these records and
    `tailor build --catalog` reads them (index_builder.live_catalog)."""

    item_id: str
    changed: float
    title: str = ""
    categories: list[str] = []
    tags: list[str] = []
    price: float | None = None
    stock: int | None = None
    available: bool = True
    attributes: dict[str, Attribute] = {}
    retired: bool = False
