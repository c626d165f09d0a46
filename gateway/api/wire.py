"""Every request and response the gateway speaks, declared once as msgspec Structs.

These types validate input at the edge (a failed conversion becomes a 4xx with a machine-readable
body) and are the single source of the OpenAPI document (`gateway.api.openapi`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway import crossfield
from gateway.recommend.pipeline import Fallback, ProfileKind
from gateway.rules.document import Content, RuleSet
from gateway.rules.triggers import Delivered
from gateway.store.base import Consent, ConsentState, LogLine
from gateway.store.documents import Activation

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256, description="An item, user or visitor id.")]
UserId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=256, description="A signed-in user's id (as in your interaction logs).")
]
VisitorId = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=256, description="An anonymous visitor's id (e.g. a first-party cookie)."),
]
Text = Annotated[str, msgspec.Meta(max_length=2048)]
# A value of a list parameter: a comma separates values, so none can contain one.
ListedId = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^,]+$")]
# A bound that is a gateway setting: gateway.api.openapi writes `{keyword: <the setting's value>}` in
# its place, so the document states the limit this gateway enforces.
BOUND = "x-tailor-bound"


def bounded_by(keyword: str, setting: str) -> dict[str, object]:
    return {BOUND: {keyword: setting}}


Count = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        description="How many items to return: at most the gateway's `max_n`.",
        extra_json_schema=bounded_by("maximum", "max_n"),
    ),
]
Categories = Annotated[
    list[ListedId],
    msgspec.Meta(
        max_length=50,
        description="Only items in any of these categories (a parent such as `fashion` covers "
        "`fashion/shoes`). Repeat the parameter or separate with commas.",
    ),
]
Excluded = Annotated[
    list[ListedId],
    msgspec.Meta(max_length=500, description="Item ids never to return. Repeat or separate with commas."),
]


VisitorToken = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=1024,
        description="The visitor's token (POST /v1/token, or your backend's `tailor token`); also accepted "
        "as the X-Tailor-Token header. With API keys configured, a public key must name a visitor by token.",
    ),
]


class RecommendQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Query of `GET /v1/recommend`."""

    # Parameters cannot state "not both" in the document: the descriptions say it.
    user: (
        Annotated[
            UserId, msgspec.Meta(description="A signed-in user's id (as in your interaction logs); not with `visitor`.")
        ]
        | None
    ) = None
    visitor: (
        Annotated[
            VisitorId,
            msgspec.Meta(description="An anonymous visitor's id (e.g. a first-party cookie); not with `user`."),
        ]
        | None
    ) = None
    token: VisitorToken | None = None
    n: Count | None = None
    category: Categories = []
    exclude: Excluded = []
    page: Text | None = None
    device: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    referrer: Text | None = None
    country: (
        Annotated[
            str, msgspec.Meta(pattern=r"^[A-Za-z]{2}$", description="ISO 3166 code, for rules (default: CF-IPCountry).")
        ]
        | None
    ) = None


class SimilarQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Query of `GET /v1/items/{item_id}/similar`."""

    n: Count | None = None
    category: Categories = []
    exclude: Excluded = []


class PopularQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Query of `GET /v1/popular`."""

    n: Count | None = None
    category: Categories = []
    exclude: Excluded = []


class ScoredItem(msgspec.Struct, frozen=True, gc=False):
    # Field order is the order on the wire, which `encode_recommendations` reproduces.
    id: str
    title: str
    categories: list[str]
    score: Annotated[float, msgspec.Meta(description="Higher is better; comparable within one response.")]
    reasons: Annotated[
        list[str],
        msgspec.Meta(
            description="What produced this pick: `user-vector` (the visitor's taste vector), "
            "`similar-to:<item>`, `popular`, `popular-in:<category>`; `no-consent:personalization` when "
            "the visitor's consent kept the answer non-personal."
        ),
    ]


