"""The in-process limiter: token buckets and in-flight counts in a dict, for one gateway.

Everything happens between two awaits on one event loop, so no lock is needed: a check
and the take that follows it can never interleave with another request's. The buckets
follow :mod:`mesh.limits.base`; a bucket that has drained empty and has nothing in
flight is forgotten at the next sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from mesh.limits.base import (
    CONCURRENCY_RETRY_AFTER,
    WINDOW,
    Lease,
    LimitExceeded,
    LimitState,
    ScopeUsage,
    Window,
    bucket_window,
    tightest,
)
from mesh.limits.policy import RateLimits, Scope

SWEEP_INTERVAL = 60.0  # seconds between drops of empty, idle buckets
_EPS = 1e-9


@dataclass(slots=True)
class _Bucket:
    requests: float = 0.0  # units in use as of ``at``
    tokens: float = 0.0
    at: float = 0.0
    empty_at: float = 0.0  # when both buckets will have drained
    inflight: int = 0

    def drain(self, limits: RateLimits, now: float) -> None:
        """Bring the levels to ``now`` (a dimension without a limit holds nothing)."""
        elapsed = max(0.0, now - self.at)
        self.requests = 0.0 if limits.rpm is None else max(0.0, self.requests - elapsed * limits.rpm / WINDOW)
        self.tokens = 0.0 if limits.tpm is None else max(0.0, self.tokens - elapsed * limits.tpm / WINDOW)
        self.at = now

    def mark(self, limits: RateLimits, now: float) -> None:
        empty = 0.0
        if limits.rpm is not None:
            empty = self.requests * WINDOW / limits.rpm
        if limits.tpm is not None:
            empty = max(empty, self.tokens * WINDOW / limits.tpm)
        self.empty_at = now + empty


class MemoryLimiter:
    """:class:`~mesh.limits.base.Limiter` for a single process (no Redis configured)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._buckets: dict[str, _Bucket] = {}
        self._swept_at = clock()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)

    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Lease:
        now = self._clock()
        self._maybe_sweep(now)
        buckets = [self._buckets.get(s.name) or _Bucket(at=now) for s in scopes]
        refusal: tuple[float, Scope, str, int] | None = None
        for scope, b in zip(scopes, buckets, strict=True):
            lim = scope.limits
            b.drain(lim, now)  # only brings the state up to date: takes nothing
            # The longest wait of any dimension of any scope is the refusal (nothing is
            # allocated on the common path, where every check passes).
            if lim.rpm is not None and b.requests + 1 - lim.rpm > _EPS:
                wait = (b.requests + 1 - lim.rpm) * WINDOW / lim.rpm
                if refusal is None or wait > refusal[0]:
                    refusal = (wait, scope, "requests", lim.rpm)
            if lim.tpm is not None and b.tokens - (lim.tpm - 1) > _EPS:
                wait = (b.tokens - (lim.tpm - 1)) * WINDOW / lim.tpm
                if refusal is None or wait > refusal[0]:
                    refusal = (wait, scope, "tokens", lim.tpm)
            if lim.concurrent is not None and b.inflight >= lim.concurrent:
                if refusal is None or CONCURRENCY_RETRY_AFTER > refusal[0]:
                    refusal = (CONCURRENCY_RETRY_AFTER, scope, "concurrent", lim.concurrent)
        if refusal is not None:
            wait, scope, dim, limit = refusal
            raise LimitExceeded(scope, dim, limit, wait, self._state(scopes, buckets))
        for scope, b in zip(scopes, buckets, strict=True):
            lim = scope.limits
            if lim.rpm is not None:
                b.requests += 1
            if lim.tpm is not None:
                b.tokens += tokens
            if lim.concurrent is not None:
                b.inflight += 1
            b.mark(lim, now)
            self._buckets[scope.name] = b
        return Lease(scopes=tuple(scopes), tokens=tokens, state=self._state(scopes, buckets))

    async def settle(self, lease: Lease, tokens: int) -> None:
        if lease.done:
            return
        lease.done = True
        now = self._clock()
        delta = tokens - lease.tokens
        for scope in lease.scopes:
            lim = scope.limits
            b = self._buckets.get(scope.name)
            if lim.tpm is not None and delta != 0 and (b is not None or delta > 0):
                if b is None:
                    b = self._buckets[scope.name] = _Bucket(at=now)
                b.drain(lim, now)
                b.tokens = max(0.0, b.tokens + delta)
                b.mark(lim, now)
            if lim.concurrent is not None and b is not None:
                b.inflight = max(0, b.inflight - 1)

    async def release(self, lease: Lease) -> None:
        if lease.done:
            return
        lease.done = True
        for scope in lease.scopes:
            b = self._buckets.get(scope.name)
            if scope.limits.concurrent is not None and b is not None:
                b.inflight = max(0, b.inflight - 1)

    async def peek(self, scopes: Sequence[Scope]) -> list[ScopeUsage | None]:
        now = self._clock()
        out: list[ScopeUsage | None] = []
        for scope in scopes:
            lim = scope.limits
            found = self._buckets.get(scope.name)
            b = _Bucket(at=now) if found is None else replace(found)  # drained as a copy: nothing taken
            b.drain(lim, now)
            out.append(ScopeUsage(
                requests=None if lim.rpm is None else b.requests,
                tokens=None if lim.tpm is None else b.tokens,
                concurrent=None if lim.concurrent is None else b.inflight,
            ))
        return out

    def _state(self, scopes: Sequence[Scope], buckets: Sequence[_Bucket]) -> LimitState:
        requests: list[Window] = []
        tokens: list[Window] = []
        for scope, b in zip(scopes, buckets, strict=True):
            if scope.limits.rpm is not None:
                requests.append(bucket_window(scope.limits.rpm, b.requests))
            if scope.limits.tpm is not None:
                tokens.append(bucket_window(scope.limits.tpm, b.tokens))
        return LimitState(requests=tightest(requests), tokens=tightest(tokens), at=self._wall())

    def _maybe_sweep(self, now: float) -> None:
        """Forget buckets that have drained and hold no slot: a new one would be the same."""
        if now - self._swept_at < SWEEP_INTERVAL:
            return
        self._swept_at = now
        self._buckets = {name: b for name, b in self._buckets.items() if b.inflight > 0 or b.empty_at > now}
