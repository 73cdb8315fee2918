"""The gateway's process-wide state: settings, router, billing services, pipeline, tasks.

Built once at start (:meth:`Gateway.start`), kept on ``app.state.gateway``, closed at
shutdown, which first waits for in-flight settlements so that no money is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from opentelemetry import trace

from mesh.billing.alerts import Alerts
from mesh.billing.leases import LeasedLedger
from mesh.billing.money import format_credits
from mesh.billing.pricing import cost
from mesh.billing.services import Services, open_services
from mesh.billing.stream import SettlementStream
from mesh.canonical import Usage
from mesh.config import ModelConfig, Settings
from mesh.conversations import ResponseStore
from mesh.engines.factory import build_engine
from mesh.limits import build_limiter, limits_headers
from mesh.observability.health import Readiness
from mesh.observability.metrics import BreakerWatch, Metrics
from mesh.observability.stale_holds import StaleHolds
from mesh.observability.tracing import Tracing
from mesh.pipeline import Pipeline
from mesh.request_context import RequestContext
from mesh.routing.breaker import CircuitBreaker
from mesh.routing.health import HealthMonitor
from mesh.routing.policy import make_policy
from mesh.routing.pool import ModelPool
from mesh.routing.queue import FairQueue
from mesh.routing.replica import Replica
from mesh.routing.router import Router
from mesh.routing.sessions import MemorySessionMap, RedisSessionMap, SessionMap
from mesh.workers.registry import MemoryRegistry, RedisRegistry, WorkerRegistry
from mesh.workers.sync import WorkerSync

log = logging.getLogger("mesh.gateway")


def offered_models(settings: Settings) -> tuple[ModelConfig, ...]:
    """The configured models, then (with ``catalog: true``) the catalog's other models with
    no static engines, waiting for workers to bring replicas."""
    configured = {m.id for m in settings.models}
    extra: list[ModelConfig] = []
    if settings.catalog:
        from mesh.catalog import load_catalog

        extra = [e.to_model_config([]) for e in load_catalog().models if e.id not in configured]
    return (*settings.models, *extra)


def build_router(
    settings: Settings, on_breaker: BreakerWatch | None = None, tracer: trace.Tracer | None = None
) -> Router:
    rc = settings.routing

    def replica(engine_config: Any, model_id: str) -> Replica:
        engine = build_engine(engine_config, model_id)
        watch = None if on_breaker is None else partial(on_breaker, model_id, engine.name)
        breaker = CircuitBreaker(rc.failure_threshold, rc.breaker_cooldown, on_transition=watch)
        return Replica(engine, capacity=engine_config.capacity, breaker=breaker)

    pools = {
        m.id: ModelPool(
            m,
            [replica(e, m.id) for e in m.engines],
            queue=FairQueue(rc.max_queue),
            queue_timeout=rc.queue_timeout,
        )
        for m in offered_models(settings)
    }
    sessions: SessionMap
    if settings.redis:
        sessions = RedisSessionMap(settings.redis, settings.redis_prefix, rc.affinity_ttl, rc.affinity_max_entries)
    else:
        sessions = MemorySessionMap(rc.affinity_ttl, rc.affinity_max_entries)
    policy = make_policy(rc.policy, rc.affinity_min_prefix_chars, rc.affinity_slack)
    return Router(pools, policy, rc.max_attempts, sessions, tracer, rc.max_resumes, rc.resume_timeout)


def _registry(settings: Settings) -> WorkerRegistry:
    dead_after = settings.workers.dead_after
    if settings.redis:
        return RedisRegistry(settings.redis, dead_after, prefix=settings.redis_prefix)
    return MemoryRegistry(dead_after)


class Gateway:
    def __init__(
        self, settings: Settings, router: Router, services: Services, metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing(settings.observability)
        self.router = router
        self.services = services
        self.tasks: set[asyncio.Task[Any]] = set()
        self.reasoning_fields: tuple[str, ...] = ("reasoning_content",)
        self.metrics = metrics or Metrics()
        self.metrics.watch_router(lambda: self.router)
        self.limiter = build_limiter(settings)
        # Every admission and settlement goes through one LeasedLedger; with leases off it
        # takes an exact hold per request (and still queues what an outage keeps it from writing).
        self.ledger = LeasedLedger(
            services.ledger, services.database, services.usage, flush_interval=settings.billing.lease_flush_interval,
            checkpoint_interval=settings.billing.checkpoint_interval, leases=settings.billing.leases,
        )
        self.metrics.watch_billing(self.ledger)
        self.alerts = Alerts(services.database, settings.billing.alerts)
        self.settlement_stream = SettlementStream(services.database, settings.billing.settlement_stream)
        self.ready = Readiness(services.database, settings.redis, lambda: self.ledger.ready, self.replicas)
        self.metrics.watch_readiness(self.ready)
        obs = settings.observability
        self.stale_holds = StaleHolds(services.database, obs.stale_hold_minutes, obs.stale_hold_check_interval)
        self.metrics.watch_backlogs(services.usage, lambda: self.stale_holds.count)
        self.pipeline = Pipeline(
            settings, router, services.authenticator, self.ledger, self.spawn, self.metrics, self.limiter
        )
        self.health = HealthMonitor(self.replicas, settings.routing.health_interval)
        self.workers = WorkerSync(settings, router, _registry(settings), on_breaker=self.metrics.breaker_transition)
        self.pipeline.usage_guard = self.workers.check_usage
        self.responses = ResponseStore(
            services.database, enabled=settings.responses.store, retention_days=settings.responses.retention_days
        )

    @classmethod
    async def start(cls, settings: Settings) -> Gateway:
        services = await open_services(settings)
        metrics = Metrics()
        tracing = Tracing(settings.observability)
        router = build_router(settings, metrics.breaker_transition, tracing.tracer)
        gateway = cls(settings, router, services, metrics, tracing)
        await gateway.limiter.start()
        gateway.health.start()
        gateway.ready.start()
        gateway.stale_holds.start()
        gateway.ledger.start()  # flusher and sweeper: a process without paid traffic still frees dead ones' leases
        gateway.workers.start()
        gateway.responses.start()
        gateway.alerts.start()
        gateway.settlement_stream.start()
        return gateway

    async def flush_billing(self) -> None:
        """Write every pending charge and usage record now and return idle leased credit to
        its accounts (tests, operators)."""
        await self.ledger.flush(release_all=True)
        await self.services.usage.flush()

    async def readiness(self) -> dict[str, bool]:
        """What ``/health/ready`` reports (mesh.observability.health): database, Redis when
        configured, billing writes, and a healthy replica."""
        return await self.ready.check()

    def replicas(self) -> list[Replica]:
        return [r for pool in self.router.pools.values() for r in pool.replicas]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, owned by the gateway and awaited at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def usage_extras(self, model: ModelConfig) -> Callable[[Usage], dict[str, Any]]:
        pricing = model.pricing
        return lambda usage: {"cost": format_credits(cost(pricing, usage))}

    def cost_text(self, model: ModelConfig, usage: Usage) -> str:
        return format_credits(cost(model.pricing, usage))

    def response_headers(self, ctx: RequestContext) -> dict[str, str]:
        """Headers every response of an inference endpoint carries: the rate limits."""
        return limits_headers(ctx)

    def is_available(self, model_id: str) -> bool:
        pool = self.router.pools.get(model_id)
        return pool is not None and any(r.healthy for r in pool.replicas)

    async def aclose(self) -> None:
        await self.alerts.aclose()
        await self.settlement_stream.aclose()
        await self.workers.aclose()
        await self.health.aclose()
        await self.ready.aclose()
        await self.stale_holds.aclose()
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.ledger.aclose()  # write the last charges and give leased credit back
        await self.limiter.aclose()
        await self.responses.aclose()
        await self.router.aclose()
        await self.services.aclose()
        await asyncio.to_thread(self.tracing.shutdown)  # the exporter's last batch, off the loop
