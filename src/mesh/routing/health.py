"""Active health checks: probe every replica's engine on an interval, feeding its breaker.

A failed probe counts like a failed request; a successful probe closes an open breaker
once its cooldown has passed (half-open), so a replica that comes back returns to
rotation by itself within about ``cooldown + interval`` seconds. A passing probe clears
only the failures probes counted, never those of real requests (timeouts of streams that
stall after their first token): real traffic outranks probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from mesh.routing.breaker import BreakerState
from mesh.routing.replica import Replica

log = logging.getLogger("mesh.routing.health")

DEFAULT_HEALTH_INTERVAL = 2.0


async def probe(replica: Replica) -> bool:
    ok = await replica.engine.health()
    breaker = replica.breaker
    if ok:
        if breaker.state is not BreakerState.CLOSED and breaker.acquire():
            breaker.record_success()
            log.info("replica %s is healthy again", replica.name)
        elif breaker.state is BreakerState.CLOSED:
            breaker.record_probe_passed()
    else:
        was = breaker.state
        breaker.record_failure(probe=True)
        if was is not BreakerState.OPEN and breaker.state is BreakerState.OPEN:
            log.warning("replica %s failed its health checks; out of rotation", replica.name)
    return ok


class HealthMonitor:
    """Owns one background task probing ``replicas()`` every ``interval`` seconds."""

    def __init__(self, replicas: Callable[[], Iterable[Replica]], interval: float = DEFAULT_HEALTH_INTERVAL) -> None:
        self._replicas = replicas
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mesh-health")

    async def _run(self) -> None:
        while True:
            replicas = list(self._replicas())
            results = await asyncio.gather(*(probe(r) for r in replicas), return_exceptions=True)
            for r, res in zip(replicas, results, strict=True):
                if isinstance(res, BaseException):
                    log.warning("health probe of %s raised %s", r.name, type(res).__name__)
            await asyncio.sleep(self.interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
