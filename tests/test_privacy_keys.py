"""Pseudonyms: RFC 2104 HMAC-SHA256 from precomputed pads, the same as the standard library's."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from gateway.privacy import keys as privacy


def expected(key: bytes, raw: str) -> str:
    digest = hmac.digest(key, raw.encode(), hashlib.sha256)
    return privacy.PREFIX + base64.urlsafe_b64encode(digest[:24]).decode()


@given(key=st.binary(min_size=1, max_size=200), raw=st.text(max_size=300))
def test_a_pseudonym_is_the_hmac_of_the_id(key: bytes, raw: str) -> None:
    """Keys shorter than, as long as and longer than SHA-256's 64-byte block (hashed first)."""
    pseudonyms = privacy.Pseudonyms(key)
    assert pseudonyms(raw) == expected(key, raw)
    assert pseudonyms(raw) == expected(key, raw)  # from the cache now


def test_a_pseudonym_has_the_documented_form() -> None:
    name = privacy.Pseudonyms(b"k" * 64)("user-1")
    assert name == expected(b"k" * 64, "user-1")
    assert name.startswith("p_")
    assert len(name) == 34


def test_different_keys_give_different_pseudonyms() -> None:
    assert privacy.Pseudonyms(b"one")("user-1") != privacy.Pseudonyms(b"two")("user-1")
