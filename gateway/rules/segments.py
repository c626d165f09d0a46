"""Segments: named groups of visitors, evaluated inline on every request.

Predicate segments are conditions (gateway.rules.conditions) in the rule set, e.g. "frequent-buyers":
at least 3 purchases in 30 days. Model segments come with the snapshot: the index builder clusters
known users on behavioural features (index_builder.segments) and the gateway puts each visitor in
the nearest cluster from their live profile, as `model:<k>`. Both are listed in the answer and can
be referred to by rules and by later segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from gateway.rules.conditions import Compiler, Condition, Facts, Name, Predicate, Slug

if TYPE_CHECKING:
    from index_builder.segments import SegmentModel

MODEL_PREFIX = "model:"


class SegmentDefinition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: Slug
    when: Condition
    description: Name | None = None


class Segmenter:
    """Puts a visitor into segments: the model's first (predicates may refer to it), then each
    predicate segment in the order defined (one may refer to those before it)."""

    def __init__(
        self, definitions: Sequence[SegmentDefinition], compiler: Compiler, model: SegmentModel | None = None
    ) -> None:
        self.predicates: list[tuple[str, Predicate]] = [(d.id, compiler.compile(d.when)) for d in definitions]
        self.model = model
        # A visitor with no counters and no last visit always lands in the same model segment.
        self._nobody = model.assign({}, None, 0.0) if model is not None else None

    def assign(self, facts: Facts, *, personal: bool) -> list[str]:
        """The visitor's segments, also left in `facts.segments` for the rules. Without `personal`
        (no consent, or no profile read) the model is not asked: it would only see an empty profile."""
        found = facts.segments
        if personal and self.model is not None:
            if self._nobody is not None and not facts.counters and facts.last_seen is None:
                found.add(self._nobody)
            else:
                found.add(self.model.assign(facts.counters, facts.last_seen, facts.now))
        for name, predicate in self.predicates:
            if predicate(facts):
                found.add(name)
        return sorted(found)
