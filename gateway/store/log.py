"""The embedded store's event log: accepted events appended to JSONL files, one per UTC day.

Each line is an interaction record `tailor build --events` reads as it is (user_id, event,
timestamp, item_id, value, event_id, query), so captured behaviour feeds the next rebuild:

    tailor build --event-log var/events --items shop/items.jsonl

The event loop only appends to a list; a flush in a worker thread writes the lines out every
`interval_s` (and on close), so no request ever waits for the disk. Lines of a process that dies
before a flush are lost: at most `interval_s` of events. (The Redis store logs to a stream instead.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from gateway.store.base import LogLine, decode_log
from gateway.tasks import stop as stop_task

log = logging.getLogger("tailor.store")

PATTERN = "events-*.jsonl"


def file_for(directory: Path, ts: float, prefix: str = "events") -> Path:
    return directory / time.strftime(f"{prefix}-%Y-%m-%d.jsonl", time.gmtime(ts))


class FileLog:
    """`keep_s` > 0: a day's file is deleted once the whole day is more than `keep_s` seconds ago
    (checked when the first lines of a new day are written, and at the first write after start)."""

    def __init__(
        self, directory: Path, *, interval_s: float = 1.0, prefix: str = "events", keep_s: float = 0.0
    ) -> None:
        self.directory = directory
        self.prefix = prefix  # files <prefix>-YYYY-MM-DD.jsonl: "events", or "consent" for the audit log
        self.interval_s = interval_s
        self.keep_s = keep_s
        self._pruned: Path | None = None  # the file being written when old ones were last deleted
        self._lines: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()

    def append(self, line: bytes) -> None:
        self._lines.append(line)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(), name="event-log")

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except OSError as exc:  # a full or read-only disk must not take the gateway down
                log.error("event log %s: %s (%d lines waiting)", self.directory, exc, len(self._lines))

    async def flush(self) -> None:
        """Write out what has been appended so far."""
        async with self._writing:
            lines, self._lines = self._lines, []
            if lines:
                try:
                    await asyncio.to_thread(self._write, lines, time.time())
                except OSError:
                    self._lines[:0] = lines  # kept for the next try
                    raise

    def _write(self, lines: list[bytes], now: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = file_for(self.directory, now, self.prefix)
        with path.open("ab") as out:
            out.write(b"\n".join(lines) + b"\n")
        if self.keep_s > 0 and path != self._pruned:
            self._pruned = path
            self.prune(now)

    def prune(self, now: float) -> list[Path]:
        """Delete the files of days that ended more than `keep_s` before `now`; which ones."""
        oldest_kept = file_for(self.directory, now - self.keep_s, self.prefix).name  # names sort by date
        gone = [path for path in self.directory.glob(f"{self.prefix}-*.jsonl") if path.name < oldest_kept]
        for path in gone:
            path.unlink(missing_ok=True)
        if gone:
            log.info("event log: deleted %d file(s) older than %.0f days", len(gone), self.keep_s / 86_400)
        return gone

    async def erase(self, visitor: str) -> int:
        """Remove the visitor's events from every log file (rewritten in a thread); how many."""
        await self.flush()
        async with self._writing:
            return await asyncio.to_thread(self._erase, visitor)

    def _erase(self, visitor: str) -> int:
        removed = 0
        for path in sorted(self.directory.glob(f"{self.prefix}-*.jsonl")):
            kept: list[bytes] = []
            lines = path.read_bytes().splitlines()
            for line in lines:
                if line and decode_log(line).user_id == visitor:
                    removed += 1
                else:
                    kept.append(line)
            if len(kept) != len(lines):
                staging = path.with_suffix(".erasing")
                staging.write_bytes(b"".join(line + b"\n" for line in kept if line))
                staging.replace(path)  # atomic: a reader sees the old file or the new one
        return removed

    async def read(self, visitor: str) -> list[LogLine]:
        """The visitor's logged events, oldest first."""
        await self.flush()
        return await asyncio.to_thread(self._read, visitor)

    def _read(self, visitor: str) -> list[LogLine]:
        found: list[LogLine] = []
        for path in sorted(self.directory.glob(f"{self.prefix}-*.jsonl")):
            for line in path.read_bytes().splitlines():
                if line:
                    event = decode_log(line)
                    if event.user_id == visitor:
                        found.append(event)
        return found

    async def close(self) -> None:
        await stop_task(self._flusher)
        self._flusher = None
        try:
            await self.flush()
        except OSError as exc:
            log.error("event log %s: %s; %d events not written", self.directory, exc, len(self._lines))
