"""Signed, expiring stream tokens: what lets a browser's WebSocket receive one visitor's updates.

A token is `v1.<visitor, base64url>.<expires, Unix seconds>.<signature, base64url>`, where the
signature is HMAC-SHA256 over `v1.<visitor>.<expires>` with the server secret. The visitor id is
inside the signed part, so a token minted for visitor A cannot be turned into one for B, and the
gateway never has to look anything up to check one.

Who mints them:

- a site's backend, for its signed-in users, with `tailor token --visitor ID` or `mint()` (it knows
  the secret, the browser never does);
- the gateway itself, for anonymous visitors, at `POST /v1/token`: there it makes up a fresh visitor
  id, so nobody can obtain a token for an id they chose (for instance somebody else's).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time

VERSION = "v1"
MAX_VISITOR_LENGTH = 256


class TokenError(Exception):
    """A token that must be refused; `code` says why in a machine-readable way."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest())


def mint(secret: bytes, visitor: str, ttl_s: float, *, now: float | None = None) -> str:
    """A token for `visitor` that expires `ttl_s` seconds from `now`."""
    if not secret:
        raise ValueError("an empty secret signs nothing")
    if not visitor or len(visitor) > MAX_VISITOR_LENGTH:
        raise ValueError(f"visitor id must be 1-{MAX_VISITOR_LENGTH} characters")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, not {ttl_s}")
    expires = int((time.time() if now is None else now) + ttl_s)
    signed = f"{VERSION}.{_b64(visitor.encode())}.{expires}"
    return f"{signed}.{_signature(secret, signed)}"


def verify(secret: bytes, token: str, *, now: float | None = None, grace_s: float = 0.0) -> tuple[str, int]:
    """The visitor id and expiry (Unix seconds) of a valid token; TokenError otherwise. With
    `grace_s`, a token expired less than that long ago still passes (for renewing it)."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION:
        raise TokenError("bad-token", "not a stream token")
    signed = ".".join(parts[:3])
    if not hmac.compare_digest(_signature(secret, signed), parts[3]):
        raise TokenError("bad-token", "signature does not match")
    try:
        visitor = _unb64(parts[1]).decode()
        expires = int(parts[2])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise TokenError("bad-token", "malformed token") from None
    if expires + grace_s <= (time.time() if now is None else now):
        raise TokenError("expired-token", "token expired; ask for a new one")
    return visitor, expires


def new_visitor_id() -> str:
    """A fresh anonymous visitor id: 128 random bits, unguessable."""
    return "anon-" + secrets.token_urlsafe(16)
