"""Redis for gateway processes: skip (or, in CI, fail) when it is down, and a namespace per run."""

from __future__ import annotations

import asyncio
import secrets

import pytest

import conftest_db


def require_redis(request: pytest.FixtureRequest) -> str:
    """The Redis URL for a sync (e.g. module-scoped) fixture, with ``redis_url``'s skip rules."""
    if not asyncio.run(conftest_db._redis_up()):
        conftest_db._unavailable(request, conftest_db.REDIS_SKIP_REASON)
    return conftest_db.REDIS_URL


def unique_prefix() -> str:
    """A ``redis_prefix`` no other test run uses: its keys and channels are its own."""
    return f"mesh-test-{secrets.token_hex(6)}:"
