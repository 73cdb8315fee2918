"""The in-process limiter: token buckets and in-flight counts in a dict, for one gateway.

Everything happens between two awaits on one event loop, so no lock is needed: a check
and the take that follows it can never interleave with another request's. The buckets
follow :mod:`mesh.limits.base`; a bucket that has drained empty and has nothing in
flight is forgotten at the next sweep.
"""

from __future__ import annotations

import math
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

    # Conditionals, not max(): these run for every scope of every request.
    def drain(self, limits: RateLimits, now: float) -> None:
        """Bring the levels to ``now`` (a dimension without a limit holds nothing)."""
        elapsed = now - self.at
        if elapsed < 0.0:
            elapsed = 0.0
        rpm, tpm = limits.rpm, limits.tpm
        if rpm is None:
            self.requests = 0.0
        else:
            level = self.requests - elapsed * rpm / WINDOW
            self.requests = level if level > 0.0 else 0.0
        if tpm is None:
            self.tokens = 0.0
        else:
            level = self.tokens - elapsed * tpm / WINDOW
            self.tokens = level if level > 0.0 else 0.0
        self.at = now

    def mark(self, limits: RateLimits, now: float) -> None:
        empty = 0.0
        if limits.rpm is not None:
            empty = self.requests * WINDOW / limits.rpm
        if limits.tpm is not None:
            drained = self.tokens * WINDOW / limits.tpm
            if drained > empty:
                empty = drained
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
        if now - self._swept_at >= SWEEP_INTERVAL:
            self._sweep(now)
        get = self._buckets.get
        buckets = [get(s.name) or _Bucket(at=now) for s in scopes]
        refusal: tuple[float, Scope, str, int] | None = None
        for scope, b in zip(scopes, buckets, strict=True):
            lim = scope.limits
            rpm, tpm = lim.rpm, lim.tpm
            b.drain(lim, now)  # only brings the state up to date: takes nothing
            # The longest wait of any dimension of any scope is the refusal (nothing is
            # allocated on the common path, where every check passes).
            if rpm is not None and b.requests + 1 - rpm > _EPS:
                wait = (b.requests + 1 - rpm) * WINDOW / rpm
                if refusal is None or wait > refusal[0]:
                    refusal = (wait, scope, "requests", rpm)
            if tpm is not None and b.tokens - (tpm - 1) > _EPS:
                wait = (b.tokens - (tpm - 1)) * WINDOW / tpm
                if refusal is None or wait > refusal[0]:
                    refusal = (wait, scope, "tokens", tpm)
            if lim.concurrent is not None and b.inflight >= lim.concurrent:
                if refusal is None or CONCURRENCY_RETRY_AFTER > refusal[0]:
                    refusal = (CONCURRENCY_RETRY_AFTER, scope, "concurrent", lim.concurrent)
        if refusal is not None:
            wait, scope, dim, limit = refusal
            raise LimitExceeded(scope, dim, limit, wait, self._state(scopes, buckets))
        held = self._buckets
        for scope, b in zip(scopes, buckets, strict=True):
            lim = scope.limits
            if lim.rpm is not None:
                b.requests += 1
            if lim.tpm is not None:
                b.tokens += tokens
            b.mark(lim, now)
            if lim.concurrent is not None:
                b.inflight += 1
            held[scope.name] = b
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
        """:func:`~mesh.limits.base.tightest` of the scopes' :func:`~mesh.limits.base.bucket_window`
        of each dimension, ranked on their (remaining, limit, -reset) without making a
        window per scope: only the two that win are built."""
        requests: tuple[int, int, float] | None = None
        tokens: tuple[int, int, float] | None = None
        for scope, b in zip(scopes, buckets, strict=True):
            lim = scope.limits
            if (rpm := lim.rpm) is not None:
                rank = _rank(rpm, b.requests)
                if requests is None or rank < requests:
                    requests = rank
            if (tpm := lim.tpm) is not None:
                rank = _rank(tpm, b.tokens)
                if tokens is None or rank < tokens:
                    tokens = rank
        return LimitState(
            requests=None if requests is None else Window(requests[1], requests[0], -requests[2]),
            tokens=None if tokens is None else Window(tokens[1], tokens[0], -tokens[2]),
            at=self._wall(),
        )

    def _sweep(self, now: float) -> None:
        """Forget buckets that have drained and hold no slot: a new one would be the same."""
        self._swept_at = now
        self._buckets = {name: b for name, b in self._buckets.items() if b.inflight > 0 or b.empty_at > now}


def _rank(limit: int, level: float) -> tuple[int, int, float]:
    """(remaining, limit, -reset) of :func:`~mesh.limits.base.bucket_window`: the order
    :func:`~mesh.limits.base.tightest` picks by, and the window's fields."""
    if level < 0.0:
        level = 0.0
    remaining = math.floor(limit - level + 1e-9)
    if remaining > limit:  # only past float precision
        remaining = limit
    return remaining if remaining > 0 else 0, limit, -(level * WINDOW / limit)
