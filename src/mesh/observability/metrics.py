"""Prometheus metrics: per-request counters and histograms, and fleet gauges read at scrape time.

Request metrics are recorded once per request, when it settles (:meth:`Metrics.observe`),
never per chunk. Replica and queue gauges cost nothing on the request path: a collector
reads the router's state when Prometheus scrapes. Each gateway process exposes its own
numbers; a scraper sums across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.routing.breaker import BreakerState
from mesh.routing.router import Router

log = logging.getLogger("mesh.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# (model, replica, old state, new state): what a breaker reports through on_transition.
BreakerWatch = Callable[[str, str, BreakerState, BreakerState], None]
_BREAKER = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}


class _FleetCollector(Collector):
    def __init__(self, router: Callable[[], Router | None]) -> None:
        self._router = router

    def collect(self) -> Iterator[Any]:
        router = self._router()
        per_replica = ["model", "replica"]
        in_flight = GaugeMetricFamily("mesh_replica_in_flight", "Requests open on a replica", labels=per_replica)
        healthy = GaugeMetricFamily("mesh_replica_healthy", "1 if the replica takes traffic", labels=per_replica)
        breaker = GaugeMetricFamily(
            "mesh_replica_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=per_replica
        )
        queue = GaugeMetricFamily("mesh_queue_depth", "Requests waiting for a replica slot", labels=["model"])
        queue_max = GaugeMetricFamily("mesh_queue_limit", "Most requests that may wait (routing.max_queue)",
                                      labels=["model"])
        workers = GaugeMetricFamily("mesh_worker_replicas", "Replicas registered by GPU workers", labels=["model"])
        if router is not None:
            for model, pool in router.pools.items():
                queue.add_metric([model], len(pool.queue))
                queue_max.add_metric([model], pool.queue.max_waiting)
                workers.add_metric([model], sum(1 for r in pool.replicas if r.labels.get("source") == "worker"))
                for r in pool.replicas:
                    in_flight.add_metric([model, r.name], r.in_flight)
                    healthy.add_metric([model, r.name], 1.0 if r.healthy else 0.0)
                    breaker.add_metric([model, r.name], _BREAKER[r.breaker.state])
        yield from (in_flight, healthy, breaker, queue, queue_max, workers)


class BillingState(Protocol):
    """What the billing collector reads (``mesh.billing.leases.LeasedLedger``)."""

    @property
    def failed_rows(self) -> int: ...

    @property
    def queued(self) -> int: ...

    @property
    def ready(self) -> bool: ...


class _BillingCollector(Collector):
    def __init__(self, billing: BillingState) -> None:
        self._billing = billing

    def collect(self) -> Iterator[Any]:
        failed = CounterMetricFamily(
            "mesh_billing_failed_charges", "Charges dropped because they could not be written on their own"
        )
        failed.add_metric([], self._billing.failed_rows)
        queued = GaugeMetricFamily("mesh_billing_queued_charges", "Charges waiting in memory to be written")
        queued.add_metric([], self._billing.queued)
        ready = GaugeMetricFamily("mesh_billing_ready", "1 while billing writes succeed")
        ready.add_metric([], 1.0 if self._billing.ready else 0.0)
        yield from (failed, queued, ready)
class _CacheCollector(Collector):
    """``mesh_prompt_cache_hit_ratio{model}``: cached over all prompt tokens this process saw
    (0 for engines that report no cached tokens); the token counters give it over any window."""

    def __init__(self, prompts: dict[str, list[int]]) -> None:
        self._prompts = prompts

    def collect(self) -> Iterator[Any]:
        ratio = GaugeMetricFamily(
            "mesh_prompt_cache_hit_ratio", "Cached prompt tokens over all prompt tokens", labels=["model"]
        )
        for model, (prompt, cached) in sorted(self._prompts.items()):
            ratio.add_metric([model], min(1.0, cached / prompt) if prompt else 0.0)
        yield ratio


class _ReadinessCollector(Collector):
    def __init__(self, last: Callable[[], dict[str, bool]]) -> None:
        self._last = last

    def collect(self) -> Iterator[Any]:
        checks = GaugeMetricFamily(
            "mesh_ready_check", "1 while a readiness check passes (database, redis, billing, replicas)",
            labels=["check"],
        )
        for name, ok in self._last().items():
            checks.add_metric([name], 1.0 if ok else 0.0)
        yield checks


class UsageBacklog(Protocol):
    """What the usage collector reads (``mesh.billing.usage.UsageWriter``)."""

    @property
    def pending(self) -> int: ...

    dropped: int


class _SilentCollector(Collector):
    """Backlogs that grow without any request failing: usage rows, stale holds."""

    def __init__(self, usage: UsageBacklog, stale_holds: Callable[[], int]) -> None:
        self._usage = usage
        self._stale_holds = stale_holds

    def collect(self) -> Iterator[Any]:
        pending = GaugeMetricFamily("mesh_usage_pending_records", "Usage records waiting to be written")
        pending.add_metric([], self._usage.pending)
        dropped = CounterMetricFamily("mesh_usage_dropped_records", "Usage records dropped: the buffer was full")
        dropped.add_metric([], self._usage.dropped)
        stale = GaugeMetricFamily(
            "mesh_stale_holds", "Holds older than observability.stale_hold_minutes (never settled)"
        )
        stale.add_metric([], self._stale_holds())
        yield from (pending, dropped, stale)


class ReadinessState(Protocol):
    """What the readiness collector reads (``mesh.observability.health.Readiness``)."""

    last: dict[str, bool]


class Metrics:
    def __init__(self, router: Callable[[], Router | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._prompts: dict[str, list[int]] = {}  # model -> [prompt tokens, cached prompt tokens]
        self.requests = Counter(
            "mesh_requests", "Requests by model, protocol and status", ["model", "protocol", "status"], registry=r
        )
        self.errors = Counter("mesh_errors", "Errors by protocol and kind", ["protocol", "kind"], registry=r)
        self.ttft = Histogram(
            "mesh_time_to_first_token_seconds", "Time to first token", ["model", "protocol"],
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "mesh_request_duration_seconds", "Request duration", ["model", "protocol"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.tokens = Counter("mesh_tokens", "Tokens by model and kind", ["model", "kind"], registry=r)
        self.credits = Counter("mesh_credits_charged_micro", "Micro-credits charged", ["model"], registry=r)
        r.register(_CacheCollector(self._prompts))
        self.breaker_transitions = Counter(
            "mesh_breaker_transitions", "Circuit breaker state changes by the state entered",
            ["model", "replica", "state"], registry=r,
        )
        self.workers_refused = Counter(
            "mesh_worker_registrations_refused", "Worker replica registrations refused, by error code",
            ["code"], registry=r,
        )
        self.settlement_failures = Counter(
            "mesh_settlement_failures", "Settlements that raised (the hold stays for the sweeper)", registry=r
        )
        self.stream_resumes = Counter(
            "mesh_stream_resumes", "Streams whose replica failed after the first byte, by what became of them "
            "(resumed, failed, refused, finished; docs/resume.md)", ["model", "outcome"], registry=r,
        )
        self.resume_reprocessed = Counter(
            "mesh_resume_reprocessed_tokens", "Input tokens continuations read again after a resume: the "
            "operator's cost, never billed", ["model"], registry=r,
        )
        if router is not None:
            self.watch_router(router)

    def watch_router(self, router: Callable[[], Router | None]) -> None:
        """Expose replica and queue gauges (read from the router at scrape time)."""
        self.registry.register(_FleetCollector(router))

    def observe(
        self, *, model: str, protocol: str, status: str, ttft_s: float | None, duration_s: float,
        input_tokens: int, output_tokens: int, cached_tokens: int, charged: int,
    ) -> None:
        self.requests.labels(model, protocol, status).inc()
        if ttft_s is not None:
            self.ttft.labels(model, protocol).observe(ttft_s)
        self.duration.labels(model, protocol).observe(duration_s)
        if input_tokens:
            self.tokens.labels(model, "input").inc(input_tokens)
        if output_tokens:
            self.tokens.labels(model, "output").inc(output_tokens)
        if cached_tokens:
            self.tokens.labels(model, "cached").inc(cached_tokens)
        if input_tokens:
            seen = self._prompts.setdefault(model, [0, 0])
            seen[0] += input_tokens
            seen[1] += cached_tokens
        if charged:
            self.credits.labels(model).inc(charged)

    def watch_billing(self, billing: BillingState) -> None:
        """Expose the settlement queue's state (read at scrape time)."""
        self.registry.register(_BillingCollector(billing))

    def watch_backlogs(self, usage: UsageBacklog, stale_holds: Callable[[], int]) -> None:
        """Expose the usage writer's backlog and the count of stale holds (read at scrape time)."""
        self.registry.register(_SilentCollector(usage, stale_holds))

    def breaker_transition(self, model: str, replica: str, old: BreakerState, new: BreakerState) -> None:
        """Count a breaker's change of state and log it once."""
        self.breaker_transitions.labels(model, replica, new.value).inc()
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "breaker of replica %s (%s): %s -> %s", replica, model, old.value, new.value,
                extra={"model": model, "replica": replica, "breaker": new.value})

    def watch_readiness(self, readiness: ReadinessState) -> None:
        """Expose the last readiness checks (re-run every few seconds in the background)."""
        self.registry.register(_ReadinessCollector(lambda: readiness.last))

    def resumes(self, model: str, outcomes: Sequence[str], reprocessed_tokens: int) -> None:
        for outcome in outcomes:
            self.stream_resumes.labels(model, outcome).inc()
        if reprocessed_tokens:
            self.resume_reprocessed.labels(model).inc(reprocessed_tokens)

    def error(self, protocol: str, kind: str) -> None:
        self.errors.labels(protocol, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
