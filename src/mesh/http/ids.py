"""Request and object ids."""

from __future__ import annotations

import secrets


def request_id() -> str:
    return "req_" + secrets.token_hex(12)


def prefixed(prefix: str, nbytes: int = 12) -> str:
    return prefix + secrets.token_hex(nbytes)
