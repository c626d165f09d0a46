"""Rules across fields, in JSON Schema, for the OpenAPI document (gateway.api.openapi).

msgspec writes each field of a Struct into its schema; what a `__post_init__` or a check after
decoding enforces across fields (exactly one of two, at least one of several) it cannot see. A module
lists those as `STATED = {Struct: schema}`, and the document adds each schema to the Struct's
component. Each states exactly what the server refuses, no more: a field given as null counts as
absent, as it does for the server. The alternatives are written to exclude each other where they
can, so a generator picking one (schemathesis) does not have to discard what matches two.

Also the date-times msgspec reads: RFC 3339 as JSON Schema's `date-time`, and a space or a lowercase
`t` between date and time, `+hhmm` offsets, without the offset when the type allows it; no leap
second (`:60`), no year 0000, no day a month lacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Schema = dict[str, Any]

NOT_NULL: Schema = {"not": {"type": "null"}}


def given(*names: str) -> Schema:
    """Each of `names` is there and not null."""
    return {"required": list(names), "properties": dict.fromkeys(names, NOT_NULL)}


def absent(*names: str) -> Schema:
    """Each of `names` is missing or null."""
    return {"properties": {name: {"type": "null"} for name in names}}


def non_empty(name: str) -> Schema:
    """`name` is a list with something in it."""
    return {"required": [name], "properties": {name: {"minItems": 1}}}


def exactly_one(names: Iterable[str]) -> Schema:
    """One of `names` given, the others absent (or null)."""
    listed = list(names)
    return {
        "oneOf": [
            {
                "required": [name],
                "properties": {other: NOT_NULL if other == name else {"type": "null"} for other in listed},
            }
            for name in listed
        ]
    }


def merged(*schemas: Schema) -> Schema:
    """Every one of `schemas`."""
    return schemas[0] if len(schemas) == 1 else {"allOf": list(schemas)}


_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # not 0000
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?"
_OFFSET = "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):?[0-5][0-9])"
# What msgspec decodes as a `datetime`: with an offset (`Meta(tz=True)`), or with one or none.
DATETIME_WITH_OFFSET = f"^{_DATE}[Tt ]{_TIME}{_OFFSET}$"
DATETIME = f"^{_DATE}[Tt ]{_TIME}{_OFFSET}?$"