class Recommendations(msgspec.Struct, frozen=True, gc=False):
    """An answer. (gc=False here and on ScoredItem: a thousand answers a second are short-lived
    objects that can never form a cycle, so the cycle collector has no reason to track them.)"""

    request_id: str
    snapshot: Annotated[str, msgspec.Meta(description="Version of the snapshot that answered.")]
    items: list[ScoredItem]
    fallback: Annotated[
        Fallback | None,
        msgspec.Meta(
            description="Why popular items stood in for personal ones: `cold-start` (nothing known of the "
            "visitor yet), `no-consent` (the visitor has not allowed personalization; each item's reasons "
            "say `no-consent:personalization` too), `stale-snapshot` (older than max_snapshot_age_s), "
            "`store-timeout`, `store-unavailable`. Null when the answer is the intended one."
        ),
    ] = None
    profile: Annotated[
        ProfileKind,
        msgspec.Meta(
            description="Whose taste vector ranked the items: `snapshot` (a user known to the build), "
            "`live` (folded in from the visitor's recent events), `none`."
        ),
    ] = "none"
    segments: Annotated[
        list[str],
        msgspec.Meta(
            description="The visitor's segments while a rule set is active: its predicate segments and the "
            "snapshot's model segment (`model:<k>`)."
        ),
    ] = []
    rules: Annotated[
        list[str],
        msgspec.Meta(description="`rule:<id>@<version>` of every rule that changed this answer, by priority."),
    ] = []
    content: Annotated[
        list[Content], msgspec.Meta(description="What rules attached (banners, offers), one per slot.")
    ] = []
    messages: Annotated[
        list[Delivered],
        msgspec.Meta(
            description="Messages of triggers that fired for the visitor since their last recommendation (each "
            "shown once; also pushed on WS /v1/stream), with the visitor's marketing consent."
        ),
    ] = []
    experiments: Annotated[
        list[str],
        msgspec.Meta(
            description="`experiment:<id>@<phase>:<arm>` of every experiment the visitor is in (each item's "
            "reasons end with them too)."
        ),
    ] = []


class StreamQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Query of `WS /v1/stream`."""

    token: Annotated[
        str, msgspec.Meta(min_length=1, max_length=1024, description="From POST /v1/token or your backend.")
    ]
    n: Count | None = None
    category: Categories = []


class TokenRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Optional body of `POST /v1/token`: renew a token (the same visitor), even one expired less
    than `token_renew_s` ago, or (the site's backend, with an admin key) mint one for a user or
    visitor it names. Without a body the answer is a new anonymous visitor."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    visitor: VisitorId | None = None  # mint a token for this id (admin key; or no keys configured)


# What the handlers refuse across fields, for the OpenAPI document (gateway.crossfield). Not stated:
# PUT /v1/consent's `token` or `visitor` (the token may come in the X-Tailor-Token header instead).
STATED: dict[type[msgspec.Struct], crossfield.Schema] = {
    TokenRequest: {"anyOf": [crossfield.absent("token"), crossfield.absent("visitor")]},  # not both
}


class StreamToken(msgspec.Struct, frozen=True):
    """A new anonymous visitor id and a token to open `WS /v1/stream` as that visitor."""

    visitor: Annotated[str, msgspec.Meta(description="Use this id in the visitor's events and recommendation calls.")]
    token: str
    expires_at: Annotated[int, msgspec.Meta(description="Unix seconds; ask for a new token before then.")]


EventType = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9_.:-]*$",
        description="view, click, add_to_cart, remove_from_cart, purchase, search, or a custom type the "
        "gateway's `custom_events` setting declares.",
    ),
]
Timestamp = Annotated[
    float | str,
    msgspec.Meta(
        description="When it happened: Unix seconds, Unix milliseconds (as `Date.now()` gives, any number "
        "above 1e11), or ISO 8601 (`2026-11-22T09:30:00Z`; without an offset it is UTC). Default: when "
        "received. Refused before 2000-01-01T00:00:00Z (`ts-too-old`) and more than 5 minutes ahead of the "
        "gateway's clock (`ts-in-future`)."
    ),
]


class EventIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One behaviour event. Give `user` for a signed-in user, else `visitor`."""

    event: EventType
    item: Id | None = None  # required except for `search` and custom types
    user: Id | None = None
    visitor: Id | None = None
    id: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="Your id for this event (e.g. a UUID): an id the visitor sent before is counted once, "
                "so a retried request is harmless.",
            ),
        ]
        | None
    ) = None
    ts: Timestamp | None = None
    query: Text | None = None
    value: float | None = None  # price, rating or amount, if any
    request_id: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=128,
                description="On a click on a recommended item: the `request_id` of the answer that showed it. "
                "Experiments count such clicks as the `click` conversion of the arm that served the visitor.",
            ),
        ]
        | None
    ) = None


class EventBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of `POST /v1/events`: this, a bare JSON array of events, or one event object."""

    events: Annotated[
        list[EventIn],
        msgspec.Meta(
            min_length=1,
            description="At most the gateway's `max_events_per_batch` (413 `batch-too-large` beyond).",
            extra_json_schema=bounded_by("maxItems", "max_events_per_batch"),
        ),
    ]
    token: VisitorToken | None = None


class Rejected(msgspec.Struct, frozen=True, omit_defaults=True):
    index: Annotated[int, msgspec.Meta(description="Position of the event in the batch.")]
    code: Annotated[
        str,
        msgspec.Meta(
            description="invalid-event, unknown-event, missing-item, ts-too-old, ts-in-future, not-your-visitor"
        ),
    ]
    message: str
    field: str | None = None


class EventsAccepted(msgspec.Struct, frozen=True):
    """What happened to a batch: valid events are kept even when others are rejected."""

    accepted: Annotated[int, msgspec.Meta(description="Events stored now.")]
    duplicates: Annotated[int, msgspec.Meta(description="Events whose `id` was stored before; not counted again.")] = 0
    rejected: list[Rejected] = []
    unconsented: Annotated[
        int,
        msgspec.Meta(
            description="Valid events not stored because their visitor has not allowed analytics "
            "(consent_mode); counted only in aggregate."
        ),
    ] = 0


class ErasureReceipt(msgspec.Struct, frozen=True):
    """What `DELETE /v1/visitors/{visitor_id}` removed, as proof for the visitor's request."""

    receipt: Annotated[str, msgspec.Meta(description="Unique id of this erasure, for your records.")]
    visitor: str
    erased_at: Annotated[float, msgspec.Meta(description="Unix seconds.")]
    profile: Annotated[bool, msgspec.Meta(description="Whether any profile state existed.")]
    log_events: Annotated[int, msgspec.Meta(description="The visitor's events removed from the event log.")]
    streams_closed: Annotated[int, msgspec.Meta(description="Open WebSockets of the visitor closed (4410).")]


class ExportedInteraction(msgspec.Struct, frozen=True):
    item: str
    event: str
    ts: float


class VisitorExport(msgspec.Struct, frozen=True):
    """Everything stored about one visitor (`GET /v1/visitors/{visitor_id}/export`)."""

    visitor: str
    exported_at: float
    recent: list[ExportedInteraction]
    counters: dict[str, int]
    last_seen: float | None
    events: Annotated[list[LogLine], msgspec.Meta(description="The visitor's events in the event log.")]
    pseudonym: Annotated[str, msgspec.Meta(description="The name the store and the event log know the visitor by.")]
    consent: dict[str, Consent] = {}
    messages: Annotated[
        list[Delivered], msgspec.Meta(description="Trigger messages recorded for the visitor and not shown yet.")
    ] = []
    pending_triggers: Annotated[
        dict[str, float], msgspec.Meta(description="Trigger id -> when its pending timer is due (Unix seconds).")
    ] = {}
    fired_triggers: Annotated[
        dict[str, float], msgspec.Meta(description="Trigger id -> until when it does not fire again (Unix seconds).")
    ] = {}
    experiments: Annotated[
        dict[str, str], msgspec.Meta(description="`<experiment>@<phase>` -> the arm the visitor was served.")
    ] = {}


Purpose = Literal["analytics", "personalization", "marketing"]


class ConsentUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of `PUT /v1/consent`: the visitor's choices, for the visitor their token names, or (the
    site's backend, with an admin key) for the visitor it names."""

    choices: Annotated[
        dict[Purpose, ConsentState],
        msgspec.Meta(min_length=1, description="granted, denied or revoked, per purpose; others keep theirs."),
    ]
    token: VisitorToken | None = None
    visitor: VisitorId | None = None  # with an admin key, instead of a token
    expires_at: (
        Annotated[float, msgspec.Meta(gt=0, description="Unix seconds after which these choices count as not granted.")]
        | None
    ) = None
    source: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=64,
                description="Who recorded it, for the audit log (admin key only; a token's choice is `visitor`).",
            ),
        ]
        | None
    ) = None


class ConsentQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Query of `GET /v1/consent`: a token, or with an admin key a visitor id."""

    token: VisitorToken | None = None
    visitor: (
        Annotated[
            VisitorId, msgspec.Meta(description="With an admin key, the visitor instead of a `token` (one is needed).")
        ]
        | None
    ) = None


class PurposeConsent(msgspec.Struct, frozen=True, omit_defaults=True):
    allowed: Annotated[bool, msgspec.Meta(description="Whether the gateway may use it now (mode, choice, expiry).")]
    state: ConsentState | None = None
    at: float | None = None
    source: str | None = None
    expires_at: float | None = None


class ConsentView(msgspec.Struct, frozen=True):
    """A visitor's consent, per purpose, as the gateway applies it."""

    visitor: str
    mode: Literal["opt-in", "opt-out"]
    purposes: dict[str, PurposeConsent]


