"""The recommendation pipeline: profile -> candidates -> filters -> padding, with reasons.

Candidate pools (gateway.recommend.candidates: the best `pool_size` rows for one taste vector, already
without what the visitor has seen) are cached per snapshot: a known user's pool cannot change until
the next snapshot, and a live profile's pool is keyed by the profile itself, so visitors who clicked
the same things share it. A new visitor's pool is a few hundred candidates scored in one compiled
call, right on the event loop; a search of the whole catalog (no neighbour lists in the snapshot,
or a category filter that leaves too few) runs in a worker thread (numpy and Annoy release the
GIL), so the event loop only ever does dictionary work and filtering of a few hundred rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.recommend import kernels
from gateway.recommend.candidates import LRU, Candidates, LiveProfile, Offload, Pool
from gateway.recommend.popular import POPULAR, Popular
from gateway.rules import conditions
from gateway.rules.book import HEADROOM_MIN, Book
from gateway.rules.conditions import NO_CONTEXT, Context
from gateway.rules.decision import Outcome, Ruling
from gateway.rules.document import Content
from gateway.rules.picks import Pick, rounded
from gateway.snapshot import Rows, Snapshot, Vectors
from gateway.store import EMPTY_PROFILE, CounterKey, Interaction, Profile, Requirement
from gateway.store.guard import GuardedStore
from index_builder.model import recent_confidence

Fallback = Literal["cold-start", "no-consent", "stale-snapshot", "store-timeout", "store-unavailable"]
ProfileKind = Literal["snapshot", "live", "none"]

USER_VECTOR = "user-vector"
# Ruled answers remembered (Recommender._select): a few KB each, and objects the garbage collector
# walks, so few enough that its pauses stay short.
RULED_KEPT = 2_000
# Pools many visitors share, whose ruled answers are remembered (see Recommender._select).
SHARED_SOURCES = frozenset({"popular", "similar"})
# Up to this many items added since the build, merging them into a similar-items list is done on the
# event loop (a few hundred microseconds); past it, in a worker thread.
ADDED_INLINE = 2_000
# Added to each reason of an answer made without personalization consent.
NO_CONSENT = "no-consent:personalization"


class Answer(msgspec.Struct, frozen=True):
    """What the pipeline made for one request (a Struct: built once or twice per request, ten
    times faster than a frozen dataclass)."""

    picks: list[Pick]
    fallback: Fallback | None
    profile: ProfileKind
    segments: list[str] = msgspec.field(default_factory=list)
    rules: list[str] = msgspec.field(default_factory=list)  # "rule:<id>@<version>" of each rule that changed it
    content: list[Content] = msgspec.field(default_factory=list)
    fired: list[str] = msgspec.field(default_factory=list)  # every rule whose conditions held (for previews)
    messages: list[bytes] = msgspec.field(
        default_factory=list
    )  # fired triggers' (gateway.rules.triggers.Delivered JSON)
    read: Profile | None = None  # the profile it was made from; None when none was read (or the store failed)


def _blank(profile: Profile) -> bool:
    """Nothing a rule condition could read: no recent events, no counters, no last visit."""
    return not profile.recent and not profile.counters and profile.last_seen is None


class Recommender:
    """One snapshot's pipeline. A hot reload builds a new Recommender; its cache starts empty."""

    def __init__(
        self,
        snap: Snapshot,
        store: GuardedStore,
        *,
        offload: Offload[Pool],
        pool_size: int,
        cache_entries: int,
        recent_limit: int,
        max_age_s: float,
    ) -> None:
        self.snap = snap
        self.store = store
        self.candidates = Candidates(snap, pool_size=pool_size, cache_entries=cache_entries, offload=offload)
        self.recent_limit = recent_limit
        self.max_age_s = max_age_s
        # The active rules compiled for this snapshot, or None; replaced whole on every change.
        self.book: Book | None = None
        # What the rules made of a list, by plan and inputs: another request with the same ones gets
        # the same answer without going through the rules again (see _select).
        self._ruled_answers: LRU[list[Any]] = LRU(RULED_KEPT)
        # Per row, whether it may be served (None: every row may).
        self._serves: npt.NDArray[np.bool_] | None = None
        if snap.withheld:
            self._serves = np.ones(len(snap.item_ids), dtype=bool)
            self._serves[list(snap.withheld)] = False
        self.popular = Popular(snap, self._serves)

    def stale(self, now: float) -> bool:
        return self.max_age_s > 0 and self.snap.age(now) > self.max_age_s

    def rows_of(self, item_ids: Iterable[str]) -> set[int]:
        row_of = self.snap.row_of
        return {row_of[item] for item in item_ids if item in row_of}

    async def recommend(
        self,
        *,
        key: str | None,
        n: int,
        categories: Collection[str],
        exclude: Collection[str],
        user: str | None = None,
        requires: Requirement | None = None,
        now: float | None = None,
        context: Context = NO_CONTEXT,
        rules: Book | Literal["active"] | None = "active",
        inbox: Requirement | None = None,
        ranking: Literal["personal", "popular"] = "personal",
        recent_limit: int | None = None,
    ) -> Answer:
        """`key` names the visitor in the store (their pseudonym, see gateway.privacy.keys); `user`, a raw
        id the snapshot may know them by (its users are raw ids when built from a site's own logs,
        pseudonyms when built from the gateway's event log: both are looked up). With `requires`
        not permitted by the visitor's consent, nothing personal is read: popular items, each with
        NO_CONSENT among its reasons. The active rules (`self.book`) then see the profile and the
        request's `context`, and reshape the list. With `inbox`, the same store read takes the
        visitor's trigger messages (see Store.profile) into the answer's `messages`. `ranking`
        "popular" ranks popular items for everybody (an experiment's baseline arm); `recent_limit`
        overrides how many recent events are read and folded in."""
        now = time.time() if now is None else now
        book = self.book if rules == "active" else rules
        decide: Callable[[Profile | None], Ruling] | None = None
        if book is not None:
            active = book

            def decide(profile: Profile | None) -> Ruling:
                personal = profile is not None and not profile.withheld
                if profile is not None and personal and not _blank(profile):
                    return active.decide(self._facts(active, now, context, profile), "recommend", personal=True)
                return active.decide_blank(now, "recommend", context, personal=personal)

        answer, profile, ruling = await self._model_answer(
            key=key,
            user=user,
            n=n,
            categories=categories,
            exclude=exclude,
            requires=requires,
            now=now,
            counters=book.counter_query if book is not None and book.needs_counters else False,
            inbox=inbox,
            decide=decide,
            popular=ranking == "popular",
            limit=self.recent_limit if recent_limit is None else recent_limit,
        )
        if ruling is not None:
            answer = self._ruled(ruling, answer, n=n, categories=categories, exclude=exclude, profile=profile)
        if profile is not None and profile.messages:
            answer = msgspec.structs.replace(answer, messages=profile.messages)
        return answer

    async def _model_answer(
        self,
        *,
        key: str | None,
        n: int,
        categories: Collection[str],
        exclude: Collection[str],
        user: str | None,
        requires: Requirement | None,
        now: float,
        counters: bool | Sequence[CounterKey],
        inbox: Requirement | None = None,
        decide: Callable[[Profile | None], Ruling] | None = None,
        popular: bool = False,
        limit: int = 20,
    ) -> tuple[Answer, Profile | None, Ruling | None]:
        """The model's answer, the profile it was made from (None when none was read; withheld
        when consent did not permit), and what `decide` made of the profile: the rules, whose
        filters and boosts the candidates then go through."""
        excluded = self.rows_of(exclude)
        if self.stale(now) or key is None:
            ruling = decide(None) if decide else None
            picks = self._fallback(n=n, categories=categories, excluded=excluded, ruling=ruling)
            cause: Fallback = "stale-snapshot" if self.stale(now) else "cold-start"
            return Answer(picks, cause, "none"), None, ruling
        profile = await self.store.profile(key, limit=limit, now=now, counters=counters, requires=requires, inbox=inbox)
        if isinstance(profile, str):  # the store failed: its cause names the fallback
            ruling = decide(None) if decide else None
            picks = self._fallback(n=n, categories=categories, excluded=excluded, ruling=ruling)
            return Answer(picks, profile, "none"), None, ruling
        ruling = decide(profile) if decide else None
        if profile.withheld:
            picks = self._fallback(
                n=n, categories=categories, excluded=excluded, ruling=ruling, reason=(POPULAR, NO_CONSENT)
            )
            return Answer(picks, "no-consent", "none", read=profile), profile, ruling
        recent = profile.recent
        excluded |= self.rows_of(i.item for i in recent)
        user_rows = self.snap.user_row
        user_row = user_rows.get(user) if user is not None and not popular else None
        if user_row is None and not popular:
            user_row = user_rows.get(key)
        if user_row is not None:
            picks = await self._for_user(user_row, n=n, categories=categories, excluded=excluded, ruling=ruling)
            return Answer(picks, None, "snapshot", read=profile), profile, ruling
        live = None if popular else self.live_profile(recent)
        if live is None:  # nothing to go on, or popular items asked for (not a fallback then)
            picks = self._fallback(n=n, categories=categories, excluded=excluded, ruling=ruling)
            return Answer(picks, None if popular else "cold-start", "none", read=profile), profile, ruling
        picks = await self._for_live(live, n=n, categories=categories, excluded=excluded, ruling=ruling)
        return Answer(picks, None, "live", read=profile), profile, ruling

    def _facts(self, book: Book, now: float, context: Context, profile: Profile | None) -> conditions.Facts:
        """What rule conditions see: the request's context, and the profile if it may be used."""
        known = profile if profile is not None else EMPTY_PROFILE
        return conditions.facts(
            now,
            book.zone,
            counters=known.counters,
            recent=known.recent,
            last_seen=known.last_seen,
            device=context.device,
            country=context.country,
            referrer=context.referrer,
            page=context.page,
        )

    def _ruled(
        self,
        ruling: Ruling,
        answer: Answer,
        *,
        n: int,
        categories: Collection[str],
        exclude: Collection[str],
        profile: Profile | None = None,
    ) -> Answer:
        """`answer` (over-fetched) after the rules, with the visitor's segments."""
        plan = ruling.plan
        if plan is None:
            return Answer(answer.picks[:n], answer.fallback, answer.profile, ruling.segments, read=answer.read)
        memo = ruling.memo
        if memo is not None and memo[0] is answer.picks and memo[1] is not None:
            return self._outcome(ruling, answer, memo[1])
        refused = self.rows_of(exclude)
        if profile is not None:
            refused |= self.rows_of(i.item for i in profile.recent)
        wanted = frozenset(categories)
        category_sets = self.snap.category_sets

        def allowed(row: int) -> bool:
            return row not in refused and (not wanted or not wanted.isdisjoint(category_sets[row]))

        def reserve() -> Iterator[Pick]:
            return (pick for pick in self.popular.ranked(categories) if pick.row not in refused)

        outcome = ruling.apply(answer.picks, n=n, reserve=reserve, allowed=allowed)
        if memo is not None and memo[0] is answer.picks:
            memo[1] = outcome
        return self._outcome(ruling, answer, outcome)

    def _outcome(self, ruling: Ruling, answer: Answer, outcome: Outcome) -> Answer:
        assert ruling.plan is not None
        return Answer(
            outcome.picks,
            answer.fallback,
            answer.profile,
            ruling.segments,
            outcome.refs,
            outcome.content,
            ruling.plan.refs,
            read=answer.read,
        )

    def live_profile(self, recent: list[Interaction]) -> LiveProfile | None:
        """The distinct rows of a visitor's recent events that say something about taste, ascending,
        with their recency-weighted confidence: the fold-in's input, and the candidate cache's key."""
        row_of, weights = self.snap.row_of, self.snap.event_weights
        rows: list[int] = []
        values: list[float] = []
        for interaction in recent:
            row = row_of.get(interaction.item)
            weight = weights.get(interaction.event, 0.0)
            if row is not None and weight > 0:
                rows.append(row)
                values.append(weight)
        if not rows:
            return None
        distinct, confidence = recent_confidence(rows, values, self.snap.params)
        return tuple(distinct), tuple(confidence)

    def live_vector(self, live: LiveProfile) -> Vectors:
        snap = self.snap
        return kernels.fold_in(
            snap.item_vectors, snap.gram_inverse, np.array(live[0], dtype=np.int64), np.array(live[1], dtype=np.float64)
        )

    async def _for_user(
        self, row: int, *, n: int, categories: Collection[str], excluded: set[int], ruling: Ruling | None = None
    ) -> list[Pick]:
        snap, candidates = self.snap, self.candidates

        def compute(within: Rows | None = None) -> Pool:
            return candidates.top(snap.user_vectors[row], exclude=snap.seen(row), within=within)

        precomputed = snap.precomputed(row, candidates.pool_size)
        if precomputed is not None:
            pool = Pool(*precomputed)
        else:
            pool = await candidates.cached(("user", row), compute)
        return await self._choose(
            pool,
            ("user", row),
            compute,
            reason=USER_VECTOR,
            n=n,
            categories=categories,
            excluded=excluded,
            ruling=ruling,
        )

    async def _for_live(
        self,
        live: LiveProfile,
        *,
        n: int,
        categories: Collection[str],
        excluded: set[int],
        ruling: Ruling | None = None,
    ) -> list[Pick]:
        candidates = self.candidates

        def compute(within: Rows | None = None) -> Pool:
            if within is None and self.snap.neighbour_rows is not None:
                return candidates.around(live)
            rows = np.asarray(live[0], dtype=np.int64)  # distinct and ascending already
            return candidates.top(self.live_vector(live), exclude=rows, within=within)

        pool = await candidates.cached(("live", live), compute, bounded=self.snap.neighbour_rows is not None)
        return await self._choose(
            pool,
            ("live", live),
            compute,
            reason=USER_VECTOR,
            n=n,
            categories=categories,
            excluded=excluded,
            ruling=ruling,
        )

    async def similar(
        self,
        row: int,
        *,
        n: int,
        categories: Collection[str],
        exclude: Collection[str],
        now: float | None = None,
        context: Context = NO_CONTEXT,
    ) -> Answer:
        excluded = self.rows_of(exclude) | {row}
        if self.stale(time.time() if now is None else now):
            return Answer(self.popular.top(n=n, categories=categories, excluded=excluded), "stale-snapshot", "none")
        candidates = self.candidates

        def compute(within: Rows | None = None) -> Pool:
            return candidates.similar_top(row, within=within)

        snap = self.snap
        if snap.neighbour_rows is not None and snap.neighbour_scores is not None and row < snap.built_rows:
            scores = snap.neighbour_scores[row]
            keep = np.isfinite(scores)  # a catalog smaller than the list pads with -inf
            pool = Pool(snap.neighbour_rows[row][keep], scores[keep])
            if snap.built_rows < len(snap.item_ids):  # items added since the build join the build's list
                listed = pool
                pool = await candidates.cached(
                    ("similar", row),
                    lambda: candidates.with_added(
                        listed, snap.unit_vectors, snap.unit_vectors[row], np.array([row], dtype=np.int64)
                    ),
                    bounded=len(snap.item_ids) - snap.built_rows <= ADDED_INLINE,
                )
        else:
            pool = await candidates.cached(("similar", row), compute)
        reason = f"similar-to:{self.snap.item_ids[row]}"
        book = self.book
        ruling = None
        if book is not None:
            ruling = book.decide_blank(time.time() if now is None else now, "similar", context, personal=False)
        picks = await self._choose(
            pool,
            ("similar", row),
            compute,
            reason=reason,
            n=n,
            categories=categories,
            excluded=excluded,
            ruling=ruling,
        )
        answer = Answer(picks, None, "none")
        if ruling is None:
            return answer
        return self._ruled(ruling, answer, n=n, categories=categories, exclude=[*exclude, self.snap.item_ids[row]])

    def popular_answer(
        self, *, n: int, categories: Collection[str], exclude: Collection[str], context: Context = NO_CONTEXT
    ) -> Answer:
        book = self.book
        ruling = None
        if book is not None:
            ruling = book.decide_blank(time.time(), "popular", context, personal=False)
        picks = self._fallback(n=n, categories=categories, excluded=self.rows_of(exclude), ruling=ruling)
        answer = Answer(picks, None, "none")
        if ruling is None:
            return answer
        return self._ruled(ruling, answer, n=n, categories=categories, exclude=exclude)

    def _fallback(
        self,
        *,
        n: int,
        categories: Collection[str],
        excluded: set[int],
        ruling: Ruling | None,
        reason: str | tuple[str, ...] = POPULAR,
    ) -> list[Pick]:
        """Popular items for an answer without a taste vector, through the rules' filters and boosts."""
        if ruling is not None and ruling.plan is not None:
            pool = self.popular.pool(categories)
            source = ("popular", *sorted(categories))
            return self._select(pool, ruling, source, reason=reason, n=n, categories=(), excluded=excluded)
        picks = self.popular.top(n=n, categories=categories, excluded=excluded)
        return picks if reason == POPULAR else [Pick(pick.row, pick.score, reason) for pick in picks]

    async def _choose(
        self,
        pool: Pool,
        key: tuple[object, ...],
        compute: Callable[[Rows | None], Pool],
        *,
        reason: str,
        n: int,
        categories: Collection[str],
        excluded: set[int],
        ruling: Ruling | None = None,
    ) -> list[Pick]:
        """Filter the pool; if a category filter leaves too few, search within the categories;
        if still short, pad with popular items. With `ruling`, its filters and boosts go first, and
        padding is left to the rules (Ruling.apply), which filter what they pad with."""
        ruled = ruling if ruling is not None and ruling.plan is not None else None
        if ruled is not None:
            picks = self._select(pool, ruled, key, reason=reason, n=n, categories=categories, excluded=excluded)
        else:
            picks = self._filter(pool, reason=reason, n=n, categories=categories, excluded=excluded)
        if len(picks) < n and categories:
            within = self.category_rows(categories)
            narrow = await self.candidates.cached((*key, tuple(sorted(categories))), lambda: compute(within))
            if ruled is not None:
                narrowed = (*key, tuple(sorted(categories)))
                picks = self._select(narrow, ruled, narrowed, reason=reason, n=n, categories=(), excluded=excluded)
            else:
                picks = self._filter(narrow, reason=reason, n=n, categories=(), excluded=excluded)
        if ruling is not None and ruling.plan is not None:
            return picks
        if len(picks) < n:
            taken = excluded | {p.row for p in picks}
            picks += self.popular.top(n=n - len(picks), categories=categories, excluded=taken)
        return picks

    def _servable(self, pool: Pool, depth: int) -> Pool:
        """The first `depth` rows of `pool` that a route may serve (not Snapshot.withheld: retired,
        unavailable, out of stock), for the rules' selection. (`_filter` reads rows one by one and
        skips those rows as it goes.) Only that prefix is checked unless it holds a withheld row:
        the pools run to hundreds of rows, and a gather over all of them on every request cost
        more than the rest of the check."""
        serves = self._serves
        head = Pool(pool.rows[:depth], pool.scores[:depth])
        if serves is None:
            return head
        if np.count_nonzero(serves.take(head.rows)) == len(head.rows):  # count_nonzero: no Python-level wrapper
            return head
        keep = serves.take(pool.rows)
        return Pool(pool.rows[keep][:depth], pool.scores[keep][:depth])

    def _select(
        self,
        pool: Pool,
        ruling: Ruling,
        source: Hashable,
        *,
        reason: str | tuple[str, ...],
        n: int,
        categories: Collection[str],
        excluded: set[int],
    ) -> list[Pick]:
        """`_filter` with the rules' filters and boosts: the first candidates the request and the
        filters admit (as deep as the answer could need, and some), re-ranked by the boosts; n of
        them as picks (Ruling.select).

        `source` names the pool (("user", row), ("live", profile), ("popular", *categories), ...):
        with the plan and the other inputs it decides the answer. Where many visitors share the
        pool (SHARED_SOURCES: every cold visitor on the same page, everyone viewing one item), the
        picks, and later what Ruling.apply makes of them (Ruling.memo), are remembered for the next
        request like it. A personal pool's answer is not: the same visitor rarely comes back with
        the same plan before it is forgotten, so remembering it would only cost time and
        garbage-collector work."""
        plan = ruling.plan
        assert plan is not None
        memo_key = None
        if isinstance(source, tuple) and source and source[0] in SHARED_SOURCES:
            memo_key = (plan, source, reason, n, tuple(categories), frozenset(excluded))
            memo = self._ruled_answers.get(memo_key)
            if memo is not None and memo[1] is not None:
                ruling.memo = memo
                picks: list[Pick] = memo[0]
                return picks
        category_sets = self.snap.category_sets
        wanted = frozenset(categories)
        # as deep as the answer could need: a cap skips more than filters drop
        depth = (3 if plan.capping is not None else 1) * n + len(excluded) + HEADROOM_MIN
        if wanted:
            depth = 8 * n + len(excluded)
        head = self._servable(pool, depth)
        every = head.rows
        if excluded or wanted:
            listed = every.tolist()
            admitted = [
                i
                for i, row in enumerate(listed)
                if row not in excluded and (not wanted or not wanted.isdisjoint(category_sets[row]))
            ]
            kept = [admitted[at] for at in ruling.select(every[admitted], n)]
        else:  # a known user without recent events: every candidate is admitted
            kept = ruling.select(every, n)
        rows = every[kept].tolist()
        if ruling.reordered:  # Ruling.apply gives a re-ranked list rank scores: these are never shown
            picks = [Pick(row, 0.0, reason) for row in rows]
        else:
            rounded = head.scores[kept].astype(np.float64).round(6).tolist()
            picks = [Pick(row, score, reason) for row, score in zip(rows, rounded, strict=True)]
        if memo_key is not None:
            ruling.memo = [picks, None]
            self._ruled_answers.put(memo_key, ruling.memo)
        return picks

    def _filter(
        self, pool: Pool, *, reason: str, n: int, categories: Collection[str], excluded: set[int]
    ) -> list[Pick]:
        """The first n rows of `pool` that may be served (not Snapshot.withheld), are not
        `excluded` and are in one of `categories` (if any), as picks."""
        category_sets = self.snap.category_sets
        withheld = self.snap.withheld
        wanted = frozenset(categories)
        picks: list[Pick] = []
        # Without a category filter the answer lies within the first n + len(excluded) rows, so
        # only those are turned into Python objects; with one, the pool is read in growing slices.
        start, stop = 0, n + len(excluded) if not wanted else 4 * n
        while start < len(pool.rows):
            rows = pool.rows[start:stop].tolist()
            scores = pool.scores[start:stop].tolist()
            for row, score in zip(rows, scores, strict=True):
                if row in excluded or row in withheld or (wanted and wanted.isdisjoint(category_sets[row])):
                    continue
                picks.append(Pick(row, rounded(score), reason))
                if len(picks) == n:
                    return picks
            start, stop = stop, stop * 4
        return picks

    def unknown_categories(self, categories: Collection[str]) -> list[str]:
        return [c for c in categories if c not in self.snap.category_rows]

    def category_rows(self, categories: Collection[str]) -> Rows:
        parts = [self.snap.category_rows[c] for c in categories if c in self.snap.category_rows]
        if not parts:
            return np.empty(0, dtype=np.intp)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
