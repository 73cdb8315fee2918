"""Rate limits per key and per account: requests and tokens per minute, concurrent requests.

``build_limiter(settings)`` picks the backend: :class:`RedisLimiter` when ``settings.redis``
is set (limits hold across every gateway on that Redis), else :class:`MemoryLimiter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesh.config import Settings
from mesh.limits.base import Lease, Limiter, LimitExceeded, LimitState, Window
from mesh.limits.headers import limits_headers
from mesh.limits.memory import MemoryLimiter
from mesh.limits.policy import NO_LIMITS, RateLimits, Scope, principal_scopes

if TYPE_CHECKING:
    from mesh.limits.redis_limiter import RedisLimiter


def __getattr__(name: str) -> object:
    # RedisLimiter brings redis-py: imported only by a gateway (or test) that uses it.
    if name == "RedisLimiter":
        from mesh.limits.redis_limiter import RedisLimiter

        return RedisLimiter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_limiter(settings: Settings) -> Limiter:
    """The limiter the settings ask for (not started: call ``start()``)."""
    if settings.redis:
        from mesh.limits.redis_limiter import RedisLimiter

        return RedisLimiter(settings.redis, prefix=settings.redis_prefix, ttl=settings.limits.concurrency_ttl)
    return MemoryLimiter()


__all__ = [
    "NO_LIMITS",
    "Lease",
    "LimitExceeded",
    "LimitState",
    "Limiter",
    "MemoryLimiter",
    "RateLimits",
    "RedisLimiter",
    "Scope",
    "Window",
    "build_limiter",
    "limits_headers",
    "principal_scopes",
]