class ErrorDetail(msgspec.Struct, frozen=True, omit_defaults=True):
    code: Annotated[
        str,
        msgspec.Meta(
            description="Machine-readable: invalid-parameter, unknown-parameter, unknown-category, invalid-body, "
            "invalid-events, unsupported-media-type, body-too-large, batch-too-large, unknown-item, not-found, "
            "method-not-allowed, store-unavailable, no-snapshot, snapshot-refused, invalid-rules, "
            "invalid-experiments, nothing-to-roll-back, internal."
        ),
    ]
    message: str
    field: str | None = None
    problems: list[str] | None = None
    rule: Annotated[str | None, msgspec.Meta(description="The rule or segment an invalid rule set is wrong in.")] = None
    experiment: Annotated[
        str | None, msgspec.Meta(description="The experiment an invalid experiment plan is wrong in.")
    ] = None
    stored: Annotated[
        list[int] | None,
        msgspec.Meta(
            description="store-unavailable on `POST /v1/events`: the positions in the batch of the events that are "
            "stored (now, or before with the same id); a retry of the batch with the same event ids stores the rest."
        ),
    ] = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct, frozen=True):
    ready: bool
    snapshot: str | None
    snapshot_age_s: float | None
    stale: bool
    store: Literal["ok", "unreachable"]
    problems: list[str]


class ReloadResult(msgspec.Struct, frozen=True):
    changed: bool
    version: str
    previous: str | None


# -- rules administration ---------------------------------------------------------------------------
class RulesStored(msgspec.Struct, frozen=True):
    """A rule set stored as a new version."""

    version: int
    sha256: str
    created_at: float
    active: Annotated[bool, msgspec.Meta(description="Whether this version is now the active one.")]
    rules: int
    segments: int


class DocumentVersion(msgspec.Struct, frozen=True, omit_defaults=True):
    """One stored version of a rule set or an experiment plan."""

    version: int
    created_at: float
    sha256: str
    size: int
    note: str = ""
    active: bool = False


class RulesOverview(msgspec.Struct, frozen=True):
    active: Annotated[int | None, msgspec.Meta(description="The version every node serves (null: none).")]
    serving: Annotated[int | None, msgspec.Meta(description="The version this node serves right now.")]
    flags: Annotated[dict[str, bool], msgspec.Meta(description="Rules switched on or off at runtime, by id.")]
    versions: list[DocumentVersion]
    activations: list[Activation]
    problem: str | None = None
    warnings: list[str] = []


class RulesQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    activate: Annotated[bool, msgspec.Meta(description="Make the stored version active at once.")] = False
    note: Annotated[str, msgspec.Meta(max_length=500, description="Why this version (kept in the history).")] = ""


class FlagUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: Annotated[
        bool | None, msgspec.Meta(description="On or off for every node; null returns to the rule's own `enabled`.")
    ]


class PreviewContext(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2}$")] | None = None
    referrer: Text | None = None
    page: Text | None = None
    at: (
        Annotated[
            float, msgspec.Meta(ge=0, le=253_370_764_800, description="Evaluate at this Unix time (default: now).")
        ]
        | None
    ) = None


class PreviewRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    visitors: Annotated[list[VisitorId], msgspec.Meta(min_length=1, max_length=100)]
    rules: Annotated[RuleSet, msgspec.Meta(description="The candidate rule set (not stored).")]
    n: Count | None = None
    category: Categories = []
    context: PreviewContext = PreviewContext()


class PreviewList(msgspec.Struct, frozen=True):
    items: list[ScoredItem]
    fallback: Fallback | None
    segments: list[str]
    rules: Annotated[list[str], msgspec.Meta(description="Rules that changed this list.")]
    fired: Annotated[list[str], msgspec.Meta(description="Rules whose conditions held (changed it or not).")]
    content: list[Content]


class PreviewVisitor(msgspec.Struct, frozen=True):
    visitor: str
    without: Annotated[PreviewList, msgspec.Meta(description="As served now (the active rule set, if any).")]
    with_: Annotated[PreviewList, msgspec.Meta(description="With the candidate rule set instead.")] = msgspec.field(
        name="with"
    )


class Preview(msgspec.Struct, frozen=True):
    snapshot: str
    active: int | None
    visitors: list[PreviewVisitor]
