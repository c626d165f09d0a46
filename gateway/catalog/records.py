"""Live catalog records: one item as the catalog API last set it, and the checks that turn a JSON
object into one.

An item's known fields are typed (`title`, `categories`, `tags`, `price`, `stock`, `available`);
any other field is kept in `attributes` (scalar values only). A stored record is always the whole
item after the change (a PATCH is merged into the item as this node serves it), so applying the
records newest last gives every node the same catalog whatever it missed before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from index_builder.schema import Attribute, LiveItem

# An item id is at most this long (index_builder.schema.Id says the same for the builder's input).
MAX_ID_LENGTH = 256
MAX_NAMES = 100  # categories or tags per item
MAX_ATTRIBUTES = 100
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

KNOWN = ("title", "categories", "tags", "price", "stock", "available", "attributes")


class InvalidItemError(ValueError):
    """An item body that cannot be a record; `field` names what is wrong."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ItemFields(msgspec.Struct, frozen=True, omit_defaults=True):
    """An item's fields, each optional (a PATCH gives some); any other field is kept in `attributes`
    (a string, number, boolean or null)."""

    title: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    categories: Annotated[list[Name], msgspec.Meta(max_length=MAX_NAMES)] | None = None
    tags: Annotated[list[Name], msgspec.Meta(max_length=MAX_NAMES)] | None = None
    price: Annotated[float, msgspec.Meta(ge=0)] | None = None
    stock: Annotated[int, msgspec.Meta(ge=0)] | None = None
    available: bool | None = None
    attributes: Annotated[dict[Name, Attribute], msgspec.Meta(max_length=MAX_ATTRIBUTES)] | None = None


def check_id(item_id: object) -> str:
    if not isinstance(item_id, str) or not item_id:
        raise InvalidItemError("`item_id` must be a non-empty string", "item_id")
    if len(item_id) > MAX_ID_LENGTH:
        raise InvalidItemError(f"`item_id` is longer than {MAX_ID_LENGTH} characters", "item_id")
    return item_id


def fields_of(body: Mapping[str, Any], *, ignore: frozenset[str] = frozenset()) -> ItemFields:
    """The typed fields of a decoded JSON object: known ones checked (InvalidItemError naming the
    field), any other (but `ignore`) gathered into `attributes`."""
    known = {name: value for name, value in body.items() if name in KNOWN}
    extra = {name: value for name, value in body.items() if name not in KNOWN and name not in ignore}
    try:
        fields = msgspec.convert(known, ItemFields)
    except msgspec.ValidationError as exc:
        message = str(exc)
        _, sep, path = message.rpartition(" - at `$.")
        raise InvalidItemError(message, path.rstrip("`") if sep else None) from None
    if not extra:
        return fields
    attributes = dict(fields.attributes or {})
    for name, value in extra.items():
        if len(name) > 256 or not name:
            raise InvalidItemError("attribute names are 1 to 256 characters", name[:256] or None)
        if value is not None and not isinstance(value, str | int | float | bool):
            raise InvalidItemError(f"attribute `{name}` must be a string, number, boolean or null", name)
        attributes[name] = value
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidItemError(f"at most {MAX_ATTRIBUTES} attributes", "attributes")
    return msgspec.structs.replace(fields, attributes=attributes)


def replaced(item_id: str, fields: ItemFields, *, now: float) -> LiveItem:
    """The item a PUT makes: what it gives, defaults for the rest."""
    return LiveItem(
        item_id,
        now,
        title=fields.title or "",
        categories=list(dict.fromkeys(fields.categories or [])),
        tags=list(dict.fromkeys(fields.tags or [])),
        price=fields.price,
        stock=fields.stock,
        available=True if fields.available is None else fields.available,
        attributes=dict(fields.attributes or {}),
    )


def patched(current: LiveItem, fields: ItemFields, given: frozenset[str], *, now: float) -> LiveItem:
    """`current` with the fields a PATCH gives (`given`: the names in its body, so `"price": null`
    clears the price); attributes are merged, a null attribute is kept as null."""
    changes: dict[str, Any] = {"changed": now, "retired": False}
    for name in ("title", "categories", "tags", "price", "stock", "available"):
        if name in given:
            value = getattr(fields, name)
            if name in ("categories", "tags"):
                value = list(dict.fromkeys(value or []))
            elif name == "title":
                value = value or ""
            elif name == "available":
                value = True if value is None else value
            changes[name] = value
    if fields.attributes:
        changes["attributes"] = {**current.attributes, **fields.attributes}
    return msgspec.structs.replace(current, **changes)


def retired(current: LiveItem, *, now: float) -> LiveItem:
    return msgspec.structs.replace(current, changed=now, retired=True)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LiveItem)


def encode(item: LiveItem) -> bytes:
    return _encoder.encode(item)


def decode(raw: bytes) -> LiveItem:
    return _decoder.decode(raw)
