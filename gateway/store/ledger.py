"""The experiment ledger: who was exposed to which arm of an A/B experiment, and what they did after.

An experiment's report (gateway.experiments.stats) reads running totals per arm, never per-visitor rows:
visitors exposed, visitors who converted on each metric, and the sum and sum of squares of the revenue
per visitor (what Welch's t-test needs: mean and variance follow from n, sum and sum of squares). So
the ledger keeps those totals as counters, and per visitor only what it takes to keep them right:

- a mark per experiment and phase (-> the arm), set by the first exposure and never changed, so a
  visitor is counted once per phase, in the arm they first saw (a later exposure to another arm, from
  a plan changed mid-phase or a race between nodes, cannot move them and count them twice);
- a flag per experiment, phase and metric once they converted on it, so conversions count visitors,
  not events (a rate is visitors who converted over visitors exposed);
- their revenue total per experiment and phase, so the arm's sum of squares is of per-visitor totals
  (each purchase adds new_total² - old_total², not purchase²).

A conversion is attributed to every experiment and phase the visitor has a mark in, each to its own
arm: the ledger does not judge which experiment caused it, the comparison between arms does.

Per-visitor state expires `ttl` after the visitor's latest exposure or conversion and goes on an
erasure (`forget`); the totals stay, as they name nobody. Phases are kept apart because a phase
changes the split (see gateway.experiments.plan): a visitor drawn again in phase 2 is exposed again.

Two backends, as for the store: `MemoryLedger` in this process, `RedisLedger` shared by every node
(`RedisStore.ledger()`; `open_ledger` in gateway.store picks). The contract tests in
tests/test_store_ledger.py run the same behaviours against both.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.base import StoreError, StoreTimeoutError

DEFAULT_MAX_VISITORS = 1_000_000


class Exposure(NamedTuple):
    """A visitor shown an arm of an experiment in a phase."""

    visitor: str  # the visitor's pseudonym (gateway.privacy.keys), never the raw id
    experiment: str  # the experiment's id
    phase: int
    arm: str  # the arm, or a factorial cell ("ranker=A,banner=on")


class Attributed(NamedTuple):
    """An experiment and phase a conversion was counted in, and the visitor's arm there."""

    experiment: str
    phase: int
    arm: str


class ArmTotals(msgspec.Struct, frozen=True):
    """One arm's running totals in one experiment and phase."""

    exposures: int = 0  # visitors exposed
    conversions: dict[str, int] = {}  # metric -> visitors of this arm who converted on it at least once
    revenue_sum: float = 0.0  # sum over the arm's visitors of each visitor's revenue total
    revenue_sum_squares: float = 0.0  # sum over the arm's visitors of (each visitor's revenue total) ** 2


class Ledger(Protocol):
    async def expose(self, exposures: Sequence[Exposure], *, ttl: float) -> list[bool]:
        """One round trip for the whole batch (many visitors). For each: unless the visitor already has a
        mark for (experiment, phase), store the mark (-> arm) and add 1 to that arm's exposures; the first
        arm a visitor gets in a phase is the one they keep. Returns per exposure whether it was new. Each
        visitor's state expires `ttl` seconds after its latest expose or convert."""
        ...

    async def convert(
        self, visitor: str, metrics: Sequence[str], revenue: float = 0.0, *, ttl: float
    ) -> list[Attributed]:
        """One round trip. For each of the visitor's marks: the first time the visitor converts on a metric
        of `metrics` in that experiment and phase, add 1 to the arm's conversions of it; with revenue > 0,
        add it to the visitor's revenue total there, and to the arm's revenue_sum, and add new_total² -
        old_total² to its revenue_sum_squares. Returns the marks attributed (all of the visitor's, in any
        order; [] for a visitor without marks). Refreshes the visitor's TTL. With no metrics and no
        revenue there is nothing to count: [] and nothing done, not even a round trip."""
        ...

    async def totals(self, experiment: str, phase: int) -> dict[str, ArmTotals]:
        """Arm -> totals for the experiment and phase (arms nobody was exposed to are absent)."""
        ...

    async def marks(self, visitor: str) -> dict[str, str]:
        """The visitor's marks, "<experiment>@<phase>" -> arm (for a data export)."""
        ...

    async def forget(self, visitor: str) -> bool:
        """Delete the visitor's marks, conversion flags and revenue totals (the totals stay: they are
        anonymous). True if there was anything."""
        ...

    async def close(self) -> None: ...


def mark_key(experiment: str, phase: int) -> str:
    """How a mark is named: "<experiment>@<phase>" (experiment ids have no "@", so it parses back)."""
    return f"{experiment}@{phase}"


