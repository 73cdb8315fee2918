"""Keeps this gateway process's replica pools in step with the worker registry.

Every ``sync_interval`` seconds (and at once after a registration through this process),
registered replicas are added to their model's pool, their reported load and health are
copied onto the replica, and replicas whose registration expired or was withdrawn leave
the pool (their engine client is closed; requests already streaming finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from mesh.canonical import CanonicalRequest, Usage
from mesh.config import OpenAIEngineConfig, Settings
from mesh.engines.openai_compat import OpenAIEngine
from mesh.routing.breaker import BreakerState, CircuitBreaker
from mesh.routing.replica import Replica
from mesh.routing.router import Router
from mesh.workers.admission import engine_hosts
from mesh.workers.bounds import clamp, out_of_bounds
from mesh.workers.registry import Registration, WorkerRegistry

log = logging.getLogger("mesh.workers")

LABEL = "registration"


class WorkerSync:
    def __init__(
        self, settings: Settings, router: Router, registry: WorkerRegistry,
        on_breaker: Callable[[str, str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_breaker = on_breaker  # (model, replica, old, new): metrics and a log line
        self.router = router
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        # Worker replicas that left their pool with requests still running, by name: the
        # usage those requests report is still judged (a worker may leave as its engine lies).
        self._departed: dict[str, Replica] = {}

    def _replica(self, reg: Registration) -> Replica:
        rc = self.settings.routing
        engine = OpenAIEngine(
            OpenAIEngineConfig(
                type="openai", base_url=reg.engine_url, model=reg.engine_model, capacity=reg.capacity,
                name=f"{reg.worker}@{reg.engine_url}",
                reasoning_field="reasoning" if reg.reasoning_field == "reasoning" else "reasoning_content",
            ),
            reg.model,
        )
        watch = None if self._on_breaker is None else partial(self._on_breaker, reg.model, engine.name)
        return Replica(
            engine, capacity=reg.capacity,
            breaker=CircuitBreaker(rc.failure_threshold, rc.breaker_cooldown, on_transition=watch),
            labels={LABEL: reg.id, "worker": reg.worker, "source": "worker", "engine_url": reg.engine_url},
        )

    async def run_once(self) -> None:
        async with self._lock:
            for name in [n for n, r in self._departed.items() if r.in_flight == 0]:
                await self._departed.pop(name).engine.aclose()
            regs = {r.id: r for r in await self.registry.live()}
            for model, pool in self.router.pools.items():
                for replica in list(pool.replicas):
                    reg_id = replica.labels.get(LABEL)
                    if reg_id is None:
                        continue
                    reg = regs.pop(reg_id, None)
                    if reg is None or reg.model != model:
                        pool.remove(replica)
                        log.info("worker replica %s left model %s", replica.name, model)
                        if replica.in_flight == 0:
                            await replica.engine.aclose()
                        else:
                            self._departed[replica.name] = replica
                        continue
                    replica.up = reg.healthy and reg.quarantined is None
                    replica.reported_load = reg.load
            for reg in regs.values():
                target = self.router.pools.get(reg.model)
                if target is None:
                    continue  # the API refuses unknown models; a config change may have removed it
                replica = self._replica(reg)
                replica.up = reg.healthy and reg.quarantined is None
                replica.reported_load = reg.load
                target.add(replica)
                log.info("worker replica %s joined model %s", replica.name, reg.model)

    def check_usage(self, model: str, replica_name: str | None, request: CanonicalRequest, prompt_estimate: int,
                    usage: Usage, context_length: int | None, resumed: bool = False) -> Usage:
        """Take a worker replica out of rotation (on every gateway process, through the
        registry) when the usage its engine reported cannot be true for the request; returns
        the usage to bill, clamped to what Mesh can bound in that case."""
        pool = self.router.pools.get(model)
        replica = None
        if pool:
            for r in pool.replicas:
                if r.name == replica_name:
                    replica = r
                    break
        if replica is None and replica_name is not None:
            replica = self._departed.get(replica_name)
        reg_id = replica.labels.get(LABEL) if replica is not None else None
        if replica is None or reg_id is None:
            return usage  # a static replica: the operator's own engine
        reason = out_of_bounds(request, prompt_estimate, usage, context_length, resumed=resumed)
        if reason is None:
            return usage
        replica.up = False
        log.warning("worker replica %s of model %s taken out of rotation: %s", replica.name, model, reason)
        gone = Registration(id=reg_id, worker=replica.labels.get("worker", ""), model=model,
                            engine_url=replica.labels.get("engine_url", ""))
        self._spawn(self._quarantine(gone, reason))
        return clamp(request, prompt_estimate, usage, context_length)

    async def _quarantine(self, reg: Registration, reason: str) -> None:
        # From the replica's own labels, not the registry: a worker that deregisters the moment
        # its engine lies must not escape the quarantine.
        hosts = await engine_hosts(reg.engine_url)
        await self.registry.quarantine(reg, reason, self.settings.workers.quarantine_seconds, hosts)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mesh-worker-sync")

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("worker registry sync failed; will retry")
            await asyncio.sleep(self.settings.workers.sync_interval)

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for replica in self._departed.values():
            await replica.engine.aclose()
        self._departed.clear()
        await self.registry.aclose()
