"""Per-visitor state behind one protocol; `open_store(url)` picks the backend.

Accepted URLs:

- `memory://` (also `memory:` or the empty string): this process only. Query options `max_mb`
  (default 512: the visitors' estimated resident megabytes) and `max_visitors` (default 1000000)
  bound it, least recently used visitors going first, e.g. `memory://?max_mb=2048`.
- `redis://[user:password@]host:port/db`, `rediss://...` (TLS), `unix:///path/to/redis.sock?db=0`:
  shared. Query option `prefix` (default `tailor:`) namespaces the keys; redis-py's own options
  (`socket_timeout`, `socket_connect_timeout`, `health_check_interval`, `max_connections`, ...) pass
  through and override the store's defaults.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from gateway.store.base import (
    EMPTY_PROFILE,
    PURPOSES,
    Consent,
    CounterKey,
    Interaction,
    PartlyStoredError,
    Profile,
    Recorded,
    Requirement,
    Retention,
    Store,
    StoreError,
    StoreTimeoutError,
    Timer,
    TriggerState,
    window_label,
)
from gateway.store.catalog import CatalogChanges, LocalCatalog
from gateway.store.documents import Documents, LocalDocuments
from gateway.store.ledger import ArmTotals, Attributed, Exposure, Ledger, MemoryLedger
from gateway.store.log import FileLog
from gateway.store.memory import DEFAULT_MAX_MB, DEFAULT_MAX_VISITORS, MemoryStore
from gateway.store.redis import RedisStore

__all__ = [
    "EMPTY_PROFILE",
    "PURPOSES",
    "ArmTotals",
    "Attributed",
    "CatalogChanges",
    "Consent",
    "CounterKey",
    "Exposure",
    "Interaction",
    "Ledger",
    "MemoryLedger",
    "MemoryStore",
    "PartlyStoredError",
    "Profile",
    "Recorded",
    "RedisStore",
    "Requirement",
    "Retention",
    "Store",
    "StoreError",
    "StoreTimeoutError",
    "Timer",
    "TriggerState",
    "open_catalog",
    "open_documents",
    "open_ledger",
    "open_store",
    "window_label",
]

_SCHEMES = "memory://, redis://, rediss://, unix://"


def open_store(url: str, *, event_log: str = "", event_log_keep_s: float = 0.0) -> Store:
    """The store the URL names; ValueError for a URL it cannot be. `event_log` is the directory of the
    memory store's event log ("" for none), whose daily files go `event_log_keep_s` after their day
    (0: never); the Redis store logs to a stream in Redis instead (see Retention)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "memory" or not url.strip():
        store = _open_memory(url, parts.netloc, parts.path, parts.query)
        if event_log:
            directory = Path(event_log)
            store = MemoryStore(
                max_visitors=store.max_visitors,
                max_mb=store.max_mb,
                log=FileLog(directory, keep_s=event_log_keep_s),
                audit=FileLog(directory, prefix="consent"),
            )
        return store
    if scheme in ("redis", "rediss", "unix"):
        return _open_redis(parts.scheme, parts.netloc, parts.path, parts.query, parts.fragment)
    raise ValueError(f"store URL {url!r}: unknown scheme {parts.scheme!r}; accepted: {_SCHEMES}")


def _open_memory(url: str, netloc: str, path: str, query: str) -> MemoryStore:
    if netloc or path:
        raise ValueError(f"store URL {url!r}: memory:// takes no host or path, only ?max_mb=M&max_visitors=N")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = options.keys() - {"max_visitors", "max_mb"}
    if unknown:
        raise ValueError(
            f"store URL {url!r}: unknown option(s) {sorted(unknown)}; memory:// accepts max_mb and max_visitors"
        )
    try:
        max_visitors = int(options.get("max_visitors", DEFAULT_MAX_VISITORS))
        max_mb = float(options.get("max_mb", DEFAULT_MAX_MB))
    except ValueError:
        raise ValueError(f"store URL {url!r}: max_visitors must be an integer and max_mb a number") from None
    return MemoryStore(max_visitors=max_visitors, max_mb=max_mb)


def _open_redis(scheme: str, netloc: str, path: str, query: str, fragment: str) -> RedisStore:
    # `prefix` is ours, and redis-py rejects query options it does not know, so take it out first.
    prefix = "tailor:"
    kept: list[str] = []
    for pair in query.split("&") if query else []:
        key, _, value = pair.partition("=")
        if unquote(key) == "prefix":
            prefix = unquote(value)
        else:
            kept.append(pair)
    rebuilt = urlunsplit((scheme, netloc, path, "&".join(kept), fragment))
    if not netloc:  # urlunsplit writes unix:///path as unix:/path, which redis-py 8 refuses
        rebuilt = rebuilt.replace(f"{scheme}:", f"{scheme}://", 1)
    return RedisStore(rebuilt, prefix=prefix)


def open_documents(store: Store, kind: str, directory: str) -> Documents:
    """Versioned documents of `kind` beside `store`: in Redis for a Redis store (shared by every node),
    else in `directory`/`kind` ("" keeps them in memory, lost on restart)."""
    if isinstance(store, RedisStore):
        return store.documents(kind)
    return LocalDocuments(kind, Path(directory) if directory else None)


def open_catalog(store: Store, path: str) -> CatalogChanges:
    """Live catalog changes beside `store`: in Redis for a Redis store (shared by every node), else in
    the file `path` ("" keeps them in memory, lost on restart)."""
    if isinstance(store, RedisStore):
        return store.catalog()
    return LocalCatalog(Path(path) if path else None)


def open_ledger(store: Store) -> Ledger:
    """The experiment ledger beside `store`: in Redis for a Redis store (every node counts into the same
    totals), else in this process."""
    if isinstance(store, RedisStore):
        return store.ledger()
    return MemoryLedger()
