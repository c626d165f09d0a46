"""The active rule set of this node: read from the shared documents, compiled against the snapshot
being served, and swapped in whole, so a request sees one version from start to end.

Every node follows the same state (active version + flags): a change made on any node is announced
(Redis pub/sub, or in process) and each node refreshes; a poll every `poll_s` catches what a lost
announcement missed. Compiling runs in a worker thread; the swap is one reference assignment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.rules.book import Book
from gateway.rules.conditions import Compiler
from gateway.rules.document import RuleSet, RuleSetError, parse
from gateway.snapshot import Snapshot
from gateway.store import StoreError, window_label
from gateway.store.documents import Documents, Follower, State

log = logging.getLogger("tailor.rules")


class RuleKeeper(Follower):
    def __init__(
        self,
        documents: Documents,
        *,
        windows: tuple[float, ...],
        install: Callable[[Book | None], None],
        snapshot: Callable[[], Snapshot | None],
        activated: Callable[[RuleSet | None, int], None] = lambda ruleset, version: None,
        poll_s: float = 5.0,
    ) -> None:
        super().__init__(documents, poll_s=poll_s)
        self.compiler = Compiler(windows, window_label)
        self._install = install  # puts a book (or none) into the serving recommender
        self._activated = activated  # hears of each newly active rule set (its triggers, ...)
        self._snapshot = snapshot
        self.state = State()
        self.ruleset: RuleSet | None = None
        self.book: Book | None = None
        self.problem: str | None = None  # why the active version is not being served, if it is not
        self._lock = asyncio.Lock()

    def compile(
        self,
        ruleset: RuleSet,
        version: int | None,
        snap: Snapshot,
        flags: dict[str, bool] | None = None,
        *,
        strict: bool = True,
    ) -> Book:
        """RuleSetError when the rule set does not fit this gateway or snapshot (unknown items,
        windows, segments, time zone); not `strict`, items missing from the snapshot are skipped."""
        return Book(ruleset, version, snap, self.compiler, flags=flags, strict=strict)

    def compile_for(self, snap: Snapshot) -> Book | None:
        """The active rules for a snapshot about to be served (in the thread that loaded it)."""
        ruleset, state = self.ruleset, self.state
        if ruleset is None or state.active is None:
            return None
        try:
            return self.compile(ruleset, state.active, snap, state.flags, strict=False)
        except RuleSetError as exc:
            log.error("rules version %s does not fit snapshot %s: %s", state.active, snap.version, exc)
            return None

    def adopt(self, book: Book | None) -> None:
        """A snapshot swap installed `book`; if the rules changed while it was compiled, refresh."""
        state = self.state
        if book is None and state.active is None:
            self.book = None
        elif book is not None and book.version == state.active and book.flags == state.flags:
            self.book = book
            for warning in book.warnings:
                log.warning("rules version %s on snapshot %s: %s", book.version, book.snap.version, warning)
        else:
            self.changed()

    async def refresh(self, *, snapshot_changed: bool = False) -> None:
        """Serve what the documents say is active, if it differs from what is served (or the
        snapshot changed). A version that cannot be read or compiled leaves the old book serving."""
        async with self._lock:
            try:
                state = await self.documents.state()
            except StoreError as exc:
                log.warning("rules: cannot read the active version (%s); keeping version %s", exc, self.version)
                return
            snap = self._snapshot()
            if state == self.state and not snapshot_changed and (self.book is not None or state.active is None):
                return
            if state.active is None:
                self.state, self.ruleset, self.book, self.problem = state, None, None, None
                self._install(None)
                self._activated(None, 0)
                log.info("rules: none active")
                return
            ruleset = self.ruleset
            if ruleset is None or self.state.active != state.active:
                ruleset = await self._read(state.active)
                if ruleset is None:
                    return
            if ruleset is not self.ruleset or state != self.state:
                self._activated(ruleset, state.active)
            self.state, self.ruleset = state, ruleset
            if snap is None:
                return  # compiled when a snapshot comes
            try:
                book = await asyncio.to_thread(self.compile, ruleset, state.active, snap, state.flags, strict=False)
            except RuleSetError as exc:  # checked on activation; only a changed gateway setting gets here
                self.problem = f"version {state.active} does not fit this gateway: {exc}"
                log.error("rules: %s; keeping version %s", self.problem, self.version)
                return
            self.book, self.problem = book, None
            self._install(book)
            for warning in book.warnings:
                log.warning("rules version %s on snapshot %s: %s", state.active, snap.version, warning)
            log.info("rules: serving version %s (%d rules)", state.active, len(book.rules))

    async def _read(self, version: int) -> RuleSet | None:
        try:
            body = await self.documents.get(version)
        except StoreError as exc:
            log.warning("rules: cannot read version %s (%s); keeping %s", version, exc, self.version)
            return None
        if body is None:
            self.problem = f"version {version} is missing"
            log.error("rules: %s; keeping %s", self.problem, self.version)
            return None
        return parse(body)

    @property
    def version(self) -> int | None:
        return self.book.version if self.book is not None else None
