"""Who may call what, and how often: API keys with scopes, and a token bucket per client.

Scopes:
- `open`: health, readiness, the API document and the demo page: anyone.
- `public`: what a browser calls (recommend, similar, popular, events, token, consent, stream).
  With keys configured, it needs a public key (the one a site puts in its pages) or an admin key;
  and a public key reaches a visitor's own data only with that visitor's token (`Gateway.acting_for`).
- `admin`: reload, metrics and everything about managing or erasing data. It needs an admin key; a
  public key gets 403.

With no key configured at all the gateway is open (for a demo or a private network) and says so in
its log at start-up. A key comes in `X-Tailor-Key`, `Authorization: Bearer ...`, or, where a browser
cannot set headers (a WebSocket, `sendBeacon`), the `key` query parameter. Keys are compared in
constant time against every configured key.

Rate limits: each client (its key, else its address) has a bucket of `burst` requests refilled at
`per_s` a second; an empty bucket answers 429 with Retry-After. Buckets live in this process (a
bounded LRU), so with N workers a client gets up to N times the rate.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal
from urllib.parse import parse_qsl

Scope = Literal["open", "public", "admin"]
MAX_CLIENTS = 100_000


class AccessError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


def _matches(key: str, keys: Sequence[str]) -> bool:
    found = False
    for candidate in keys:  # every one, whatever matched: the time does not tell which
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


class Access:
    def __init__(
        self,
        *,
        public_keys: Sequence[str] = (),
        admin_keys: Sequence[str] = (),
        rate_per_s: float = 0.0,
        burst: int = 50,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.public_keys = list(public_keys)
        self.admin_keys = list(admin_keys)
        self.enabled = bool(self.public_keys or self.admin_keys)
        self.active = self.enabled or rate_per_s > 0  # else every check is skipped
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._max_clients = max_clients

    def check(self, scope: Scope, key: str | None) -> None:
        """Raise AccessError unless `key` may call a route of `scope`."""
        if scope == "open" or not self.enabled:
            return
        if not key:
            raise AccessError(401, "unauthorized", "this route needs an API key (X-Tailor-Key)", _CHALLENGE)
        admin = _matches(key, self.admin_keys)
        if scope == "admin":
            if admin:
                return
            if _matches(key, self.public_keys):
                raise AccessError(403, "forbidden", "a public key cannot call an admin route")
            raise AccessError(401, "unauthorized", "unknown API key", _CHALLENGE)
        if not admin and not _matches(key, self.public_keys):
            raise AccessError(401, "unauthorized", "unknown API key", _CHALLENGE)

    def is_admin(self, key: str | None) -> bool:
        return bool(key) and _matches(key or "", self.admin_keys)

    def take(self, client: str, now: float) -> None:
        """Take one request from the client's bucket; AccessError 429 when it is empty."""
        if self.rate_per_s <= 0:
            return
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate_per_s)
            raise AccessError(
                429, "rate-limited", f"more than {self.rate_per_s:g} requests/s", {"retry-after": str(wait)}
            )
        self._buckets[client] = (tokens - 1.0, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)


_CHALLENGE = {"www-authenticate": 'Bearer realm="tailor"'}


def key_of(raw_headers: Sequence[tuple[bytes, bytes]], query_string: bytes) -> str | None:
    """The API key a request carries: X-Tailor-Key, a Bearer token, or the `key` query parameter."""
    for name, value in raw_headers:
        if name == b"x-tailor-key":
            return value.decode("latin-1")
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    if b"key=" in query_string:
        pairs: list[tuple[str, str]] = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        for field, text in pairs:
            if field == "key":
                return text
    return None
