"""The rules of one request (`Ruling`): the plan that fires for it, and the model's candidates read
through that plan's filters, boosts and cap, best first (`select`), topped up from a reserve when
they leave too few (`fill`), with the plan's injections (`inject`) and pins (`pin`) placed; or all
of that in one compiled call (`place`). gateway.rules.book.Book decides the plan and, step by step
(Book.apply), takes these steps in order and attaches the plan's content.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gateway.recommend import kernels
from gateway.rules import placing
from gateway.rules.placing import Reason
from gateway.rules.plans import CompiledRule, Outcome, Pick, Plan, rank_scores, reasons_of, rounded

if TYPE_CHECKING:
    from gateway.rules.book import Book


@functools.cache
def _standing(size: int) -> npt.NDArray[np.float64]:
    """A list's rank-based standing before boosts: 1 for the first, falling evenly towards 0."""
    standing = 1.0 - np.arange(size, dtype=np.float64) / size
    standing.setflags(write=False)
    return standing


@dataclass(eq=False, slots=True)
class Ruling:
    """The rules of one request: the visitor's segments, the plan that fires (None: no rule), and
    what the plan's filters and boosts already did to the model's candidates (`rank`)."""

    book: Book
    segments: list[str]
    plan: Plan | None
    applied: dict[str, CompiledRule] = field(default_factory=dict)
    ranked: bool = False  # every candidate went through `order` (and `cap`, if the plan has one)
    reordered: bool = False
    # The recommender's remembered [selected picks, final outcome] for this plan and these inputs
    # (Recommender._select); the outcome is filled in by the first request that gets that far.
    memo: list[Any] | None = None

    def select(self, rows: list[int] | npt.NDArray[np.integer], n: int) -> list[int]:
        """The positions in `rows` (candidates the request admits, best first) of the at most n
        the plan keeps: without what its filters drop, re-ranked by its boosts, through its cap.
        Every candidate of an answer goes through here, so the answer is `ranked`. A plan with
        one drop array and one weight array (one group of each kind, or combined because it is
        used often) takes one compiled call (`compiled`); any other, one numpy operation per group
        and a plain loop for the cap (`in_numpy`). Both give the same answer (a property test
        compares them)."""
        plan = self.plan
        assert plan is not None
        self.ranked = True
        self.book.stepping(plan)
        if not len(rows):
            return []
        if (plan.drop is not None or not plan.filtering) and (plan.weight is not None or not plan.boosting):
            return self.compiled(plan, rows, n)  # one array per kind: the plan has one group of it, or is hot
        return self.in_numpy(plan, rows, n)

    def in_numpy(self, plan: Plan, rows: list[int] | npt.NDArray[np.integer], n: int) -> list[int]:
        """`select` with one numpy operation per group of the plan: for a plan whose groups' arrays
        are not combined (see Book.stepping)."""
        at = np.asarray(rows, dtype=np.intp)
        listed: list[int] = at.tolist()
        positions: npt.NDArray[np.intp] | None = None  # None: all of them, in order
        hit = plan.hits(at)
        # ndarray methods and count_nonzero: numpy's module-level wrappers cost 0.5-1 µs a call here
        if hit is not None and np.count_nonzero(hit):
            kept = (~hit).nonzero()[0]
            # The filters that changed the answer: those dropping a row ahead of the n-th kept.
            last = int(kept[n - 1]) if len(kept) >= n else len(rows)
            self._credit_drops(plan, at[:last][hit[:last]].tolist())
            positions, at = kept, at[kept]
        order = self._order(at)
        if order is not None:
            positions = order if positions is None else positions[order]
        return self._cap(listed, list(range(len(listed))) if positions is None else positions.tolist(), n)

    def compiled(self, plan: Plan, rows: list[int] | npt.NDArray[np.integer], n: int) -> list[int]:
        """`select` in one compiled call (gateway.recommend.kernels.select), for a plan with at most one drop
        array and one weight array."""
        rule = plan.cap
        keys, distinct, limit = self.book.capping(plan)
        codes = plan.drop_codes
        kept, dropped, bits, reordered, capped = kernels.select(
            np.array(rows, dtype=np.int64),
            n,
            drop=kernels.NO_DROP if plan.drop is None else plan.drop,
            weight=kernels.NO_WEIGHT if plan.weight is None else plan.weight,
            keys=keys,
            limit=limit,
            distinct=distinct,
            codes=kernels.NO_CODES if codes is None else codes,
        )
        if bits:  # the kernel named the filters (Plan.drop_codes)
            self.applied.update(plan.dropped_by_bits(bits))
        elif len(dropped) and codes is None:
            self._credit_drops(plan, dropped.tolist())
        if reordered:
            self.reordered = True
        if capped and rule is not None:
            self.applied[rule.ref] = rule
        positions: list[int] = kept.tolist()
        return positions

    def place(
        self,
        every: npt.NDArray[np.integer],
        scores: npt.NDArray[np.float32],
        n: int,
        *,
        reason: str | tuple[str, ...],
        refused: npt.NDArray[np.int64],
        reserve: Sequence[Pick],
        reserve_rows: npt.NDArray[np.int64],
    ) -> Outcome | None:
        """The whole answer the rules make of a model's candidates, in one compiled call
        (gateway.rules.placing.place): `every` (best first, `scores` theirs) without `refused`, through
        `select`, then what Book.apply does (fill from `reserve`, the ranked picks whose rows are
        `reserve_rows`; boosts named; injections, pins, attachments), for a request without a
        category filter (`allowed` is then "not refused"). Picks are made once, at the end. None
        when the book has no codes (more than 63 filter or boost actions; see gateway.rules.placing):
        then the steps run one by one. A property test compares the two."""
        plan = self.plan
        assert plan is not None
        view = plan.view
        if view is None:
            return None
        cap, codes = plan.cap, view.codes
        out = placing.place(every, refused, n, view, reserve_rows).tolist()
        m, c, dropped, injected, flags = out[: placing.OUT]
        reordered, changed = flags & placing.REORDERED, flags & placing.CHANGED
        self.ranked = True
        # The rules that changed the list, as a mask over their ranks (Book.applied_of).
        applied = plan.attach_mask
        if dropped:
            applied |= codes.dropped_by(dropped)
        if flags & placing.CAPPED and cap is not None:
            applied |= 1 << cap.rank
        if reordered:
            self.reordered = True
        start = placing.OUT + 3 * m
        sources = out[start : start + c]
        placed = out[placing.OUT : placing.OUT + m]
        # Re-ranked or placed into, every pick gets its rank's score (as Book.apply gives).
        final: list[Pick]
        if reordered and not changed:  # the usual case: re-ranked by boosts, then as chosen (m == c)
            # The kernel named each pick's boosts (bits): they join its reasons (Codes.tagged).
            final = []
            append, tags, tagged = final.append, codes.tags, codes.tagged
            for row, source, bits, score in zip(placed, sources, out[start + c :], rank_scores(m), strict=True):
                why = reason if source >= 0 else reserve[-1 - source].reason
                if bits:
                    ranks, why = tags.get((why, bits)) or tagged(why, bits)
                    applied |= ranks
                append(Pick(row, score, why))
        elif changed:  # an injection or a pin changed the list
            if reordered:  # every chosen pick's boosts changed the answer, placed or pushed out (as Book.apply)
                union = 0
                for bits in out[start + c :]:
                    union |= bits
                applied |= codes.boosted_by(union)[0]
            final, pinned = self._placed(plan, codes, out, start, reason=reason, reserve=reserve)
            applied |= pinned
        else:  # neither re-ranked nor placed into: the chosen, as they are, with their own scores
            reasons = [reason if source >= 0 else reserve[-1 - source].reason for source in sources]
            values = [rounded(scores.item(source)) if source >= 0 else reserve[-1 - source].score for source in sources]
            final = [Pick(row, score, why) for row, score, why in zip(placed, values, reasons, strict=True)]
        if injected:
            for k in range(len(plan.injects)):
                if injected >> k & 1:
                    applied |= 1 << plan.injects[k][0].rank
        book = self.book
        return Outcome(final, book.applied_of(applied), plan.content, book.by_ref)

    def _placed(
        self, plan: Plan, codes: placing.Codes, out: list[int], start: int, *, reason: Reason, reserve: Sequence[Pick]
    ) -> tuple[list[Pick], int]:
        """The picks of a list an injection or a pin changed, with their ranks' scores, and the
        ranks of the pins that landed as a mask: `out` is the kernel's answer over the plan's
        `codes` (see gateway.rules.placing.place), `start` where the chosen ones' sources begin; `reason`
        and `reserve` as for `place`."""
        m, c, first = out[0], out[1], placing.OUT
        sources, named = out[start : start + c], out[start + c :]
        tags, tagged = codes.tags, codes.tagged
        final: list[Pick] = []
        pinned = 0
        rows, bases, pins = out[first : first + m], out[first + m : first + 2 * m], out[first + 2 * m : start]
        for row, base, pin, score in zip(rows, bases, pins, rank_scores(m), strict=True):
            why: Reason
            if base >= 0:  # a chosen one: its reasons and the boosts the kernel named (bits)
                source, bits = sources[base], named[base]
                why = reason if source >= 0 else reserve[-1 - source].reason
                if bits:
                    why = (tags.get((why, bits)) or tagged(why, bits))[1]
            elif base == placing.NOTHING:
                why = ()
            else:
                why = plan.injects[-1 - base][0].ref
            if pin >= 0:
                rule = plan.pins[pin][0]
                why = (rule.ref,) if not why else (why, rule.ref) if isinstance(why, str) else (*why, rule.ref)
                pinned |= 1 << rule.rank
            final.append(Pick(row, score, why))
        return final, pinned

    def _credit_drops(self, plan: Plan, dropped: list[int]) -> None:
        """Count as applied the plan's filters that drop any of `dropped` (the rows dropped ahead
        of the n-th kept one: those filters changed the answer)."""
        for group in plan.filtering:
            self.applied.update(group.dropped_by(dropped))

    def _cap(self, rows: list[int], positions: list[int], n: int) -> list[int]:
        """The first n of `positions` the plan's cap admits."""
        rule = self.plan.cap if self.plan is not None else None
        if rule is None or rule.cap is None:
            return positions[:n]
        keys, distinct = self.book.cap_codes(rule.cap[1])
        limit, counts = rule.cap[0], [0] * distinct
        kept: list[int] = []
        capped = False
        # One plain loop: a known user's candidates crowd into few categories, so a cap of 3 skips
        # about two of every three it looks at (a generator per candidate cost as much again).
        for at in positions:
            if len(kept) >= n:
                break
            code = keys[rows[at]]
            if counts[code] >= limit:
                capped = True
                continue
            counts[code] += 1
            kept.append(at)
        if capped:
            self.applied[rule.ref] = rule
        return kept

    def fill(
        self,
        chosen: list[Pick],
        reserve: Iterable[Pick],
        n: int,
        *,
        taken: Container[int],
        passes: Callable[[int], bool],
    ) -> list[Pick]:
        """`chosen` and, up to n, the picks of `reserve` not `taken` that pass the filters and the
        plan's cap still admits."""
        room = n - len(chosen)
        if room <= 0:
            return chosen
        more: list[Pick] = []
        rule = self.plan.cap if self.plan is not None else None
        keys: list[int] | None = None
        if rule is not None and rule.cap is not None:
            keys, distinct = self.book.cap_codes(rule.cap[1])
            limit, counts = rule.cap[0], [0] * distinct
            for pick in chosen:
                counts[keys[pick.row]] += 1
        capped = False
        for pick in reserve:
            row = pick.row
            if row in taken or not passes(row):
                continue
            if keys is not None:
                code = keys[row]
                if counts[code] >= limit:
                    capped = True
                    continue
                counts[code] += 1
            more.append(pick)
            if len(more) >= room:
                break
        if capped and rule is not None:
            self.applied[rule.ref] = rule
        return chosen + more

    def inject(self, picks: list[Pick], n: int, allowed: Callable[[int], bool]) -> list[Pick]:
        """`picks` with the plan's injections placed, lowest priority first (a higher one placed
        later lands exactly where it asks): the items the list does not show yet among its first n
        that the filters pass and the request `allowed`, at the injection's position (without
        one, at the end of the first n)."""
        plan = self.plan
        assert plan is not None
        passes, result = plan.passes, picks
        for rule, rows, at in plan.injects:
            shown = {p.row for p in result[:n]}
            place = [row for row in dict.fromkeys(rows) if row not in shown and passes(row) and allowed(row)]
            if not place:
                continue
            kept = [p for p in result if p.row not in place]
            start = min(max(n - len(place), 0) if at is None else at, len(kept))
            result = kept[:start] + [Pick(row, 0.0, rule.ref) for row in place] + kept[start:]
            self.applied[rule.ref] = rule
        return result

    def pin(self, picks: list[Pick], n: int, allowed: Callable[[int], bool]) -> list[Pick]:
        """`picks` with the plan's pins placed, highest priority first (it takes the slot, and the
        item): a pinned item keeps its reasons and gains the pin's."""
        plan = self.plan
        assert plan is not None
        passes, applied = plan.passes, self.applied
        slots: dict[int, tuple[int, CompiledRule]] = {}
        pinned_rows: set[int] = set()
        for rule, row, at in plan.pins:
            if at >= n or at in slots or row in pinned_rows or not passes(row) or not allowed(row):
                continue
            slots[at] = (row, rule)
            pinned_rows.add(row)
        if not slots:
            return picks
        by_row = {p.row: p for p in picks}
        rest: Iterator[Pick] = (p for p in picks if p.row not in pinned_rows)
        result: list[Pick] = []
        for index in range(max(n, len(picks))):
            if index in slots:
                row, rule = slots[index]
                held = by_row.get(row)
                reasons = (*reasons_of(held), rule.ref) if held is not None else (rule.ref,)
                result.append(Pick(row, 0.0, reasons))
                applied[rule.ref] = rule
            else:
                following = next(rest, None)
                if following is None:
                    break
                result.append(following)
        # A pin below the end of a short list still lands, at the end (and changed the list as well).
        for at, (row, rule) in sorted(slots.items()):
            if at >= len(result):
                result.append(Pick(row, 0.0, (rule.ref,)))
                applied[rule.ref] = rule
        return result

    def _order(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.intp] | None:
        """The positions of `rows` (best first) re-ranked by the plan's boosts; None when no boost
        holds for any of them."""
        plan = self.plan
        if plan is None or not plan.boosting or not len(rows):
            return None
        factors = plan.factors(rows)
        if not np.count_nonzero(factors != 1.0):
            return None
        self.reordered = True
        # A stable sort keeps equal standings in their order.
        order: npt.NDArray[np.intp] = (-(_standing(len(rows)) * factors)).argsort(kind="stable")
        return order
