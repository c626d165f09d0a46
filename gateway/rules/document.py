"""A rule set: the JSON document merchandisers write (rules, predicate segments, triggers), its
declared types, and parsing with errors that name the rule and the field.

A rule has a condition on the visitor and the request (`when`, see gateway.rules.conditions), a priority,
an optional validity window, an enabled flag, the surfaces it applies to, and actions:

    filter   drop the items that match (`items`: ids, categories, tags, price range, stock,
             other attributes)
    boost    multiply the standing of matching items by `weight` (below 1 buries them)
    pin      put one item at a 1-based position
    inject   bring specific items into the list (at a position, or in the last place)
    cap      at most `per_category` items of one category (its first category, `depth` levels deep)
    attach   add content (a banner, an offer) to the answer, in a named slot

How they combine is gateway.rules.decision's business.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from gateway import crossfield
from gateway.rules.conditions import Condition, Counter, Name, Recency, Slug, entry_id
from gateway.rules.segments import SegmentDefinition
from gateway.rules.triggers import Trigger

Surface = Literal["recommend", "similar", "popular"]
SURFACES: tuple[Surface, ...] = ("recommend", "similar", "popular")
Position = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Moment = Annotated[
    datetime,
    msgspec.Meta(
        description="RFC 3339; without an offset, in the rule set's time zone.",
        extra_json_schema={"pattern": crossfield.DATETIME},
    ),
]


Value = Annotated[str, msgspec.Meta(max_length=1000)] | int | float | bool


class ItemMatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Items with every attribute given (a list: any of its values). Categories match their
    subcategories too; an item of unknown price or stock matches no price or stock condition.
    `attributes` names the catalog's other attributes (`{"brand": ["acme"], "organic": [true]}`):
    an item matches when each named attribute has one of the values listed."""

    ids: list[Name] = []
    categories: list[Name] = []
    tags: list[Name] = []
    price_at_least: Annotated[float, msgspec.Meta(ge=0)] | None = None
    price_at_most: Annotated[float, msgspec.Meta(ge=0)] | None = None
    in_stock: bool | None = None
    attributes: Annotated[
        dict[Name, Annotated[list[Value], msgspec.Meta(min_length=1, max_length=100)]], msgspec.Meta(max_length=20)
    ] = {}

    def __post_init__(self) -> None:
        given = (
            self.ids,
            self.categories,
            self.tags,
            self.price_at_least,
            self.price_at_most,
            self.in_stock,
            self.attributes or None,
        )
        if all(value is None or value == [] for value in given):
            raise ValueError("an item match needs at least one of ids, categories, tags, price_*, in_stock, attributes")


class Filter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="filter", tag_field="type"):
    items: ItemMatch


class Boost(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="boost", tag_field="type"):
    items: ItemMatch
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000, description="Above 1 boosts, below 1 buries.")]


class Pin(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="pin", tag_field="type"):
    item: Name
    position: Position


class Inject(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="inject", tag_field="type"):
    items: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=50)]
    position: Position | None = None  # None: the last places of the list


class Cap(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cap", tag_field="type"):
    per_category: Annotated[int, msgspec.Meta(ge=1)]
    depth: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1  # 1: "books" for "books/fiction"


class Attach(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="attach", tag_field="type"):
    slot: Slug
    content: dict[str, Any]


Action = Filter | Boost | Pin | Inject | Cap | Attach


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: Slug
    actions: Annotated[list[Action], msgspec.Meta(min_length=1, max_length=20)]
    when: Condition | None = None  # None: always
    priority: Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000)] = 0
    enabled: bool = True
    valid_from: Moment | None = None  # without an offset: in the rule set's time zone
    valid_until: Moment | None = None
    surfaces: Annotated[list[Surface], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(SURFACES)
    )
    description: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


class RuleSet(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    timezone: Annotated[str, msgspec.Meta(max_length=64)] = "UTC"
    segments: Annotated[list[SegmentDefinition], msgspec.Meta(max_length=200)] = []
    rules: Annotated[list[Rule], msgspec.Meta(max_length=2000)] = []
    triggers: Annotated[list[Trigger], msgspec.Meta(max_length=200)] = []


# What the types' checks refuse across fields, for the OpenAPI document (gateway.crossfield). The
# conditions' are here rather than beside them: the document is this module's business.
STATED: dict[type[msgspec.Struct], crossfield.Schema] = {
    Condition: crossfield.exactly_one(f.encode_name for f in msgspec.structs.fields(Condition)),
    Counter: crossfield.merged(
        {"anyOf": [crossfield.given("at_least"), crossfield.given("at_most")]},
        {"anyOf": [crossfield.absent("item"), crossfield.absent("category")]},
    ),
    Recency: crossfield.exactly_one(["within", "not_within"]),
    ItemMatch: {
        "anyOf": [
            *(crossfield.non_empty(name) for name in ("ids", "categories", "tags")),
            *(crossfield.given(name) for name in ("price_at_least", "price_at_most", "in_stock")),
        ]
    },
}


class RuleSetError(ValueError):
    """An invalid rule set; `field` is a path like `rules[3].actions[0].weight`, `rule` the id of the
    rule (or segment) it is in."""

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


def parse(body: bytes) -> RuleSet:
    """The rule set in a JSON body; RuleSetError naming the rule and the field when invalid."""
    try:
        return msgspec.json.decode(body, type=RuleSet)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$.")
        path = at.rstrip("`") or None
        rule = entry_id(body, path)
        kind = next((k for k in ("segment", "trigger") if path and path.startswith(k)), "rule")
        where = f"{kind} {rule!r}: " if rule else ""
        raise RuleSetError(f"{where}{message}" + (f" (at {path})" if path else ""), field=path, rule=rule) from None
    except msgspec.DecodeError as exc:
        raise RuleSetError(f"not JSON: {exc}") from None


class Content(msgspec.Struct, frozen=True):
    slot: str
    rule: str
    content: dict[str, Any]
