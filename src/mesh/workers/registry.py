"""Where worker registrations live, so every gateway process sees every registered replica.

In-process when no Redis is configured (one gateway process); in Redis otherwise, with a
TTL of ``dead_after`` on each registration so a silent worker expires by itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis


@dataclass(frozen=True, slots=True)
class Registration:
    id: str
    worker: str  # the worker token's name
    model: str
    engine_url: str
    engine_model: str | None = None
    capacity: int | None = None
    reasoning_field: str = "reasoning_content"
    healthy: bool = True
    load: float | None = None
    running: int | None = None
    waiting: int | None = None
    last_seen: float = 0.0


class WorkerRegistry(Protocol):
    async def put(self, reg: Registration) -> None: ...

    async def heartbeat(self, reg_id: str, *, healthy: bool, load: float | None, running: int | None,
                        waiting: int | None) -> Registration | None:
        """Refresh a registration; None if it is unknown or expired (the worker re-registers)."""
        ...

    async def get(self, reg_id: str) -> Registration | None: ...

    async def remove(self, reg_id: str) -> None: ...

    async def live(self) -> list[Registration]: ...

    async def aclose(self) -> None: ...


class MemoryRegistry:
    def __init__(self, dead_after: float) -> None:
        self.dead_after = dead_after
        self._regs: dict[str, Registration] = {}

    def _alive(self, reg: Registration) -> bool:
        return time.time() - reg.last_seen < self.dead_after

    async def put(self, reg: Registration) -> None:
        self._regs[reg.id] = replace(reg, last_seen=time.time())

    async def heartbeat(self, reg_id: str, *, healthy: bool, load: float | None, running: int | None,
                        waiting: int | None) -> Registration | None:
        reg = self._regs.get(reg_id)
        if reg is None or not self._alive(reg):
            self._regs.pop(reg_id, None)
            return None
        reg = replace(reg, healthy=healthy, load=load, running=running, waiting=waiting, last_seen=time.time())
        self._regs[reg_id] = reg
        return reg

    async def get(self, reg_id: str) -> Registration | None:
        reg = self._regs.get(reg_id)
        return reg if reg is not None and self._alive(reg) else None

    async def remove(self, reg_id: str) -> None:
        self._regs.pop(reg_id, None)

    async def live(self) -> list[Registration]:
        for reg_id in [r.id for r in self._regs.values() if not self._alive(r)]:
            del self._regs[reg_id]
        return list(self._regs.values())

    async def aclose(self) -> None:
        return None


class RedisRegistry:
    """``{prefix}worker:{id}`` holds the registration (JSON, TTL dead_after);
    ``{prefix}workers`` is the set of ids, pruned of expired ones on read."""

    def __init__(self, url: str, dead_after: float, prefix: str = "mesh:") -> None:
        self.dead_after = dead_after
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self._set = f"{prefix}workers"
        self._prefix = f"{prefix}worker:"

    async def _write(self, reg: Registration) -> None:
        ttl_ms = max(1, int(self.dead_after * 1000))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._prefix + reg.id, orjson.dumps(asdict(reg)), px=ttl_ms)
            pipe.sadd(self._set, reg.id)
            await pipe.execute()

    async def put(self, reg: Registration) -> None:
        await self._write(replace(reg, last_seen=time.time()))

    async def get(self, reg_id: str) -> Registration | None:
        raw = await self._redis.get(self._prefix + reg_id)
        return _decode(raw) if raw else None

    async def heartbeat(self, reg_id: str, *, healthy: bool, load: float | None, running: int | None,
                        waiting: int | None) -> Registration | None:
        reg = await self.get(reg_id)
        if reg is None:
            return None
        reg = replace(reg, healthy=healthy, load=load, running=running, waiting=waiting, last_seen=time.time())
        await self._write(reg)
        return reg

    async def remove(self, reg_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._prefix + reg_id)
            pipe.srem(self._set, reg_id)
            await pipe.execute()

    async def live(self) -> list[Registration]:
        members = await self._redis.smembers(self._set)
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        if not ids:
            return []
        raws = await self._redis.mget([self._prefix + i for i in ids])
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await self._redis.srem(self._set, *gone)
        return [_decode(raw) for raw in raws if raw is not None]

    async def aclose(self) -> None:
        await self._redis.aclose()


def _decode(raw: Any) -> Registration:
    return Registration(**orjson.loads(raw))
