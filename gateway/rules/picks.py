"""The items of an answer (`Pick`) and their reasons."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec


class Pick(msgspec.Struct, frozen=True, gc=False):
    """One item of an answer: its catalog row, score and reasons. Lists of these are cached (popular
    lists of whole categories, remembered answers): gc=False keeps the collector from walking them
    (an int, a float and strings never make a cycle)."""

    row: int
    score: float
    reason: str | tuple[str, ...]  # one reason, or several (encoded as the item's `reasons` list)


def rounded(score: float) -> float:
    """round(score, 6), three times faster: scores are float32 values, whose product with 10**6
    is exact in a double, so rounding that to an integer and dividing is the correctly rounded
    decimal round() computes (tests/test_picks.py compares them). Not finite: as it is."""
    return round(score * 1e6) / 1e6 if score - score == 0 else score


def reasons_of(pick: Pick) -> tuple[str, ...]:
    return (pick.reason,) if isinstance(pick.reason, str) else pick.reason


def tagged(pick: Pick, more: Sequence[str]) -> Pick:
    """`pick` with `more` reasons after its own (the same pick when there are none)."""
    return pick if not more else Pick(pick.row, pick.score, (*reasons_of(pick), *more))


def with_reasons(picks: Sequence[Pick], extra: tuple[str, ...]) -> list[Pick]:
    """Picks whose reasons end with `extra` (the visitor's experiments and arms)."""
    return [tagged(pick, extra) for pick in picks]
