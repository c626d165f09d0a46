"""Conditions as straight-line Python: the predicate segments (`segments_function`) and the groups
of rules that fire on a surface (`fired_function`), each in one generated function over `Facts`,
instead of a closure call per condition and per part of one.

A visitor with activity (about a third of the benchmark's requests) gets here on every request:
served, the segments (the model's included) and the groups took about 32 of the 36 µs that
deciding cost such a visitor. The generated functions take a fifth of the closures' time warm and
a third to a quarter cold, more so the more groups a rule set has (see the README's rules section).

The closures (gateway.rules.conditions.Compiler.compile) stay the definition: a property test compares
the two. The generated source holds no value of the rule set: every name, string, number and set
is bound to a generated name (`_v0`, `_v1`, ...) in the function's globals, so no text of a rule
set ever becomes code. A rule set whose conditions nest too deeply for Python's parser keeps the
closures (None from the builders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from gateway.rules import conditions
from gateway.rules.conditions import WEEKDAYS, Compiler, Condition, ContextMatch, Facts, Recency

# Conditions nested deeper than this keep their closures: Python's parser allows 200 levels of
# parentheses, and each level of a condition takes at most one.
DEPTH_MAX = 100


class TooDeepError(Exception):
    """A condition nests deeper than DEPTH_MAX."""


class Source:
    """Generated source and the values its names stand for."""

    def __init__(self, compiler: Compiler) -> None:
        self.compiler = compiler
        self.values: dict[str, object] = {}

    def bind(self, value: object) -> str:
        """A new name standing for `value` in the generated code."""
        name = f"_v{len(self.values)}"
        self.values[name] = value
        return name

    def expression(self, condition: Condition, depth: int = 0) -> str:  # noqa: PLR0911 - one return per kind
        """`condition` as one Python expression over `f`, true where Compiler.compile's closure is."""
        if depth > DEPTH_MAX:
            raise TooDeepError
        if condition.all is not None:
            parts = [self.expression(c, depth + 1) for c in condition.all]
            return f"({' and '.join(parts)})" if parts else "True"
        if condition.any is not None:
            parts = [self.expression(c, depth + 1) for c in condition.any]
            return f"({' or '.join(parts)})" if parts else "False"
        if condition.not_ is not None:
            return f"(not {self.expression(condition.not_, depth + 1)})"
        if condition.segment is not None:
            return f"({self.bind(condition.segment)} in f.segments)"
        if condition.counter is not None:
            counter = condition.counter
            name = self.compiler.counter_name(counter)
            low = counter.at_least if counter.at_least is not None else 0
            high = counter.at_most if counter.at_most is not None else float("inf")
            return f"({self.bind(low)} <= f.counters.get({self.bind(name)}, 0) <= {self.bind(high)})"
        if condition.recency is not None:
            return self.recency(condition.recency)
        if condition.session is not None:
            return f"{self.bind(conditions.session_check(condition.session))}(f)"
        assert condition.context is not None
        return self.context(condition.context)

    def recency(self, recency: Recency) -> str:
        """A recency condition: inline over `last_seen` for any event (a segment of new or returning
        visitors), else its closure, which looks through the recent events."""
        if recency.event is not None:
            return f"{self.bind(conditions.recency_check(recency))}(f)"
        if recency.within is not None:
            within = self.bind(conditions.parse_duration(recency.within))
            return f"(f.last_seen is not None and f.now - f.last_seen <= {within})"
        assert recency.not_within is not None
        quiet = self.bind(conditions.parse_duration(recency.not_within))
        return f"(f.last_seen is None or f.now - f.last_seen > {quiet})"

    def context(self, match: ContextMatch) -> str:
        """A context match: every part given must hold (as gateway.rules.conditions' `_context`)."""
        parts: list[str] = []
        if match.device:
            parts.append(f"f.device in {self.bind(frozenset(d.lower() for d in match.device))}")
        if match.country:
            parts.append(f"f.country in {self.bind(frozenset(c.upper() for c in match.country))}")
        if match.referrer:
            anywhere = " or ".join(f"{self.bind(part)} in f.referrer" for part in match.referrer)
            parts.append(f"(f.referrer is not None and ({anywhere}))")
        if match.page:
            parts.append(f"(f.page is not None and f.page.startswith({self.bind(tuple(match.page))}))")
        if match.hours:
            parts.append(f"f.local.hour in {self.bind(frozenset(match.hours))}")
        if match.weekdays:
            parts.append(f"f.local.weekday() in {self.bind(frozenset(WEEKDAYS.index(d) for d in match.weekdays))}")
        return f"({' and '.join(parts)})" if parts else "True"

    def function(self, name: str, lines: list[str]) -> Callable[..., object]:
        """Compile `def name(f):` with the body `lines`, its names bound to their values."""
        text = "\n".join([f"def {name}(f):", *(f"    {line}" for line in lines)]) + "\n"
        namespace: dict[str, object] = dict(self.values)
        # The text is ours: names, keywords and indexes; every value of the rule set is a bound name.
        exec(compile(text, f"<rules: {name}>", "exec"), namespace)
        made = namespace[name]
        assert callable(made)
        return made


def segments_function(
    definitions: Sequence[tuple[str, Condition]], compiler: Compiler
) -> Callable[[Facts], None] | None:
    """One function that adds to `f.segments`, in order, each segment whose condition holds (one
    may refer to those before it); None when a condition nests too deeply."""
    source = Source(compiler)
    lines = ["segments = f.segments"]
    try:
        for ident, when in definitions:
            lines += [f"if {source.expression(when)}:", f"    segments.add({source.bind(ident)})"]
        made = source.function("segments", lines)
    except (TooDeepError, RecursionError, SyntaxError, MemoryError):
        return None
    return made  # type: ignore[return-value]


def fired_function(
    checks: Sequence[tuple[int, Condition | None, float, float]], compiler: Compiler
) -> Callable[[Facts], int] | None:
    """One function that gives, as a mask, bit `index` of each check (index, condition, validity
    from, until) valid at `f.now` whose condition holds (None: always); None when a condition
    nests too deeply."""
    source = Source(compiler)
    lines = ["now = f.now", "found = 0"]
    try:
        for index, when, starts, ends in checks:
            # Always valid (most groups): no comparison (the time is a finite number of seconds).
            tests = (
                []
                if starts == -math.inf and ends == math.inf
                else [f"{source.bind(starts)} <= now < {source.bind(ends)}"]
            )
            if when is not None:
                tests.append(source.expression(when))
            lines += [f"if {' and '.join(tests) or 'True'}:", f"    found |= {1 << int(index)}"]
        made = source.function("fired", [*lines, "return found"])
    except (TooDeepError, RecursionError, SyntaxError, MemoryError):
        return None
    return made  # type: ignore[return-value]
