"""`tailor catalog import FILE`: a catalog file (CSV or JSONL, as `tailor build --items` reads it)
sent to a running gateway's `POST /v1/items`, a batch at a time, with a progress line."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec

from index_builder.clean import clean_items
from index_builder.readers import Format, InputError, item_rows

PROGRESS_EVERY_S = 2.0


class ImportReport(msgspec.Struct):
    read: int = 0
    unreadable: int = 0  # lines the file reader refused (the gateway never saw them)
    stored: int = 0
    rejected: int = 0  # rows the gateway refused
    examples: list[str] = []
    seconds: float = 0.0


class CatalogImportError(Exception):
    """The gateway refused a call (or could not be reached)."""


def post(url: str, key: str | None, body: bytes, timeout: float = 60.0) -> dict[str, object]:
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/items",
        data=body,
        method="POST",
        headers={"content-type": "application/json", **({"x-tailor-key": key} if key else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            result: dict[str, object] = json.loads(answer.read())
            return result
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise CatalogImportError(f"{exc.code} from the gateway: {detail}") from None
    except OSError as exc:
        raise CatalogImportError(f"cannot reach {url}: {exc}") from None


def import_file(
    path: Path,
    url: str,
    key: str | None,
    *,
    fmt: Format = "auto",
    batch: int = 1000,
    say: Callable[[str], None],
    send: Callable[[str, str | None, bytes], dict[str, object]] = post,
) -> ImportReport:
    """Send every item of `path` to the gateway at `url`; CatalogImportError when a call fails (what was
    sent before it is stored)."""
    items, cleaned = clean_items(item_rows(path, fmt), str(path))
    report = ImportReport(read=cleaned.read, unreadable=cleaned.rejected)
    report.examples = [f"{path}:{r.line}: {r.reason}" for r in cleaned.examples[:5]]
    started = last = time.monotonic()
    encode = msgspec.json.Encoder().encode
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        answer = send(url, key, encode(chunk))
        rejected = answer.get("rejected", [])
        assert isinstance(rejected, list)
        report.stored += int(str(answer.get("stored", 0)))
        report.rejected += len(rejected)
        report.examples += [f"item {chunk[r['index']].item_id}: {r['message']}" for r in rejected[:5]]
        now = time.monotonic()
        done = start + len(chunk)
        if now - last >= PROGRESS_EVERY_S or done == len(items):
            rate = done / max(now - started, 1e-9)
            left = (len(items) - done) / rate if rate else 0.0
            say(f"{done:,}/{len(items):,} items sent ({rate:,.0f}/s, about {left:.0f} s left)")
            last = now
    report.seconds = round(time.monotonic() - started, 2)
    return report


def run(path: Path, url: str, key: str | None, *, fmt: Format, batch: int, say: Callable[[str], None]) -> int:
    try:
        report = import_file(path, url, key, fmt=fmt, batch=batch, say=say)
    except (InputError, OSError) as exc:
        print(f"tailor catalog import: error: {exc}", file=sys.stderr)
        return 1
    except CatalogImportError as exc:
        print(f"tailor catalog import: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{path}: read {report.read:,}, stored {report.stored:,}, rejected by the gateway {report.rejected:,}, "
        f"unreadable {report.unreadable:,}, in {report.seconds:.1f} s"
    )
    for example in report.examples[:10]:
        print(f"  e.g. {example}")
    return 0 if report.rejected == 0 and report.unreadable == 0 else 1
