"""Keys and pseudonyms: what lets the gateway store behaviour without storing who it was.

Every user or visitor id a request names becomes a pseudonym before it reaches the store, the event
log or a log line: `p_` + the first 24 bytes of HMAC-SHA256(pseudonym key, id), base64url (32
characters). The same id always gets the same pseudonym under the same key, on every node, so
state is shared and erasure finds it; without the key nobody can tell whose it is, nor (for ids
that are not guessable) compute it. Snapshots built from the gateway's event log name their users
by pseudonym too, and the gateway looks a user up by both (see Recommender.recommend).

Keys: `secret` signs visitor tokens; `pseudonym_key` keys the pseudonyms and, when not set, is
derived from `secret`. With no `secret` either, both come from a random master secret kept in
`secret_file` (created, mode 0600, on first use), so a fresh install is safe and survives restarts
without any configuration; several hosts must then share that file. Changing the pseudonym key
makes every stored visitor a stranger (their state is still there, under names nobody asks for,
until it expires): set `pseudonym_key` before you rotate `secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from gateway import settings as config

log = logging.getLogger("tailor.gateway")

PREFIX = "p_"
CACHE_MAX = 100_000


class SecretFileError(OSError):
    """The secret file cannot be read or created."""


def master_secret(path: Path) -> bytes:
    """The random master secret in `path`, created (mode 0600) when missing."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker made it first
        return _read(path)
    except OSError as exc:
        raise SecretFileError(f"cannot create secret file {path}: {exc}") from exc
    with os.fdopen(handle, "w") as out:
        out.write(secrets.token_urlsafe(48) + "\n")
    log.warning(
        "created a new secret in %s: keep it, and share it between hosts (or set secret and pseudonym_key)", path
    )
    return _read(path)


def _read(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {path}: {exc}") from exc
    if len(text) < 16:
        raise SecretFileError(f"secret file {path} holds fewer than 16 characters")
    return text.encode()


def derive(master: bytes, purpose: str) -> bytes:
    return hmac.digest(master, f"tailor/{purpose}/v1".encode(), "sha256")


def keys(settings: config.Settings) -> tuple[bytes, bytes]:
    """(token signing key, pseudonym key) as the settings give them."""
    if settings.secret:
        master = token_key = settings.secret.encode()
    else:
        master = master_secret(Path(settings.secret_file))
        token_key = derive(master, "tokens")
    return token_key, settings.pseudonym_key.encode() or derive(master, "pseudonyms")


class Pseudonyms:
    """id -> pseudonym, with the most recent ones cached.

    The HMAC is computed from two SHA-256 states keyed once (RFC 2104's inner and outer pads):
    copying them costs 0.6 µs a pseudonym where hmac.digest, which keys OpenSSL anew on every
    call, costs 1.5 µs alone and more inside a request, where it is on every read and write.
    tests/test_privacy_keys.py checks the result equals hmac.digest's."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("an empty key pseudonymises nothing")
        block = hashlib.sha256().block_size
        padded = (hashlib.sha256(key).digest() if len(key) > block else key).ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        self._cache: dict[str, str] = {}

    def __call__(self, raw: str) -> str:
        known = self._cache.get(raw)
        if known is not None:
            return known
        inner = self._inner.copy()
        inner.update(raw.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        name = PREFIX + base64.urlsafe_b64encode(outer.digest()[:24]).decode()
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[raw] = name
        return name
