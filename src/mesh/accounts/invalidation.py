"""Key-cache invalidation across gateway processes.

Each process caches authenticated keys for a few seconds. When a key is revoked the
revoking process drops its own entry at once and publishes the key id on a Redis
channel; every other process's listener drops the entry as the message arrives. Without
Redis the publisher is a no-op and other processes see the revocation when their entry's
TTL runs out.

If the listener loses its Redis connection it cannot know what it missed, so it asks for
the whole cache to be dropped (:data:`ALL_KEYS`) and resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from mesh.redis_client import redis_client, redis_errors

if TYPE_CHECKING:
    import redis.asyncio as aioredis


INVALIDATION_SUFFIX = "keys:invalidate"  # after ``settings.redis_prefix``
INVALIDATION_CHANNEL = "mesh:" + INVALIDATION_SUFFIX
ALL_KEYS = "*"
RECONNECT_DELAY = 1.0
_SUBSCRIBE_TIMEOUT = 5.0

log = logging.getLogger(__name__)


class KeyCacheInvalidator(Protocol):
    """Tells other processes that a key changed; :meth:`start` listens for the same news."""

    async def start(self) -> None: ...

    async def publish(self, key_id: str) -> bool:
        """Announce that ``key_id`` changed; ``False`` if the message could not be sent."""
        ...

    async def aclose(self) -> None: ...


class LocalInvalidator:
    """The in-memory case: one process, nothing to tell anyone."""

    async def start(self) -> None:
        return None

    async def publish(self, key_id: str) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class RedisInvalidator:
    """Redis pub/sub invalidation. ``on_invalidate(key_id)`` runs for every message received.

    :meth:`start` returns once the subscription is live, so a message published after it
    returns is delivered. :meth:`publish` works without :meth:`start` (the CLI only sends).
    """

    def __init__(
        self,
        url: str,
        on_invalidate: Callable[[str], None],
        *,
        channel: str = INVALIDATION_CHANNEL,
        reconnect_delay: float = RECONNECT_DELAY,
    ) -> None:
        self.channel = channel
        self._on_invalidate = on_invalidate
        self._reconnect_delay = reconnect_delay
        self._client: aioredis.Redis = redis_client(url)
        self._pubsub: aioredis.client.PubSub | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe and start the background listener. Raises ``ConnectionError`` if Redis is down."""
        if self._task is not None:
            return
        try:
            self._pubsub = await self._subscribe()
        except redis_errors() as exc:
            raise ConnectionError(f"cannot subscribe to key invalidations on Redis: {exc}") from exc
        self._task = asyncio.create_task(self._listen(), name="mesh-key-invalidation")

    async def publish(self, key_id: str) -> bool:
        try:
            await self._client.publish(self.channel, key_id)
        except redis_errors() as exc:
            log.warning("could not publish key invalidation for %s: %s", key_id, exc)
            return False
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_pubsub()
        await self._client.aclose()

    async def _subscribe(self) -> aioredis.client.PubSub:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            async with asyncio.timeout(_SUBSCRIBE_TIMEOUT):
                while True:
                    msg = await pubsub.get_message(timeout=_SUBSCRIBE_TIMEOUT)
                    if msg is not None and msg["type"] == "subscribe":
                        return pubsub
        except BaseException:
            await pubsub.aclose()
            raise

    async def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*redis_errors()):
                await self._pubsub.aclose()
            self._pubsub = None

    async def _listen(self) -> None:
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = await self._subscribe()
                    self._on_invalidate(ALL_KEYS)  # we may have missed messages while away
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
            except redis_errors() as exc:
                log.warning("key invalidation listener lost Redis (%s); retrying", exc)
                await self._close_pubsub()
                self._on_invalidate(ALL_KEYS)
                await asyncio.sleep(self._reconnect_delay)
                continue
            if msg is not None and msg["type"] == "message":
                data = msg["data"]
                self._on_invalidate(data.decode() if isinstance(data, bytes) else str(data))
