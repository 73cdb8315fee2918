"""Redis, imported only by a gateway configured to use it: redis-py is a tenth of a second
of import that a gateway without Redis would pay at every start."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis


def redis_client(url: str, **options: Any) -> Redis:
    """``redis.asyncio.Redis.from_url(url, **options)``."""
    from redis.asyncio import Redis

    return Redis.from_url(url, **options)


@functools.cache
def redis_errors() -> tuple[type[Exception], ...]:
    """What a Redis call raises when Redis is unreachable or refuses (``except redis_errors():``;
    TimeoutError is an OSError)."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)