def _parse_mark(key: str) -> tuple[str, int]:
    experiment, _, phase = key.rpartition("@")
    return experiment, int(phase)


def _check_exposure(exposure: Exposure) -> None:
    """Refuse what would make a stored name ambiguous: "@" ends the experiment in a mark's name, "|" ends
    the arm in a totals field. Both backends refuse alike, so the contract does not depend on which."""
    if not exposure.experiment or "@" in exposure.experiment:
        raise ValueError(f"experiment id {exposure.experiment!r} must be non-empty and without '@'")
    if not exposure.arm or "|" in exposure.arm:
        raise ValueError(f"arm {exposure.arm!r} must be non-empty and without '|'")


def _converts(metrics: Sequence[str], revenue: float, ttl: float) -> bool:
    """Whether a `convert` call has anything to count (ValueError for a bad ttl or revenue)."""
    _check_ttl(ttl)
    _check_revenue(revenue)
    return bool(metrics) or revenue > 0


def _check_ttl(ttl: float) -> None:
    if not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")


def _check_revenue(revenue: float) -> None:
    # An infinite or NaN revenue would poison the arm's sums for good (they never expire).
    if not math.isfinite(revenue):
        raise ValueError(f"revenue must be a finite number, not {revenue!r}")


# -- in this process ------------------------------------------------------------------------------------


class _Visitor:
    __slots__ = ("converted", "deadline", "marks", "revenue")

    def __init__(self, deadline: float) -> None:
        self.marks: dict[tuple[str, int], str] = {}  # (experiment, phase) -> arm
        self.converted: set[tuple[str, int, str]] = set()  # (experiment, phase, metric)
        self.revenue: dict[tuple[str, int], float] = {}  # (experiment, phase) -> the visitor's total
        self.deadline = deadline  # time.monotonic() at which it expires


class _Arm:
    __slots__ = ("conversions", "exposures", "revenue_sum", "revenue_sum_squares")

    def __init__(self) -> None:
        self.exposures = 0
        self.conversions: dict[str, int] = {}
        self.revenue_sum = 0.0
        self.revenue_sum_squares = 0.0


class MemoryLedger:
    """Implements `Ledger` in plain dicts, for a single gateway process (lost when it stops).

    Per-visitor state expires lazily, by a deadline on the monotonic clock checked when the visitor is
    next touched (and swept from the least recently touched end). At most `max_visitors` visitors are
    kept; past that the least recently touched goes, as if expired: an evicted visitor exposed again
    counts again, so the bound should sit well above the visitors of one TTL. Totals are never dropped.
    """

    def __init__(self, max_visitors: int = DEFAULT_MAX_VISITORS) -> None:
        if max_visitors < 1:
            raise ValueError(f"max_visitors must be at least 1, not {max_visitors}")
        self.max_visitors = max_visitors
        self._visitors: OrderedDict[str, _Visitor] = OrderedDict()  # least recently touched first
        self._totals: dict[tuple[str, int], dict[str, _Arm]] = {}

    def __len__(self) -> int:
        """Visitors held right now, including expired ones not yet retired."""
        return len(self._visitors)

    def _live(self, visitor: str, now: float) -> _Visitor | None:
        state = self._visitors.get(visitor)
        if state is not None and state.deadline <= now:
            del self._visitors[visitor]
            return None
        return state

    def _sweep(self, now: float) -> None:
        """Retire expired visitors from the least recently touched end, then enforce the bound. With one
        TTL for everyone that end is also the earliest deadline; with mixed TTLs what is left over goes
        lazily or by the bound."""
        visitors = self._visitors
        while visitors:
            oldest = next(iter(visitors.values()))
            if oldest.deadline > now:
                break
            visitors.popitem(last=False)
        while len(visitors) > self.max_visitors:
            visitors.popitem(last=False)

    async def expose(self, exposures: Sequence[Exposure], *, ttl: float) -> list[bool]:
        _check_ttl(ttl)
        for exposure in exposures:
            _check_exposure(exposure)
        now = time.monotonic()
        deadline = now + ttl
        new: list[bool] = []
        for visitor, experiment, phase, arm in exposures:
            state = self._live(visitor, now)
            if state is None:
                state = self._visitors[visitor] = _Visitor(deadline)
            else:
                state.deadline = deadline
                self._visitors.move_to_end(visitor)
            key = (experiment, phase)
            if key in state.marks:
                new.append(False)
                continue
            state.marks[key] = arm
            arms = self._totals.setdefault(key, {})
            totals = arms.get(arm)
            if totals is None:
                totals = arms[arm] = _Arm()
            totals.exposures += 1
            new.append(True)
        self._sweep(now)
        return new

    async def convert(
        self, visitor: str, metrics: Sequence[str], revenue: float = 0.0, *, ttl: float
    ) -> list[Attributed]:
        if not _converts(metrics, revenue, ttl):
            return []
        now = time.monotonic()
        state = self._live(visitor, now)
        if state is None or not state.marks:
            return []
        state.deadline = now + ttl
        self._visitors.move_to_end(visitor)
        attributed: list[Attributed] = []
        for (experiment, phase), arm in state.marks.items():
            totals = self._totals[experiment, phase][arm]
            for metric in metrics:
                flag = (experiment, phase, metric)
                if flag not in state.converted:
                    state.converted.add(flag)
                    totals.conversions[metric] = totals.conversions.get(metric, 0) + 1
            if revenue > 0:
                old = state.revenue.get((experiment, phase), 0.0)
                new = state.revenue[experiment, phase] = old + revenue
                totals.revenue_sum += revenue
                totals.revenue_sum_squares += new * new - old * old
            attributed.append(Attributed(experiment, phase, arm))
        return attributed

    async def totals(self, experiment: str, phase: int) -> dict[str, ArmTotals]:
        return {
            arm: ArmTotals(t.exposures, dict(t.conversions), t.revenue_sum, t.revenue_sum_squares)
            for arm, t in self._totals.get((experiment, phase), {}).items()
        }

    async def marks(self, visitor: str) -> dict[str, str]:
        state = self._live(visitor, time.monotonic())
        if state is None:
            return {}
        return {mark_key(experiment, phase): arm for (experiment, phase), arm in state.marks.items()}

    async def forget(self, visitor: str) -> bool:
        if self._live(visitor, time.monotonic()) is None:
            return False
        del self._visitors[visitor]
        return True

    async def close(self) -> None:
        """Let go of the per-visitor state, as MemoryStore.close does; the totals stay readable."""
        self._visitors.clear()


