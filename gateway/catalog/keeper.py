"""The live catalog of this node: every item record the catalog API stored (on any node), followed
as it changes, and applied over the snapshot being served (gateway.catalog.view).

Each change is announced (Redis pub/sub, or in process); the node then reads what changed after
the last sequence number it has and has the view made again, one at a time: changes that arrive
meanwhile wait for the next one, so a burst (a bulk import) costs a few views, not one per item,
and views take at most VIEW_SHARE of the node's time while a burst lasts (BURST). A
poll every `poll_s` catches what a lost announcement missed; a restarted node reads every record
before it serves (`start`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from gateway.catalog import records
from gateway.store import StoreError
from gateway.store.catalog import READ_CHUNK, CatalogChanges
from gateway.tasks import stop as stop_task
from index_builder.schema import LiveItem

log = logging.getLogger("tailor.catalog")

# The most of a node's time that making views may take while many changes keep coming (a bulk
# import): after a view of at least BURST changes, the next one waits until the last one's share of
# the time since it began is down to VIEW_SHARE. Views of fewer changes (single edits, however
# frequent) are made at once.
VIEW_SHARE = 0.25
BURST = 100


class CatalogKeeper:
    def __init__(
        self,
        changes: CatalogChanges,
        *,
        apply: Callable[[], Awaitable[None]],
        poll_s: float = 5.0,
        on_applied: Callable[[list[float]], None] = lambda lags: None,
    ) -> None:
        """`apply` serves the records as they are now (it makes and installs the view); `on_applied`
        hears, after each, how long each change it applied took to get here (seconds since the node
        that took it took it)."""
        self.changes = changes
        self.poll_s = poll_s
        self._apply = apply
        self._on_applied = on_applied
        self.items: dict[str, tuple[int, LiveItem]] = {}  # item id -> (seq, latest record)
        self.seq = 0  # the last change read
        self.applied_seq = 0  # the last change served
        self._pending: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._again = False
        self._lock = asyncio.Lock()
        self._view_started = 0.0  # when the last view began to be made (monotonic seconds)
        self._view_took = 0.0  # and how long it took

    async def start(self) -> None:
        """Read every stored record (served with the first snapshot), then follow the changes."""
        self.changes.watch(self.changed)
        try:
            await self._read()
            self.applied_seq = self.seq  # served with the first snapshot (gateway.runtime)
        except StoreError as exc:
            log.warning("catalog: cannot read the live changes yet (%s); serving the snapshot's catalog", exc)
        if self.poll_s > 0:
            self._poller = asyncio.create_task(self._poll(), name="catalog-poller")

    async def stop(self) -> None:
        for task in (self._poller, self._pending):
            await stop_task(task)
        await self.changes.close()

    def pending(self, after: int = 0) -> list[tuple[int, LiveItem]]:
        """The records numbered after `after`, oldest change first (the order to apply them in)."""
        return sorted((pair for pair in self.items.values() if pair[0] > after), key=lambda pair: pair[0])

    def get(self, item_id: str) -> LiveItem | None:
        found = self.items.get(item_id)
        return None if found is None else found[1]

    async def put(self, items: Iterable[LiveItem]) -> int:
        """Store the records (all or none; StoreError) and have them served here at once (other
        nodes follow the announcement); the last sequence number given."""
        stored = list(items)
        seq = await self.changes.put([(item.item_id, records.encode(item)) for item in stored])
        # Known here at once (a PATCH or DELETE right after must find it), served with the next view.
        for number, item in enumerate(stored, seq - len(stored) + 1):
            self._keep(number, item)
        self.changed()
        return seq

    def _keep(self, seq: int, item: LiveItem) -> None:
        known = self.items.get(item.item_id)
        if known is None or known[0] < seq:  # a read that raced a newer put must not undo it
            self.items[item.item_id] = (seq, item)

    def changed(self) -> None:
        """An announcement: read and apply soon; one heard while that runs gets another after it."""
        if self._pending is not None and not self._pending.done():
            self._again = True
            return
        self._pending = asyncio.get_running_loop().create_task(self._refresh_logged(), name="catalog-refresh")

    async def _refresh_logged(self) -> None:
        while True:
            self._again = False
            try:
                await self.refresh()
            except Exception:
                log.exception("catalog refresh")
            if not self._again:
                return

    async def refresh(self) -> None:
        """Read what changed since the last change read and serve it (after a view of a burst, once
        that view's share of the time since it began is down to VIEW_SHARE)."""
        async with self._lock:
            pause = self._view_started + self._view_took / VIEW_SHARE - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                fresh = await self._read()
            except StoreError as exc:
                log.warning("catalog: cannot read the live changes (%s); retrying on the next change or poll", exc)
                return
            if not fresh and self.applied_seq == self.seq:
                return
            started_seq = self.seq
            self._view_started = time.monotonic()
            await self._apply()
            self._view_took = time.monotonic() - self._view_started if len(fresh) >= BURST else 0.0
            self.applied_seq = started_seq
            now = time.time()
            self._on_applied([now - item.changed for item in fresh])

    async def _read(self) -> list[LiveItem]:
        fresh: list[LiveItem] = []
        while True:
            found = await self.changes.since(self.seq)
            for seq, _, raw in found:
                try:
                    item = records.decode(raw)
                except ValueError:
                    log.error("catalog: change %d of an item is unreadable; skipped", seq)
                    continue
                self._keep(seq, item)
                fresh.append(item)
            if found:
                self.seq = max(self.seq, found[-1][0])
            if len(found) < READ_CHUNK:
                return fresh

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.changed()
