"""The gateway's event log as build input: `tailor build --event-log SOURCE`.

SOURCE is where the gateway's store logged the events it accepted:

- a directory of `events-YYYY-MM-DD.jsonl` files (the embedded `memory://` store's `event_log`
  setting, `var/events` by default): read as they are;
- a Redis URL (`redis://host:port/db`, with `?prefix=...` if the gateway used another key prefix than
  `tailor:`): the stream `<prefix>events` is exported to a JSONL file first, in pages.

Either way the lines are interaction records (user_id, event, timestamp, item_id, event_id, ...) and
go through the same validation, de-duplication (by event_id) and cleaning as any --events file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from index_builder.readers import InputError

PAGE = 10_000
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis(source: str) -> bool:
    return source.lower().startswith(REDIS_SCHEMES)


def collect(source: str, workdir: Path, say: Callable[[str], None]) -> list[Path]:
    """JSONL files holding the log's events, ready for `tailor build`."""
    if is_redis(source):
        return [export_stream(source, workdir / "event-log-redis.jsonl", say)]
    directory = Path(source)
    if not directory.is_dir():
        raise InputError(f"--event-log {source}: not a directory of events-*.jsonl files nor a redis:// URL")
    files = sorted(directory.glob("events-*.jsonl"))
    if not files:
        raise InputError(f"--event-log {source}: no events-*.jsonl files in it")
    say(f"event log {directory}: {len(files)} file(s)")
    return files


def export_stream(url: str, out: Path, say: Callable[[str], None]) -> Path:
    """Write the stream `<prefix>events` to `out`, oldest first, one line per event."""
    import redis  # noqa: PLC0415 - only a Redis-backed deployment needs it here
    from redis.exceptions import RedisError  # noqa: PLC0415

    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    prefix = dict(options).get("prefix", "tailor:")
    kept = urlencode([(k, v) for k, v in options if k != "prefix"])
    client = redis.Redis.from_url(urlunsplit((parts.scheme, parts.netloc, parts.path, kept, parts.fragment)))
    key = f"{prefix}events"
    written = 0
    try:
        with out.open("wb") as sink:
            start = "-"
            while True:
                page: Any = client.xrange(key, min=start, max="+", count=PAGE)
                if not page:
                    break
                sink.writelines(fields[b"e"] + b"\n" for _, fields in page if b"e" in fields)
                written += len(page)
                last = page[-1][0].decode()
                start = "(" + last  # exclusive: the next page starts after it
                if written % (PAGE * 10) == 0:
                    say(f"event log {key}: {written:,} events exported")
    except RedisError as exc:
        raise InputError(f"--event-log {parts.scheme}://{parts.hostname}:{parts.port}: {exc}") from exc
    finally:
        client.close()
    if not written:
        raise InputError(f"--event-log: the stream {key} is empty or missing (is the prefix right?)")
    say(f"event log {key}: {written:,} events exported to {out.name}")
    return out