# -- in Redis ---------------------------------------------------------------------------------------------

# Exposures, atomically. KEYS: per exposure, the visitor's hash and the experiment+phase's totals hash.
# ARGV: the TTL in ms, then per exposure the mark's field ("m:exp@phase"), the arm and the totals field
# to count it in ("arm|n"). Returns 1 (new) or 0 per exposure.
EXPOSE_SCRIPT = """
local new = {}
for i = 1, #KEYS / 2 do
  local at = 3 * i - 1
  local fresh = redis.call('HSETNX', KEYS[2 * i - 1], ARGV[at], ARGV[at + 1])
  if fresh == 1 then redis.call('HINCRBY', KEYS[2 * i], ARGV[at + 2], 1) end
  redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[1])
  new[i] = fresh
end
return new
"""

# A conversion, atomically. KEYS: the visitor's hash. ARGV: the TTL in ms, the revenue ("" for none), the
# totals keys' stem ("{prefix}x:t:"), then the metrics. The totals keys come from the visitor's marks, so
# the script names them itself (fine on one server, not on a cluster: as CLAIM_SCRIPT in redis.py).
# HINCRBYFLOAT answers the new total as a string; the square's delta is computed from the totals before
# and after, so revenue_sum_squares stays the sum of squares of per-visitor totals. Returns
# {"exp@phase", arm, ...} for each mark attributed.
CONVERT_SCRIPT = """
local visitor, revenue, stem = KEYS[1], ARGV[2], ARGV[3]
local held = redis.call('HGETALL', visitor)
local attributed = {}
for i = 1, #held, 2 do
  if string.sub(held[i], 1, 2) == 'm:' then
    local mark, arm = string.sub(held[i], 3), held[i + 1]
    local totals = stem .. mark
    for m = 4, #ARGV do
      if redis.call('HSETNX', visitor, 'c:' .. mark .. ':' .. ARGV[m], '1') == 1 then
        redis.call('HINCRBY', totals, arm .. '|c:' .. ARGV[m], 1)
      end
    end
    if revenue ~= '' then
      local field = 'r:' .. mark
      local old = tonumber(redis.call('HGET', visitor, field) or '0')
      local new = tonumber(redis.call('HINCRBYFLOAT', visitor, field, revenue))
      redis.call('HINCRBYFLOAT', totals, arm .. '|r', revenue)
      redis.call('HINCRBYFLOAT', totals, arm .. '|r2', string.format('%.17g', new * new - old * old))
    end
    attributed[#attributed + 1] = mark
    attributed[#attributed + 1] = arm
  end
end
if #attributed > 0 then redis.call('PEXPIRE', visitor, ARGV[1]) end
return attributed
"""

# Everything a broken, restarting or misbehaving server can make redis-py or the decoding raise.
_FAILURES = (RedisError, OSError, ValueError)


