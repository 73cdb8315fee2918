"""Authenticating API keys on the hot path, and revoking them.

``KeyAuthenticator.authenticate(raw_key)`` answers from an in-process cache (key hash →
principal, :data:`CACHE_TTL` seconds; unknown keys for :data:`NEGATIVE_TTL` seconds), so
a request with a known key costs no database round trip. Concurrent misses for the same
key share one lookup. ``revoke(key_id)`` marks the key revoked, drops it from this
process's cache at once and tells other processes through the invalidator (Redis pub/sub
when configured). ``last_used_at`` is written in batches by a background task, at most
once per :data:`TOUCH_INTERVAL` per key.

The principal carries the key's and its account's effective rate limits, read with the
key in the same query; :meth:`KeyAuthenticator.key_changed` and
:meth:`KeyAuthenticator.account_changed` drop the cached copies everywhere when the
operator changes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update

from mesh.accounts.invalidation import (
    ALL_KEYS,
    INVALIDATION_CHANNEL,
    KeyCacheInvalidator,
    LocalInvalidator,
    RedisInvalidator,
)
from mesh.accounts.keys import KEY_LENGTH, hash_key, well_formed
from mesh.accounts.principal import Principal
from mesh.billing.money import MicroCredits
from mesh.config import LimitsConfig
from mesh.errors import AuthenticationFailed, NotFound
from mesh.limits.policy import principal_scopes
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys

CACHE_TTL = 30.0
NEGATIVE_TTL = 5.0
TOUCH_INTERVAL = 60.0
MAX_CACHE_ENTRIES = 100_000

MISSING = "Missing API key"
INVALID = "Invalid API key"
EXPIRED = "API key expired"
REVOKED = "API key revoked"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal | None
    error: str | None
    until: float


class KeyAuthenticator:
    """Turns a raw Bearer key into a :class:`Principal`, or raises ``AuthenticationFailed``.

    Call :meth:`start` to run the background tasks (invalidation listener, ``last_used_at``
    writer) and :meth:`aclose` to stop them; :meth:`authenticate` works without them.
    """

    def __init__(
        self,
        db: Database,
        *,
        redis_url: str | None = None,
        channel: str = INVALIDATION_CHANNEL,
        ttl: float = CACHE_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        touch_interval: float = TOUCH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.db = db
        self._limits = limits or LimitsConfig()
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._touch_interval = touch_interval
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._hash_by_key_id: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._generation = 0
        self._touch_pending: dict[str, datetime] = {}
        self._touched_at: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.invalidator: KeyCacheInvalidator = (
            RedisInvalidator(redis_url, self.invalidate, channel=channel) if redis_url else LocalInvalidator()
        )

    async def start(self) -> None:
        """Start listening for invalidations and writing ``last_used_at`` in the background."""
        await self.invalidator.start()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="mesh-key-last-used")

    async def aclose(self) -> None:
        """Stop the background tasks and write any pending ``last_used_at``."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        for task in list(self._inflight.values()):
            task.cancel()
        await self.flush_last_used()
        await self.invalidator.aclose()

    async def authenticate(self, raw_key: str | None) -> Principal:
        """The principal for ``raw_key``.

        Raises ``AuthenticationFailed`` with "Missing API key", "Invalid API key",
        "API key expired" or "API key revoked"; the key itself is never echoed.
        """
        if not raw_key:
            raise AuthenticationFailed(MISSING)
        if len(raw_key) != KEY_LENGTH:  # before hashing it: any length may come
            raise AuthenticationFailed(INVALID)
        key_hash = hash_key(raw_key)
        now = self._clock()
        entry = self._cache.get(key_hash)
        # Only a well-formed key is ever looked up, so a cached entry's key was well formed (its
        # hash is this key's): the shape is checked on a miss, not on every request.
        if entry is None or entry.until <= now:
            if not well_formed(raw_key):
                raise AuthenticationFailed(INVALID)
            entry = await self._lookup(key_hash)
        principal = entry.principal
        if principal is None:
            raise AuthenticationFailed(entry.error or INVALID)
        if principal.expires_at is not None and principal.expires_at <= utcnow():
            raise AuthenticationFailed(EXPIRED)
        if now - self._touched_at.get(principal.key_id, -self._touch_interval) >= self._touch_interval:
            self._touched_at[principal.key_id] = now
            self._touch_pending[principal.key_id] = utcnow()
        return principal

    def invalidate(self, key_id: str) -> None:
        """Drop ``key_id`` (or every key, for ``"*"``) from this process's cache now."""
        self._generation += 1
        if key_id == ALL_KEYS:
            self._cache.clear()
            self._hash_by_key_id.clear()
            return
        key_hash = self._hash_by_key_id.pop(key_id, None)
        if key_hash is not None:
            self._cache.pop(key_hash, None)

    async def revoke(self, key_id: str) -> bool:
        """Revoke the key everywhere. ``True`` if it was active, ``False`` if already revoked.

        Raises ``NotFound`` (code ``key_not_found``) for an unknown key. Other processes
        drop it at once when Redis is configured, otherwise within :data:`CACHE_TTL`.
        """
        async with self.db.write() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            changed = result.rowcount > 0
            if not changed:
                found = await conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id))
                if found.first() is None:
                    raise NotFound(f"API key {key_id!r} not found", code="key_not_found")
        self.invalidate(key_id)
        await self.invalidator.publish(key_id)
        return changed

    async def key_changed(self, key_id: str) -> None:
        """The key's row changed (its limits, say): drop it here now and tell the others."""
        self.invalidate(key_id)
        await self.invalidator.publish(key_id)

    async def account_changed(self, account_id: str) -> int:
        """The account changed (its limits): drop all of its keys here and everywhere.
        Returns how many keys were dropped."""
        async with self.db.read() as conn:
            ids = list((await conn.execute(select(api_keys.c.id).where(api_keys.c.account_id == account_id))).scalars())
        for key_id in ids:
            await self.key_changed(key_id)
        return len(ids)

    async def flush_last_used(self) -> int:
        """Write the pending ``last_used_at`` stamps in one transaction; returns how many."""
        if not self._touch_pending:
            return 0
        pending, self._touch_pending = self._touch_pending, {}
        stmt = update(api_keys).where(api_keys.c.id == bindparam("kid")).values(last_used_at=bindparam("used_at"))
        try:
            async with self.db.write() as conn:
                await conn.execute(stmt, [{"kid": k, "used_at": t} for k, t in pending.items()])
        except Exception:
            for k, t in pending.items():
                self._touch_pending.setdefault(k, t)
            raise
        return len(pending)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._touch_interval)
            try:
                await self.flush_last_used()
            except Exception:
                log.exception("could not write last_used_at; will retry")

    async def _lookup(self, key_hash: str) -> _Entry:
        task = self._inflight.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._load(key_hash))
            self._inflight[key_hash] = task
            task.add_done_callback(lambda t: self._lookup_done(key_hash, t))
        return await asyncio.shield(task)

    def _lookup_done(self, key_hash: str, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key_hash) is task:
            del self._inflight[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved here so a lookup nobody awaits any more logs nothing

    async def _load(self, key_hash: str) -> _Entry:
        generation = self._generation
        async with self.db.read() as conn:
            query = (
                select(api_keys, accounts.c.rate_limits.label("account_rate_limits"))
                .join(accounts, accounts.c.id == api_keys.c.account_id)
                .where(api_keys.c.key_hash == key_hash)
            )
            row = (await conn.execute(query)).first()
        now = self._clock()
        if row is None:
            entry = _Entry(None, INVALID, now + self._negative_ttl)
        elif row.revoked_at is not None:
            entry = _Entry(None, REVOKED, now + self._ttl)
        else:
            models = row.allowed_models
            principal = Principal(
                account_id=row.account_id,
                key_id=row.id,
                allowed_models=None if models is None else frozenset(models),
                expires_at=row.expires_at,
                spend_limit=None if row.spend_limit is None else MicroCredits(row.spend_limit),
                user_budget=None if row.user_budget is None else MicroCredits(row.user_budget),
                limits=principal_scopes(
                    row.id, row.account_id, row.rate_limits, row.account_rate_limits,
                    self._limits.key, self._limits.account,
                ),
            )
            entry = _Entry(principal, None, now + self._ttl)
        # An invalidation that arrived while we read may concern this very key: then the row
        # we read can be stale, so answer this call with it but do not cache it.
        if generation == self._generation:
            self._store(key_hash, entry, None if row is None else row.id)
        return entry

    def _store(self, key_hash: str, entry: _Entry, key_id: str | None) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            now = self._clock()
            self._cache = {h: e for h, e in self._cache.items() if e.principal is not None and e.until > now}
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
                self._hash_by_key_id.clear()
        self._cache[key_hash] = entry
        if key_id is not None:
            self._hash_by_key_id[key_id] = key_hash
