"""Request and object ids."""

from __future__ import annotations

import os
import secrets

# Request ids come from the OS's random bytes like every other id, drawn 256 ids at a time:
# a getrandom() system call per request was a measured 1% of a request's CPU. A forked
# child drops what its parent drew, so the two never hand out the same ids.
_BATCH = 256
_ID_BYTES = 12
_pool: list[str] = []


def _drop_pool() -> None:
    _pool.clear()


os.register_at_fork(after_in_child=_drop_pool)


def request_id() -> str:
    if not _pool:
        raw = os.urandom(_BATCH * _ID_BYTES).hex()
        step = 2 * _ID_BYTES
        _pool.extend("req_" + raw[i : i + step] for i in range(0, len(raw), step))
    return _pool.pop()


def prefixed(prefix: str, nbytes: int = 12) -> str:
    return prefix + secrets.token_hex(nbytes)