def _failure(operation: str, exc: BaseException) -> StoreError:
    kind = StoreTimeoutError if isinstance(exc, RedisTimeoutError | TimeoutError) else StoreError
    return kind(f"redis ledger {operation} failed: {type(exc).__name__}: {exc}")


def _ttl_ms(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


class RedisLedger:
    """Implements `Ledger` in Redis, under `prefix`, shared by every gateway node.

    Per visitor, the hash `{prefix}x:v:{visitor}` with `m:{exp}@{phase}` -> arm, `c:{exp}@{phase}:{metric}`
    -> "1" and `r:{exp}@{phase}` -> revenue total, expiring `ttl` after the latest expose or convert. Per
    experiment and phase, the hash `{prefix}x:t:{exp}@{phase}` with `{arm}|n`, `{arm}|c:{metric}`, `{arm}|r`
    and `{arm}|r2`, which never expires. `expose` and `convert` are one script each, so a visitor seen by
    two nodes at once is still counted once: the check and the count cannot be split by another client.

    `redis` is borrowed (RedisStore.ledger() hands over the store's client), so `close` leaves it open;
    it must answer bytes (redis-py's default, decode_responses off).
    """

    def __init__(self, redis: Redis, *, prefix: str = "tailor:") -> None:
        self.prefix = prefix
        self._redis = redis
        self._expose = redis.register_script(EXPOSE_SCRIPT)
        self._convert = redis.register_script(CONVERT_SCRIPT)

    def visitor_key(self, visitor: str) -> str:
        return f"{self.prefix}x:v:{visitor}"

    def totals_key(self, experiment: str, phase: int) -> str:
        return f"{self.prefix}x:t:{mark_key(experiment, phase)}"

    async def expose(self, exposures: Sequence[Exposure], *, ttl: float) -> list[bool]:
        _check_ttl(ttl)
        if not exposures:
            return []
        keys: list[str] = []
        args: list[str | int] = [_ttl_ms(ttl)]
        for exposure in exposures:
            _check_exposure(exposure)
            visitor, experiment, phase, arm = exposure
            keys += [self.visitor_key(visitor), self.totals_key(experiment, phase)]
            args += [f"m:{mark_key(experiment, phase)}", arm, f"{arm}|n"]
        try:
            new = await self._expose(keys=keys, args=args)
        except _FAILURES as exc:
            raise _failure("expose", exc) from exc
        return [bool(flag) for flag in new]

    async def convert(
        self, visitor: str, metrics: Sequence[str], revenue: float = 0.0, *, ttl: float
    ) -> list[Attributed]:
        if not _converts(metrics, revenue, ttl):
            return []
        args: list[str | int] = [
            _ttl_ms(ttl),
            repr(float(revenue)) if revenue > 0 else "",
            f"{self.prefix}x:t:",
            *metrics,
        ]
        try:
            flat = await self._convert(keys=[self.visitor_key(visitor)], args=args)
            return [
                Attributed(*_parse_mark(mark.decode()), arm.decode())
                for mark, arm in zip(flat[::2], flat[1::2], strict=True)
            ]
        except _FAILURES as exc:
            raise _failure("convert", exc) from exc

    async def totals(self, experiment: str, phase: int) -> dict[str, ArmTotals]:
        try:
            held = await self._hgetall(self.totals_key(experiment, phase))
            arms: dict[str, dict[str, Any]] = {}
            for raw_field, raw_value in held.items():
                arm, _, what = raw_field.decode().partition("|")
                fields = arms.setdefault(arm, {"conversions": {}})
                if what == "n":
                    fields["exposures"] = int(raw_value)
                elif what == "r":
                    fields["revenue_sum"] = float(raw_value)
                elif what == "r2":
                    fields["revenue_sum_squares"] = float(raw_value)
                elif what.startswith("c:"):
                    fields["conversions"][what[2:]] = int(raw_value)
            return {arm: ArmTotals(**fields) for arm, fields in arms.items()}
        except _FAILURES as exc:
            raise _failure("totals", exc) from exc

    async def marks(self, visitor: str) -> dict[str, str]:
        try:
            held = await self._hgetall(self.visitor_key(visitor))
            return {field.decode()[2:]: arm.decode() for field, arm in held.items() if field.startswith(b"m:")}
        except _FAILURES as exc:
            raise _failure("marks", exc) from exc

    async def _hgetall(self, key: str) -> dict[bytes, bytes]:
        held: Any = await self._redis.hgetall(key)
        return dict(held)

    async def forget(self, visitor: str) -> bool:
        try:
            deleted: Any = await self._redis.delete(self.visitor_key(visitor))
        except _FAILURES as exc:
            raise _failure("forget", exc) from exc
        return bool(deleted)

    async def close(self) -> None:
        """Nothing to release: the client belongs to whoever passed it in (the store)."""
