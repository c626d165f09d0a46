"""Signed, encrypted, expiring visitor tokens: what lets a browser act for one visitor (its stream,
consent and events).

A token is `v2.<nonce and sealed payload, base64url>`: the expiry (8 bytes, Unix seconds) and the
visitor id, sealed with AES-256-GCM (the `cryptography` package) under a key derived from the token
key (the server secret), with a random 12-byte nonce and `v2` as associated data. Only the gateway
can read a token or make one: the browser, the logs and anything in between see an opaque string
that differs on every mint, even for the same visitor (only its length follows the id's). A token
minted for visitor A cannot be turned into one for B, and the gateway never has to look anything up
to check one.

v1 tokens (`v1.<visitor, base64url>.<expires>.<sig>`) carried the visitor id readable by anyone;
they are refused as `bad-token`, and the browser snippet then asks for a new one.

Who mints them:

- a site's backend, for its signed-in users, with `tailor token --visitor ID` or `mint()` (it knows
  the secret, the browser never does);
- the gateway itself, for anonymous visitors, at `POST /v1/token`: there it makes up a fresh visitor
  id, so nobody can obtain a token for an id they chose (for instance somebody else's).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import secrets
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "v2"
MAX_VISITOR_LENGTH = 256
_NONCE = 12  # AES-GCM's standard nonce; random per token (2^-32 collision odds only after 2^32 tokens per key)
_EXPIRES = 8


class TokenError(Exception):
    """A token that must be refused; `code` says why in a machine-readable way."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=8)
def _cipher(secret: bytes) -> AESGCM:
    """The token cipher, its key derived from the secret for this use alone."""
    return AESGCM(hmac.digest(secret, b"tailor/token/v2", "sha256"))


def mint(secret: bytes, visitor: str, ttl_s: float, *, now: float | None = None) -> str:
    """A token for `visitor` that expires `ttl_s` seconds from `now`."""
    if not secret:
        raise ValueError("an empty secret signs nothing")
    if not visitor or len(visitor) > MAX_VISITOR_LENGTH:
        raise ValueError(f"visitor id must be 1-{MAX_VISITOR_LENGTH} characters")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, not {ttl_s}")
    expires = int((time.time() if now is None else now) + ttl_s)
    nonce = secrets.token_bytes(_NONCE)
    sealed = _cipher(secret).encrypt(nonce, expires.to_bytes(_EXPIRES, "big") + visitor.encode(), VERSION.encode())
    return f"{VERSION}.{_b64(nonce + sealed)}"


def verify(secret: bytes, token: str, *, now: float | None = None, grace_s: float = 0.0) -> tuple[str, int]:
    """The visitor id and expiry (Unix seconds) of a valid token; TokenError otherwise. With
    `grace_s`, a token expired less than that long ago still passes (for renewing it)."""
    parts = token.split(".")
    if parts[0] == "v1" and len(parts) == 4:
        raise TokenError("bad-token", "a v1 token (it shows the visitor id) is no longer accepted; ask for a new one")
    if len(parts) != 2 or parts[0] != VERSION:
        raise TokenError("bad-token", "not a visitor token")
    try:
        payload = _unb64(parts[1])
    except (binascii.Error, ValueError):
        raise TokenError("bad-token", "malformed token") from None
    try:
        plain = _cipher(secret).decrypt(payload[:_NONCE], payload[_NONCE:], VERSION.encode())
    except (InvalidTag, ValueError):
        raise TokenError("bad-token", "signature does not match") from None
    try:
        if len(plain) <= _EXPIRES:
            raise ValueError("no visitor")
        expires = int.from_bytes(plain[:_EXPIRES], "big")
        visitor = plain[_EXPIRES:].decode()
    except (UnicodeDecodeError, ValueError):
        raise TokenError("bad-token", "malformed token") from None
    if expires + grace_s <= (time.time() if now is None else now):
        raise TokenError("expired-token", "token expired; ask for a new one")
    return visitor, expires


def new_visitor_id() -> str:
    """A fresh anonymous visitor id: 128 random bits, unguessable."""
    return "anon-" + secrets.token_urlsafe(16)
