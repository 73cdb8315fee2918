"""Prometheus metrics: per-request counters and histograms, and fleet gauges read at scrape time.

Request metrics are recorded once per request, when it settles (:meth:`Metrics.observe`),
never per chunk. Replica and queue gauges cost nothing on the request path: a collector
reads the router's state when Prometheus scrapes. Each gateway process exposes its own
numbers; a scraper sums across processes.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


class _Count:
    """A counter series' increments since the last scrape, as a plain int: a labelled
    child's ``inc`` takes a lock, and a request made eight of them."""

    __slots__ = ("child", "n")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.n = 0

    def fold(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.child.inc(n)


class _Observed:
    """A histogram series' observations since the last scrape: a count per bucket, and the
    running sum of every observation in the order they came (the very float that
    ``Histogram.observe`` would have summed, which the scrape then shows)."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds: list[float] = child._upper_bounds  # ends with +Inf, as observe() scans them
        self.counts = [0] * len(self.bounds)
        self.total = child._sum.get()

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount: the one Histogram.observe increments.
        self.total += amount
        i = bisect_left(self.bounds, amount)
        if amount <= self.bounds[i]:  # not NaN (which observe() counts in no bucket)
            self.counts[i] += 1

    def fold(self) -> None:
        buckets = self.child._buckets
        counts = self.counts
        for i, n in enumerate(counts):
            if n:
                counts[i] = 0
                buckets[i].inc(n)
        self.child._sum.set(self.total)


class _Children:
    """The labelled series one (model, protocol, status) updates at every request, as
    plain numbers folded into the prometheus_client series when the registry is
    collected (:class:`_FoldingRegistry`): names, types, labels and values at scrape time
    are the ones per-request ``inc``/``observe`` calls gave."""

    __slots__ = ("cached_tokens", "credits", "duration", "input_tokens", "output_tokens", "prompts", "requests",
                 "ttft")

    def __init__(self, requests: _Count, ttft: _Observed, duration: _Observed, input_tokens: _Count,
                 output_tokens: _Count, cached_tokens: _Count, credits: _Count, prompts: list[int]) -> None:
        self.requests = requests
        self.ttft = ttft
        self.duration = duration
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cached_tokens = cached_tokens
        self.credits = credits
        self.prompts = prompts  # [prompt tokens, cached prompt tokens] of the model, for the hit ratio


class _FoldingRegistry(CollectorRegistry):
    """A registry that folds the per-request numbers into their series before any read
    (``generate_latest``, ``get_sample_value``)."""

    def __init__(self, fold: Callable[[], None]) -> None:
        super().__init__(auto_describe=True)
        self._fold = fold

    def collect(self) -> Iterable[Metric]:
        self._fold()
        return super().collect()


class Metrics:
    def __init__(self, router: Callable[[], Router | None] | None = None) -> None:
        self.registry: CollectorRegistry = _FoldingRegistry(self._fold)
        r = self.registry
        self._prompts: dict[str, list[int]] = {}  # model -> [prompt tokens, cached prompt tokens]
        self._children: dict[tuple[str, str, str], _Children] = {}  # by (model, protocol, status)
        # Each labelled series' pending numbers, by (metric, *labels).
        self._counts: dict[tuple[str, ...], _Count] = {}
        self._observed_series: dict[tuple[str, ...], _Observed] = {}
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
        c = self._children.get((model, protocol, status))
        if c is None:
            c = self._children[(model, protocol, status)] = self._labelled(model, protocol, status)
        c.requests.n += 1
        if ttft_s is not None:
            c.ttft.observe(ttft_s)
        c.duration.observe(duration_s)
        if input_tokens:
            c.input_tokens.n += input_tokens
            c.prompts[0] += input_tokens
            c.prompts[1] += cached_tokens
        if output_tokens:
            c.output_tokens.n += output_tokens
        if cached_tokens:
            c.cached_tokens.n += cached_tokens
        if charged:
            c.credits.n += charged

    def _labelled(self, model: str, protocol: str, status: str) -> _Children:
        # prometheus_client's .labels() builds and hashes a key tuple under a lock at every
        # call, and each inc/observe takes a lock: a request's metrics took eight. Label sets
        # are few (models x protocols x statuses), so each series is looked up once, and a
        # request adds to plain numbers that a scrape folds in (_fold).
        return _Children(
            self._count(self.requests, "requests", model, protocol, status),
            self._observed(self.ttft, "ttft", model, protocol),
            self._observed(self.duration, "duration", model, protocol),
            self._count(self.tokens, "tokens", model, "input"),
            self._count(self.tokens, "tokens", model, "output"),
            self._count(self.tokens, "tokens", model, "cached"),
            self._count(self.credits, "credits", model),
            self._prompts.setdefault(model, [0, 0]),
        )

    def _count(self, counter: Counter, *key: str) -> _Count:
        found = self._counts.get(key)
        if found is None:
            found = self._counts[key] = _Count(counter.labels(*key[1:]))
        return found

    def _observed(self, histogram: Histogram, *key: str) -> _Observed:
        found = self._observed_series.get(key)
        if found is None:
            found = self._observed_series[key] = _Observed(histogram.labels(*key[1:]))
        return found

    def _fold(self) -> None:
        for count in self._counts.values():
            count.fold()
        for observed in self._observed_series.values():
            observed.fold()

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
