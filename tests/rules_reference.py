"""What a plan makes of a list, spelled out one row at a time from the rule documents: the definition
the vectorised selection over action bits (gateway.rules.decision.Ruling) is compared with."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.rules.book import Book
from gateway.rules.decision import CompiledRule, Plan
from gateway.rules.document import Boost, Content, Filter
from gateway.rules.picks import Pick, reasons_of


@dataclass
class Answer:
    picks: list[Pick]
    refs: list[str]  # the rules that changed the list, by priority
    content: list[Content]
    reordered: bool


def answer(
    book: Book,
    plan: Plan,
    picks: Sequence[Pick],
    *,
    n: int,
    reserve: Iterable[Pick] = (),
    allowed: Callable[[int], bool] = lambda row: True,
) -> Answer:
    """The n picks the plan makes of `picks` (best first): filter, boost, cap, top up from
    `reserve`, name the boosts, inject, pin, score (see gateway.rules.decision's docstring)."""
    rules = plan.rules
    filters = [(c, book.mask(a.items)) for c in rules for a in c.rule.actions if isinstance(a, Filter)]
    boosts = [
        (c, book.mask(a.items), np.float32(a.weight)) for c in rules for a in c.rule.actions if isinstance(a, Boost)
    ]
    cap = next((c for c in rules if c.cap is not None), None)
    applied: dict[str, CompiledRule] = {}

    def passes(row: int) -> bool:
        return not any(mask[row] for _, mask in filters)

    def weight(row: int) -> np.float32:
        product = np.float32(1.0)
        for _, mask, factor in boosts:
            if mask[row]:
                product = np.float32(product * factor)
        return product

    counts: Counter[str] = Counter()

    def admits(row: int) -> bool:
        if cap is None or cap.cap is None:
            return True
        categories = book.snap.categories[row]
        key = "/".join(categories[0].split("/")[: cap.cap[1]]) if categories else ""
        if counts[key] >= cap.cap[0]:
            applied[cap.ref] = cap
            return False
        counts[key] += 1
        return True

    rows = [p.row for p in picks]
    kept = [at for at, row in enumerate(rows) if passes(row)]
    last = kept[n - 1] if len(kept) >= n else len(rows)
    for c, mask in filters:
        if any(mask[row] for row in rows[:last]):
            applied[c.ref] = c
    weights = [weight(rows[at]) for at in kept]
    reordered = any(w != 1.0 for w in weights)
    if reordered:
        standing = [(len(kept) - j) * float(w) for j, w in enumerate(weights)]  # rank standing times boosts
        kept = [kept[j] for j in sorted(range(len(kept)), key=lambda j: -standing[j])]
    chosen: list[Pick] = []
    for at in kept:
        if len(chosen) >= n:
            break
        if admits(rows[at]):
            chosen.append(picks[at])
    for pick in reserve:
        if len(chosen) >= n:
            break
        if pick.row not in rows and passes(pick.row) and admits(pick.row):
            chosen.append(pick)
    if reordered:
        for at, pick in enumerate(chosen):
            holding = [c for c, mask, _ in boosts if mask[pick.row]]
            if holding and weight(pick.row) != 1.0:
                applied.update((c.ref, c) for c in holding)
                chosen[at] = Pick(pick.row, pick.score, (*reasons_of(pick), *dict.fromkeys(c.ref for c in holding)))
    placed = chosen
    for c in reversed(rules):  # injections lowest priority first
        for injected, position in c.injects:
            shown = {p.row for p in placed[:n]}
            place = [r for r in dict.fromkeys(injected) if r not in shown and passes(r) and allowed(r)]
            if place:
                rest = [p for p in placed if p.row not in place]
                start = min(max(n - len(place), 0) if position is None else position, len(rest))
                placed = rest[:start] + [Pick(r, 0.0, c.ref) for r in place] + rest[start:]
                applied[c.ref] = c
    slots: dict[int, tuple[int, CompiledRule]] = {}
    for c in rules:  # pins highest priority first: the slot and the item go to the first
        for row, position in c.pins:
            taken = {r for r, _ in slots.values()}
            if position < n and position not in slots and row not in taken and passes(row) and allowed(row):
                slots[position] = (row, c)
    if slots:
        pinned = {r for r, _ in slots.values()}
        rest = [p for p in placed if p.row not in pinned]
        by_row = {p.row: p for p in placed}
        result: list[Pick] = []
        for index in range(max(n, len(placed))):
            if index in slots:
                row, c = slots[index]
                held = by_row.get(row)
                result.append(Pick(row, 0.0, (*reasons_of(held), c.ref) if held is not None else (c.ref,)))
                applied[c.ref] = c
            elif rest:
                result.append(rest.pop(0))
            else:
                break
        for position, (row, c) in sorted(slots.items()):
            if position >= len(result):
                result.append(Pick(row, 0.0, (c.ref,)))
                applied[c.ref] = c
        placed = result
    final = placed[:n]
    if reordered or placed is not chosen:
        final = [Pick(p.row, round(1.0 - i / len(final), 6), p.reason) for i, p in enumerate(final)]
    content: list[Content] = []
    for c in rules:
        for slot, body in c.attach:
            if slot not in {k.slot for k in content}:
                content.append(Content(slot, c.ref, body))
                applied[c.ref] = c
    return Answer(final, [c.ref for c in sorted(applied.values(), key=lambda c: c.rank)], content, reordered)
