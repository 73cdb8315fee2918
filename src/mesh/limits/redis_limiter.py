"""The Redis limiter: the same GCRA buckets and in-flight counts, shared by every gateway.

One Lua script per admission checks every scope and then takes from every scope, so a
refusal takes nothing and two gateways can never both take the last slot; one script per
settlement corrects the token charge and frees the slots. Time is Redis' own clock
(``TIME``), so gateways on hosts with skewed clocks still agree.

Keys (``P`` is ``settings.redis_prefix``; the ``{account}`` hash tag keeps all of one
account's keys in one Redis Cluster slot, so a script may touch them together)::

    P rl:{<account_id>}:key:<key_id>        hash  r, t = requests, tokens in use as of at (ms)
    P rl:{<account_id>}:key:<key_id>:c      zset  lease id -> deadline (ms)
    P rl:{<account_id>}:account             hash  (the same, for the account)
    P rl:{<account_id>}:account:c           zset

A hash expires when its buckets have drained, so idle keys leave nothing behind. A
concurrency slot is a zset member with a deadline :data:`ttl` ahead; the gateway holding
it pushes the deadline forward every ``ttl / 3`` while the request runs, so the slots of
a gateway that crashed free themselves within ``ttl`` seconds.

When Redis cannot be reached the limiter fails open (the request proceeds unlimited, a
warning is logged at most every :data:`WARN_INTERVAL` seconds): credit holds still protect
the money, and an outage of the shared cache should not take the API down. A settlement
that could not reach Redis (and an admission whose answer was lost, which may have taken a
slot) is kept and retried every :data:`RETRY_INTERVAL` seconds, so the slots of requests
that ended during an outage are free as soon as Redis answers again, not ``ttl`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mesh.limits.base import (
    CONCURRENCY_RETRY_AFTER,
    DIMENSIONS,
    Lease,
    LimitExceeded,
    LimitState,
    ScopeUsage,
    Window,
    bucket_window,
    tightest,
)
from mesh.limits.policy import Scope
from mesh.redis_client import redis_client, redis_errors

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
WARN_INTERVAL = 10.0
SOCKET_TIMEOUT = 2.0
RETRY_INTERVAL = 0.5

# Brings a scope's bucket levels to now: the hash's r and t were the levels at ``at``.
_DRAIN = """
local function drain(h, rpm, tpm, now)
  if rpm == 0 and tpm == 0 then return 0, 0 end
  local v = redis.call('HMGET', h, 'r', 't', 'at')
  local elapsed = math.max(0, now - (tonumber(v[3]) or now))
  local r, tk = 0, 0
  if rpm > 0 then r = math.max(0, (tonumber(v[1]) or 0) - elapsed * rpm / 60000) end
  if tpm > 0 then tk = math.max(0, (tonumber(v[2]) or 0) - elapsed * tpm / 60000) end
  return r, tk
end
local function store(h, rpm, tpm, r, tk, now)
  local empty = 0
  if rpm > 0 then empty = r * 60000 / rpm end
  if tpm > 0 then empty = math.max(empty, tk * 60000 / tpm) end
  if empty > 0 then
    redis.call('HSET', h, 'r', string.format('%.17g', r), 't', string.format('%.17g', tk),
               'at', string.format('%.17g', now))
    redis.call('PEXPIRE', h, math.ceil(empty) + 1000)
  else
    redis.call('DEL', h)
  end
end
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
"""

# KEYS: per scope, its hash then its zset. ARGV: tokens, lease id, ttl ms, then per scope
# rpm, tpm, concurrent (0: none), then the wait hint of a full concurrency limit (ms).
# Returns {ok, wait ms, refusing scope, dimension} and, per scope, the request and token
# levels (after the take, or as they are on a refusal; strings, to keep the fractions).
_ACQUIRE = _DRAIN + """
local tokens = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
local n = #KEYS / 2
local conc_wait = tonumber(ARGV[4 + 3 * n])
local wait, who, dim = 0, 0, 0
local rl, tl = {}, {}
for i = 1, n do
  local rpm, tpm, conc = tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2]), tonumber(ARGV[3*i+3])
  rl[i], tl[i] = drain(KEYS[2*i-1], rpm, tpm, now)
  if rpm > 0 and rl[i] + 1 - rpm > 1e-9 then
    local w = (rl[i] + 1 - rpm) * 60000 / rpm
    if w > wait then wait, who, dim = w, i, 1 end
  end
  if tpm > 0 and tl[i] - (tpm - 1) > 1e-9 then
    local w = (tl[i] - (tpm - 1)) * 60000 / tpm
    if w > wait then wait, who, dim = w, i, 2 end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2*i], '-inf', now)
    if redis.call('ZCARD', KEYS[2*i]) >= conc and (who == 0 or conc_wait > wait) then
      wait, who, dim = conc_wait, i, 3
    end
  end
