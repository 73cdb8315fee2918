"""API key material: generation, hashing and the cheap shape check.

A key is ``sk-mesh-`` followed by the unpadded urlsafe base64 of 32 random bytes
(256 bits). Only its SHA-256 and its first 12 characters (the prefix shown in listings)
are stored. With that much entropy a fast hash is the right choice: a slow password hash
would add latency to every request and buy nothing.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

KEY_SCHEME = "sk-mesh-"
KEY_BYTES = 32
KEY_LENGTH = len(KEY_SCHEME) + 43  # 32 bytes → 43 base64 characters without padding
PREFIX_LENGTH = 12
# One C-level match per request, not a Python loop over 43 characters.
_SHAPE = re.compile(re.escape(KEY_SCHEME) + r"[A-Za-z0-9_-]{43}")


def generate_key() -> str:
    """A fresh random API key (shown to its owner once, never stored)."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode("ascii")
    return KEY_SCHEME + body


def hash_key(raw_key: str) -> str:
    """The stored form of a key: lowercase hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def key_prefix(raw_key: str) -> str:
    """The part of a key that listings show: its first 12 characters."""
    return raw_key[:PREFIX_LENGTH]


def well_formed(raw_key: str) -> bool:
    """Whether the text could be a Mesh key at all (checked before any lookup)."""
    return len(raw_key) == KEY_LENGTH and _SHAPE.fullmatch(raw_key) is not None


def new_id(kind: str) -> str:
    """A public identifier such as ``acct_3f9a…`` or ``key_…`` (96 random bits)."""
    return f"{kind}_{secrets.token_hex(12)}"
