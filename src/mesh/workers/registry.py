"""Where worker registrations live, so every gateway process sees every registered replica.

In-process when no Redis is configured (one gateway process); in Redis otherwise, with a
TTL of ``dead_after`` on each registration so a silent worker expires by itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from mesh.redis_client import redis_client

if TYPE_CHECKING:
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
    source: str | None = None  # the address the worker registered from
    quarantined: str | None = None  # why the replica is out of rotation (usage out of bounds)


class WorkerRegistry(Protocol):
    async def put(self, reg: Registration) -> None: ...

    async def heartbeat(self, reg_id: str, *, healthy: bool, load: float | None, running: int | None,
                        waiting: int | None) -> Registration | None:
        """Refresh a registration; None if it is unknown or expired (the worker re-registers)."""
        ...

    async def get(self, reg_id: str) -> Registration | None: ...

    async def remove(self, reg_id: str) -> None: ...

    async def live(self) -> list[Registration]: ...

    async def quarantine(self, reg: Registration, reason: str, ttl: float, hosts: Sequence[str]) -> None:
        """Take ``reg`` out of rotation and refuse its worker any engine on ``hosts`` (the
        engine's host and its addresses) for ``ttl`` seconds: the engine is the worker's own,
        so another port or path, or another spelling of the host, is the same engine."""
        ...

    async def quarantined(self, worker: str, hosts: Sequence[str]) -> str | None:
        """Why ``worker`` may not register an engine on any of ``hosts`` now, or None."""
        ...

    async def note_source(self, worker: str, source: str | None) -> None:
        """Remember the address a worker token was last used from."""
        ...

    async def sources(self) -> dict[str, tuple[str, float]]:
        """Each worker token's last source address and when (epoch seconds)."""
        ...

    async def aclose(self) -> None: ...


def _bad_key(worker: str, host: str) -> str:
    return f"{worker}|{host}"


class MemoryRegistry:
    def __init__(self, dead_after: float) -> None:
        self.dead_after = dead_after
        self._regs: dict[str, Registration] = {}
        self._bad: dict[str, tuple[str, float]] = {}  # worker|url -> (reason, until)
        self._sources: dict[str, tuple[str, float]] = {}

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

    async def quarantine(self, reg: Registration, reason: str, ttl: float, hosts: Sequence[str]) -> None:
        for host in hosts:
            self._bad[_bad_key(reg.worker, host)] = (reason, time.time() + ttl)
        if reg.id in self._regs:
            self._regs[reg.id] = replace(self._regs[reg.id], quarantined=reason)

    async def quarantined(self, worker: str, hosts: Sequence[str]) -> str | None:
        for host in hosts:
            found = self._bad.get(_bad_key(worker, host))
            if found and found[1] > time.time():
                return found[0]
        return None

    async def note_source(self, worker: str, source: str | None) -> None:
        self._sources[worker] = (source or "unknown", time.time())

    async def sources(self) -> dict[str, tuple[str, float]]:
        return dict(self._sources)

    async def aclose(self) -> None:
        return None


class RedisRegistry:
    """``{prefix}worker:{id}`` holds the registration (JSON, TTL dead_after);
    ``{prefix}workers`` is the set of ids, pruned of expired ones on read."""

    def __init__(self, url: str, dead_after: float, prefix: str = "mesh:") -> None:
        self.dead_after = dead_after
        self._redis: aioredis.Redis = redis_client(url)
        self._set = f"{prefix}workers"
        self._prefix = f"{prefix}worker:"
        self._bad = f"{prefix}worker-bad:"
        self._sources = f"{prefix}worker-sources"

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

    async def quarantine(self, reg: Registration, reason: str, ttl: float, hosts: Sequence[str]) -> None:
        for host in hosts:
            await self._redis.set(self._bad + _bad_key(reg.worker, host), reason, px=max(1, int(ttl * 1000)))
        current = await self.get(reg.id)
        if current is not None:
            await self._write(replace(current, quarantined=reason))

    async def quarantined(self, worker: str, hosts: Sequence[str]) -> str | None:
        for host in hosts:
            raw = await self._redis.get(self._bad + _bad_key(worker, host))
            if raw is not None:
                return raw.decode() if isinstance(raw, bytes) else str(raw)
        return None

    async def note_source(self, worker: str, source: str | None) -> None:
        await self._redis.hset(self._sources, worker, orjson.dumps([source or "unknown", time.time()]))

    async def sources(self) -> dict[str, tuple[str, float]]:
        raw = await self._redis.hgetall(self._sources)
        out: dict[str, tuple[str, float]] = {}
        for k, v in raw.items():
            addr, at = orjson.loads(v)
            out[k.decode() if isinstance(k, bytes) else str(k)] = (str(addr), float(at))
        return out

    async def aclose(self) -> None:
        await self._redis.aclose()


def _decode(raw: Any) -> Registration:
    return Registration(**orjson.loads(raw))