end
if who == 0 then
  for i = 1, n do
    local rpm, tpm, conc = tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2]), tonumber(ARGV[3*i+3])
    if rpm > 0 then rl[i] = rl[i] + 1 end
    if tpm > 0 then tl[i] = tl[i] + tokens end
    if rpm > 0 or tpm > 0 then store(KEYS[2*i-1], rpm, tpm, rl[i], tl[i], now) end
    if conc > 0 then
      redis.call('ZADD', KEYS[2*i], now + ttl, ARGV[2])
      redis.call('PEXPIRE', KEYS[2*i], ttl)
    end
  end
end
local out = {who == 0 and 1 or 0, string.format('%.17g', wait), who, dim}
for i = 1, n do
  out[#out+1] = string.format('%.17g', rl[i])
  out[#out+1] = string.format('%.17g', tl[i])
end
return out
"""

# KEYS: per scope, hash then zset. ARGV: token correction, lease id, then per scope rpm,
# tpm, concurrent (0: none).
_SETTLE = _DRAIN + """
local delta = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  local rpm, tpm, conc = tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2])
  if tpm > 0 and delta ~= 0 then
    local r, tk = drain(KEYS[2*i-1], rpm, tpm, now)
    store(KEYS[2*i-1], rpm, tpm, r, math.max(0, tk + delta), now)
  end
  if conc > 0 then redis.call('ZREM', KEYS[2*i], ARGV[2]) end
