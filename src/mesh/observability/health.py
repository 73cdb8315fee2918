"""Readiness: what ``/health/ready`` reports, and the ``mesh_ready_check`` gauge.

Checks, each a boolean in the response body:

* ``database``: a ``SELECT 1`` answers within :data:`READY_TIMEOUT`;
* ``redis`` (only when Redis is configured): a ``PING`` answers within the same;
* ``billing``: the settlement queue's writes are not failing (lease flushing);
* ``replicas``: some model has a healthy replica. A gateway with no replicas at all is
  waiting for its workers, which register *through* it (a Service that only sends traffic
  to ready pods): that counts as ready, or the fleet could never form.

A background loop re-checks every few seconds so that the gauge stays true between probes;
each check that flips is logged once, at warning when it fails, at info when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import text

from mesh.redis_client import redis_client
from mesh.routing.replica import Replica
from mesh.store.database import Database

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("mesh.health")

READY_TIMEOUT = 2.0  # seconds a dependency may take to answer a readiness check
RECHECK_INTERVAL = 5.0  # seconds between background checks (keeps the gauge fresh)


class Readiness:
    def __init__(
        self, database: Database, redis_url: str | None, billing_ready: Callable[[], bool],
        replicas: Callable[[], Sequence[Replica]],
    ) -> None:
        self._database = database
        self._redis: aioredis.Redis | None = (
            redis_client(redis_url, socket_connect_timeout=READY_TIMEOUT, socket_timeout=READY_TIMEOUT)
            if redis_url else None
        )
        self._billing_ready = billing_ready
        self._replicas = replicas
        self.last: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> dict[str, bool]:
        """Run every check now (they run concurrently; none takes longer than READY_TIMEOUT)."""
        probes: dict[str, Awaitable[bool]] = {"database": _answers(self._select_one())}
        if self._redis is not None:
            probes["redis"] = _answers(self._redis.ping())
        results = await asyncio.gather(*probes.values())
        checks = dict(zip(probes, results, strict=True))
        checks["billing"] = self._billing_ready()
        replicas = self._replicas()
        checks["replicas"] = not replicas or any(r.healthy for r in replicas)
        self._record(checks)
        return checks

    def _record(self, checks: dict[str, bool]) -> None:
        for name, ok in checks.items():
            if self.last.get(name, True) != ok:
                if ok:
                    log.info("readiness check %s passes again", name, extra={"check": name})
                else:
                    log.warning("readiness check %s fails: not ready", name, extra={"check": name})
        self.last = checks

    async def _select_one(self) -> None:
        async with self._database.read() as conn:
            await conn.execute(text("SELECT 1"))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(RECHECK_INTERVAL)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self._redis.aclose()


async def _answers(probe: Awaitable[object]) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await probe
    except Exception:  # any failure to answer means not ready; the check names which
        return False
    return True
