"""The JSON of a recommendation answer, byte for byte what encoding `wire.Recommendations` gives,
assembled from pieces encoded once per snapshot: an item's id, title and categories, a reason list.
Ten items cost about a third of building and encoding a ScoredItem per pick (tests compare the
bytes)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from gateway.api.wire import ScoredItem
from gateway.recommend.pipeline import Fallback, ProfileKind
from gateway.rules.document import Content
from gateway.rules.picks import Pick
from gateway.snapshot import Snapshot

_encoder = msgspec.json.Encoder()


class _EncodedRecommendations(msgspec.Struct, frozen=True, gc=False):
    """`wire.Recommendations` with its items already encoded."""

    request_id: str
    snapshot: str
    items: msgspec.Raw
    fallback: Fallback | None = None
    profile: ProfileKind = "none"
    segments: list[str] = []
    rules: list[str] = []
    content: list[Content] = []
    messages: list[msgspec.Raw] = []  # Delivered, as encoded when they fired
    experiments: Sequence[str] = ()


_NONE: list[str] = []
_NO_CONTENT: list[Content] = []
# Reason lists encoded once per snapshot; rules can combine reasons in many ways, so at most this many.
ENCODED_REASONS_MAX = 100_000


def encode_recommendations(
    snap: Snapshot,
    request_id: str,
    picks: Iterable[Pick],
    fallback: Fallback | None,
    profile: ProfileKind,
    *,
    segments: list[str] = _NONE,
    rules: list[str] = _NONE,
    content: list[Content] = _NO_CONTENT,
    messages: Iterable[bytes] = (),
    experiments: Sequence[str] = (),
) -> bytes:
    """The JSON of `wire.Recommendations(request_id, snap.version, [ScoredItem(...) per pick], ...)`,
    without building a ScoredItem per pick: what does not change between answers is encoded once
    per snapshot and reused."""
    fragments, reasons = snap.encoded_items, snap.encoded_reasons
    encode = _encoder.encode
    parts: list[bytes] = []
    for pick in picks:
        row, reason = pick.row, pick.reason
        head = fragments[row]
        if head is None:
            head = fragments[row] = _fragment(snap, row)
        tail = reasons.get(reason)
        if tail is None:
            listed = [reason] if isinstance(reason, str) else list(reason)
            tail = b',"reasons":' + encode(listed) + b"}"
            if len(reasons) < ENCODED_REASONS_MAX:
                reasons[reason] = tail
        parts.append(head + encode(pick.score) + tail)
    items = msgspec.Raw(b"[" + b",".join(parts) + b"]")
    shown = [msgspec.Raw(message) for message in messages]
    return encode(
        _EncodedRecommendations(
            request_id, snap.version, items, fallback, profile, segments, rules, content, shown, experiments
        )
    )


def _fragment(snap: Snapshot, row: int) -> bytes:
    """`{"id":...,"title":...,"categories":[...],"score":` of one item."""
    item = _encoder.encode(ScoredItem(snap.item_ids[row], snap.titles[row], snap.categories[row], 0.0, []))
    return item[: item.rindex(b'"score":') + 8]


PREPARE_ITEMS_MAX = 300_000


def prepare(snap: Snapshot) -> Snapshot:
    """Encode every item's fragment up front (call it in the thread that loads the snapshot), so no
    answer pays for a first encoding; catalogs over PREPARE_ITEMS_MAX items are encoded as served."""
    if len(snap.item_ids) <= PREPARE_ITEMS_MAX:
        snap.encoded_items[:] = [_fragment(snap, row) for row in range(len(snap.item_ids))]
    return snap