end
return 1
"""

# KEYS: per scope, hash then zset. ARGV: per scope rpm, tpm, concurrent (0: none). Takes
# and stores nothing; returns per scope the request and token levels and the live slots.
_PEEK = _DRAIN + """
local out = {}
for i = 1, #KEYS / 2 do
  local rpm, tpm, conc = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local r, tk = drain(KEYS[2*i-1], rpm, tpm, now)
  local live = 0
  if conc > 0 then live = redis.call('ZCOUNT', KEYS[2*i], '(' .. now, '+inf') end
  out[#out+1] = string.format('%.17g', r)
  out[#out+1] = string.format('%.17g', tk)
  out[#out+1] = live
end
return out
"""
# KEYS: the lease's zsets. ARGV: lease id, ttl ms. Moves the lease's deadlines forward.
_REFRESH = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[2])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"""


def scope_key(prefix: str, scope: Scope) -> str:
    """The hash of a scope's buckets; its concurrency zset is this plus ``:c``."""
    tail = "account" if scope.kind == "account" else f"key:{scope.id}"
    return f"{prefix}rl:{{{scope.account_id}}}:{tail}"


class RedisLimiter:
    """:class:`~mesh.limits.base.Limiter` shared by every gateway on one Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mesh:",
        ttl: float = DEFAULT_TTL,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = prefix
        self.ttl = ttl
        self._wall = wall
        self._client: aioredis.Redis = redis_client(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
        )
        self._acquire = self._client.register_script(_ACQUIRE)
        self._settle = self._client.register_script(_SETTLE)
        self._refresh = self._client.register_script(_REFRESH)
        self._peek = self._client.register_script(_PEEK)
        self._live: dict[str, Lease] = {}
        self._task: asyncio.Task[None] | None = None
        # Settlements Redis did not acknowledge: (keys, args) of the settle script, by lease id.
        self._unsettled: dict[str, tuple[list[str], list[Any]]] = {}
        self._retry: asyncio.Task[None] | None = None
        self._warned_at = -WARN_INTERVAL

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_forever(), name="mesh-limits-refresh")

    async def aclose(self) -> None:
        for task in (self._task, self._retry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._retry = None
        if self._unsettled:
            with contextlib.suppress(*redis_errors()):
                await self.retry_unsettled()  # a last try; the slots' deadlines cover the rest
        await self._client.aclose()

    def _keys(self, scopes: Sequence[Scope]) -> list[str]:
        keys: list[str] = []
        for s in scopes:
            h = scope_key(self.prefix, s)
            keys += (h, h + ":c")
        return keys

    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Lease:
        lease = Lease(scopes=tuple(scopes), tokens=tokens, state=None, id=secrets.token_hex(8))
        args: list[Any] = [tokens, lease.id, int(self.ttl * 1000)]
        for s in scopes:
            args += (s.limits.rpm or 0, s.limits.tpm or 0, s.limits.concurrent or 0)
        args.append(int(CONCURRENCY_RETRY_AFTER * 1000))
        try:
            out = await self._acquire(keys=self._keys(scopes), args=args)
        except redis_errors() as exc:
            self._warn("rate limits not enforced: Redis unavailable (%s)", exc)
            if lease.concurrent:
                # The script may have run with its answer lost: free the slot it may hold.
                self._keep(lease.id, self._keys(scopes), [0, lease.id, *self._limit_args(scopes)])
            lease.scopes = ()
            lease.done = True
            return lease
        except asyncio.CancelledError:
            # Cut short (the client hung up while Redis was asked): the script may have run
            # and taken a slot nobody will settle, which would block the key until its TTL.
            if lease.concurrent:
                self._keep(lease.id, self._keys(scopes), [0, lease.id, *self._limit_args(scopes)])
            raise
        ok, wait, who, dim = int(out[0]), float(out[1]) / 1000, int(out[2]), int(out[3])
        state = self._state(scopes, [float(x) for x in out[4:]])
        if not ok:
            scope = scopes[who - 1]
            dimension = DIMENSIONS[dim - 1]
            limit = {"requests": scope.limits.rpm, "tokens": scope.limits.tpm}.get(dimension, scope.limits.concurrent)
            raise LimitExceeded(scope, dimension, int(limit or 0), wait, state)
        lease.state = state
        if lease.concurrent:
            self._live[lease.id] = lease
        return lease

    async def peek(self, scopes: Sequence[Scope]) -> list[ScopeUsage | None]:
        if not scopes:
            return []
        try:
            out = await self._peek(keys=self._keys(scopes), args=self._limit_args(scopes))
        except redis_errors() as exc:
            self._warn("could not read rate-limit usage from Redis (%s)", exc)
            return [None] * len(scopes)
        return [
            ScopeUsage(
                requests=None if s.limits.rpm is None else float(out[3 * i]),
                tokens=None if s.limits.tpm is None else float(out[3 * i + 1]),
                concurrent=None if s.limits.concurrent is None else int(out[3 * i + 2]),
            )
            for i, s in enumerate(scopes)
        ]

    async def settle(self, lease: Lease, tokens: int) -> None:
        await self._finish(lease, tokens - lease.tokens)

    async def release(self, lease: Lease) -> None:
        await self._finish(lease, 0)

    async def _finish(self, lease: Lease, delta: int) -> None:
        if lease.done:
            return
        lease.done = True
        self._live.pop(lease.id, None)
        args: list[Any] = [delta, lease.id, *self._limit_args(lease.scopes)]
        needed = delta != 0 and any(s.limits.tpm for s in lease.scopes)
        if not (needed or lease.concurrent):
            return
        keys = self._keys(lease.scopes)
        try:
            await self._settle(keys=keys, args=args)
        except redis_errors() as exc:
            self._warn("could not settle rate limits on Redis (%s); retrying", exc)
            self._keep(lease.id, keys, args)
        except asyncio.CancelledError:
            # The lease is no longer refreshed: settled by the retry, not left to its TTL.
            self._keep(lease.id, keys, args)
            raise

    @staticmethod
    def _limit_args(scopes: Sequence[Scope]) -> list[Any]:
        args: list[Any] = []
        for s in scopes:
            args += (s.limits.rpm or 0, s.limits.tpm or 0, s.limits.concurrent or 0)
        return args

    def _keep(self, lease_id: str, keys: list[str], args: list[Any]) -> None:
        """Remember a settlement Redis did not take, and make sure it is retried."""
        self._unsettled[lease_id] = (keys, args)
        if self._retry is None or self._retry.done():
            self._retry = asyncio.get_running_loop().create_task(self._retry_until_done(), name="mesh-limits-retry")

    async def retry_unsettled(self) -> int:
        """Send the kept settlements again; returns how many Redis took. Raises if Redis is
        still unreachable. Freeing a slot is idempotent (a ZREM); a token correction whose
        first answer was lost may apply twice, an error bounded by one request's tokens in
        a window that drains within a minute."""
        done = 0
        for lease_id, (keys, args) in list(self._unsettled.items()):
            await self._settle(keys=keys, args=args)
            del self._unsettled[lease_id]
            done += 1
        return done

    async def _retry_until_done(self) -> None:
        while self._unsettled:
            await asyncio.sleep(RETRY_INTERVAL)
            try:
                await self.retry_unsettled()
            except redis_errors() as exc:
                self._warn("could not settle rate limits on Redis (%s); retrying", exc)

    def _state(self, scopes: Sequence[Scope], levels: Sequence[float]) -> LimitState:
        requests: list[Window] = []
        tokens: list[Window] = []
        for i, s in enumerate(scopes):
            if s.limits.rpm is not None:
                requests.append(bucket_window(s.limits.rpm, levels[2 * i]))
            if s.limits.tpm is not None:
                tokens.append(bucket_window(s.limits.tpm, levels[2 * i + 1]))
        return LimitState(requests=tightest(requests), tokens=tightest(tokens), at=self._wall())

    async def refresh(self) -> int:
        """Push the deadlines of this process's live slots forward; returns how many leases."""
        leases = [lease for lease in self._live.values() if not lease.done]
        if not leases:
            return 0
        ttl_ms = int(self.ttl * 1000)
        async with self._client.pipeline(transaction=False) as pipe:
            for lease in leases:
                zsets = [k for s, k in zip(lease.scopes, self._keys(lease.scopes)[1::2], strict=True)
                         if s.limits.concurrent is not None]
                await self._refresh(keys=zsets, args=[lease.id, ttl_ms], client=pipe)
            await pipe.execute()
        return len(leases)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except redis_errors() as exc:
                self._warn("could not refresh concurrency slots on Redis (%s)", exc)

    def _warn(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning(message, exc)
