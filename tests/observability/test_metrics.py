"""The silent-failure metrics, in process: breaker transitions and the usage writer's backlog."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.billing.usage import UsageRecord, UsageWriter
from mesh.observability.metrics import Metrics
from mesh.routing.breaker import BreakerState, CircuitBreaker
from mesh.store import Database


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
    }


def test_breaker_reports_each_change_of_state_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    metrics = Metrics()
    seen: list[tuple[BreakerState, BreakerState]] = []

    def watch(old: BreakerState, new: BreakerState) -> None:
        seen.append((old, new))
        metrics.breaker_transition("m", "r1", old, new)

    breaker = CircuitBreaker(2, 5.0, clock=lambda: now[0], on_transition=watch)
    caplog.set_level(logging.INFO, "mesh.metrics")
    breaker.record_failure()
    assert seen == []
    breaker.record_failure()
    breaker.record_failure()  # already open: no second transition
    now[0] = 6.0
    assert breaker.acquire()  # half-open probe
    breaker.record_success()
    breaker.record_success()  # already closed
    assert seen == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    got = samples(metrics)
    for state in ("open", "half_open", "closed"):
        assert got[("mesh_breaker_transitions_total", (("model", "m"), ("replica", "r1"), ("state", state)))] == 1
    assert [r.levelname for r in caplog.records if r.name == "mesh.metrics"] == ["WARNING", "INFO", "INFO"]


async def test_usage_backlog_and_drops_are_exported(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/unused.db")
    try:
        writer = UsageWriter(db, max_pending=2)
        metrics = Metrics()
        metrics.watch_backlogs(writer, lambda: 3)
        for i in range(3):  # the third does not fit
            writer.enqueue(UsageRecord(request_id=f"r{i}", account_id="a", key_id=None, model="m", status="ok"))
        got = samples(metrics)
        assert got[("mesh_usage_pending_records", ())] == 2
        assert got[("mesh_usage_dropped_records_total", ())] == 1
        assert got[("mesh_stale_holds", ())] == 3
    finally:
        await db.aclose()


def test_per_request_series_add_up_across_requests_and_label_sets() -> None:
    # The labelled children are looked up once per label set and kept: two requests of one
    # set and one of another must still land in their own series.
    metrics = Metrics()
    common = {"protocol": "openai.chat", "ttft_s": 0.01, "duration_s": 0.02, "charged": 7}
    metrics.observe(model="a", status="ok", input_tokens=10, output_tokens=2, cached_tokens=4, **common)
    metrics.observe(model="a", status="ok", input_tokens=6, output_tokens=3, cached_tokens=0, **common)
    metrics.observe(model="a", status="error", input_tokens=0, output_tokens=0, cached_tokens=0, **common)
    metrics.observe(model="b", status="ok", input_tokens=1, output_tokens=1, cached_tokens=1, **common)
    got = samples(metrics)
    chat = ("protocol", "openai.chat")
    assert got[("mesh_requests_total", (("model", "a"), chat, ("status", "ok")))] == 2
    assert got[("mesh_requests_total", (("model", "a"), chat, ("status", "error")))] == 1
    assert got[("mesh_requests_total", (("model", "b"), chat, ("status", "ok")))] == 1
    assert got[("mesh_tokens_total", (("kind", "input"), ("model", "a")))] == 16
    assert got[("mesh_tokens_total", (("kind", "output"), ("model", "a")))] == 5
    assert got[("mesh_tokens_total", (("kind", "cached"), ("model", "b")))] == 1
    assert got[("mesh_credits_charged_micro_total", (("model", "a"),))] == 21
    assert got[("mesh_request_duration_seconds_count", (("model", "a"), chat))] == 3
    assert got[("mesh_prompt_cache_hit_ratio", (("model", "a"),))] == 4 / 16


def test_per_request_numbers_scrape_as_prometheus_client_would_have_counted_them() -> None:
    # A request adds to plain numbers that a scrape folds in: every sample (bucket bounds
    # hit exactly, the float sums, scrapes in between) is what inc/observe per request gave.
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from mesh.observability.metrics import _DURATION_BUCKETS, _TTFT_BUCKETS

    registry = CollectorRegistry()
    requests = Counter("mesh_requests", "", ["model", "protocol", "status"], registry=registry)
    ttft = Histogram("mesh_time_to_first_token_seconds", "", ["model", "protocol"], buckets=_TTFT_BUCKETS,
                     registry=registry)
    duration = Histogram("mesh_request_duration_seconds", "", ["model", "protocol"], buckets=_DURATION_BUCKETS,
                         registry=registry)
    tokens = Counter("mesh_tokens", "", ["model", "kind"], registry=registry)
    metrics = Metrics()
    values = [*_TTFT_BUCKETS, *_DURATION_BUCKETS, 0.0, 0.0031, 0.1 + 0.2, 7.77, 299.9, 1e6]
    for i, v in enumerate(values):
        status = "ok" if i % 3 else "error"
        ttft_s = None if i % 5 == 0 else v / 3
        metrics.observe(model="m", protocol="p", status=status, ttft_s=ttft_s, duration_s=v, input_tokens=i,
                        output_tokens=2 * i, cached_tokens=0, charged=i)
        requests.labels("m", "p", status).inc()
        if ttft_s is not None:
            ttft.labels("m", "p").observe(ttft_s)
        duration.labels("m", "p").observe(v)
        if i:
            tokens.labels("m", "input").inc(i)
            tokens.labels("m", "output").inc(2 * i)
        if i % 7 == 0:  # a scrape in between
            samples(metrics)
    want = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in registry.collect() for s in fam.samples if not s.name.endswith("_created")
    }
    got = samples(metrics)
    assert want and {k: got[k] for k in want} == want
