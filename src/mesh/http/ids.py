"""Request and object ids."""

from __future__ import annotations

import os
import secrets
import time

# A request id is its second (8 hex digits) and 64 random bits (16): unique (two requests in
# one second share the random part with odds of 1 in 2**64 per pair), and inserted near the
# end of every index keyed by it (usage records, ledger rows, holds) instead of at a random
# place: at 200,000 usage rows an insert into SQLite took 34 us of CPU with random ids, 9 us
# with these. The random parts come from the OS 256 at a time (a getrandom() system call per
# request was a measured 1% of its CPU); a forked child drops what its parent drew, so the
# two never hand out the same ids.
_BATCH = 256
_RANDOM_BYTES = 8
_pool: list[str] = []


def _drop_pool() -> None:
    _pool.clear()


os.register_at_fork(after_in_child=_drop_pool)


# The current second's prefix (``req_`` and 8 hex digits), formatted once a second, not per id.
_second = -1
_prefix = ""


def request_id() -> str:
    global _second, _prefix
    if not _pool:
        raw = os.urandom(_BATCH * _RANDOM_BYTES).hex()
        step = 2 * _RANDOM_BYTES
        _pool.extend(raw[i : i + step] for i in range(0, len(raw), step))
    now = int(time.time())
    if now != _second:
        _prefix = f"req_{now:08x}"
        _second = now  # after the prefix: whoever sees this second sees its prefix
    return _prefix + _pool.pop()


def prefixed(prefix: str, nbytes: int = 12) -> str:
    return prefix + secrets.token_hex(nbytes)
