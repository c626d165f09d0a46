"""The gateway's live catalog as build input: `tailor build --catalog SOURCE`.

SOURCE is where the gateway keeps the item records its catalog API stored (index_builder.schema.LiveItem,
the latest of each item):

- the memory store's file (setting `catalog_file`, `var/catalog.jsonl` by default): JSON lines
  `[seq, item_id, record]`, later lines replacing earlier ones;
- a Redis URL (`redis://host:port/db`, with `?prefix=...` for another key prefix than `tailor:`):
  the hash `<prefix>catalog:items`, read in pages.

The records are laid over the items of `--items` (`overlay`): a changed item takes the record's
fields (its attributes are merged into the file's), a new one joins the catalog, a retired one
leaves it, and its interactions are left out, so it is no candidate of the next snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from index_builder.event_log import is_redis
from index_builder.readers import InputError
from index_builder.schema import Item, LiveItem

PAGE = 10_000


class _Line(msgspec.Struct, array_like=True):
    seq: int
    item: str
    record: LiveItem


def read_live(source: str, say: Callable[[str], None]) -> list[LiveItem]:
    """The latest record of every item SOURCE holds."""
    found = _from_redis(source) if is_redis(source) else _from_file(Path(source))
    retired = sum(item.retired for item in found)
    say(f"live catalog {_shown(source)}: {len(found):,} item records ({retired:,} retired)")
    return found


def _from_file(path: Path) -> list[LiveItem]:
    if not path.is_file():
        raise InputError(f"--catalog {path}: no such file (the gateway's catalog_file) nor a redis:// URL")
    decoder = msgspec.json.Decoder(_Line)
    latest: dict[str, tuple[int, LiveItem]] = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise InputError(f"--catalog {path}:{number}: not a catalog record: {exc}") from None
        if line.item not in latest or latest[line.item][0] < line.seq:
            latest[line.item] = (line.seq, line.record)
    return [item for _, item in sorted(latest.values(), key=lambda pair: pair[0])]


def _from_redis(url: str) -> list[LiveItem]:
    import redis  # noqa: PLC0415 - only a Redis-backed deployment needs it here
    from redis.exceptions import RedisError  # noqa: PLC0415

    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    prefix = dict(options).get("prefix", "tailor:")
    kept = urlencode([(k, v) for k, v in options if k != "prefix"])
    client = redis.Redis.from_url(urlunsplit((parts.scheme, parts.netloc, parts.path, kept, parts.fragment)))
    decoder = msgspec.json.Decoder(LiveItem)
    found: list[LiveItem] = []
    try:
        cursor = 0
        while True:
            page: Any = client.hscan(f"{prefix}catalog:items", cursor, count=PAGE)
            cursor, entries = page
            found.extend(decoder.decode(raw) for raw in entries.values())
            if cursor == 0:
                break
    except RedisError as exc:
        raise InputError(f"--catalog {_shown(url)}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InputError(f"--catalog {_shown(url)}: not a catalog record: {exc}") from exc
    finally:
        client.close()
    return sorted(found, key=lambda item: item.changed)


def _shown(source: str) -> str:
    """SOURCE without a password."""
    if not is_redis(source):
        return source
    parts = urlsplit(source)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"


def overlay(items: Iterable[Item], live: Iterable[LiveItem]) -> tuple[list[Item], set[str]]:
    """The catalog with the live records laid over it, and the ids of the retired items (their
    interactions are to be left out too)."""
    catalog = {item.item_id: item for item in items}
    retired: set[str] = set()
    for record in live:
        if record.retired:
            catalog.pop(record.item_id, None)
            retired.add(record.item_id)
            continue
        retired.discard(record.item_id)
        given = catalog.get(record.item_id)
        catalog[record.item_id] = Item(
            record.item_id,
            title=record.title,
            categories=record.categories,
            tags=record.tags,
            price=record.price,
            stock=record.stock,
            # The gateway does not hold the file's attributes of a snapshot item, so a record of a
            # change to one (a PATCH of its stock) has none of them: merged, not replaced.
            attributes={**(given.attributes if given is not None else {}), **record.attributes},
            available=record.available,
        )
    return list(catalog.values()), retired
