"""Tracing in process, against the SDK's in-memory exporter: the sampling rules, and that a
step's failure is marked without its message."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mesh.accounts.principal import Principal
from mesh.canonical import Usage
from mesh.config import ModelConfig, ObservabilityConfig
from mesh.errors import EngineError
from mesh.observability.tracing import Tracing, not_traced


@dataclass
class Ctx:
    request_id: str = "req_1"
    protocol: str = "openai.chat"
    started: float = 0.0
    principal: Principal | None = None
    model: ModelConfig | None = None
    model_id: str = "m"
    route_reason: str | None = None
    replica: str | None = None
    first_token_at: float | None = None
    usage: Usage | None = None
    status: str = "ok"


def run(tracing: Tracing, *, status: str = "ok", took: float = 0.0, traceparent: str | None = None) -> None:
    ctx = Ctx(started=time.monotonic() - took, status=status, usage=Usage(input_tokens=3, output_tokens=2))
    ctx.first_token_at = ctx.started + took / 2
    headers = {"traceparent": traceparent} if traceparent else {}
    t = tracing.start(headers, ctx.protocol, ctx.request_id, ctx.started)
    with t.step("authenticate"):
        pass
    t.finish(ctx, charged=5)


def exported(ratio: float, slow: float = 30.0) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing = Tracing(ObservabilityConfig(sample_ratio=ratio, slow_request_seconds=slow), exporter=exporter)
    return tracing, exporter


def names(exporter: InMemorySpanExporter) -> list[str]:
    return sorted(s.name for s in exporter.get_finished_spans())


def test_ratio_one_exports_every_request_with_its_children() -> None:
    tracing, exporter = exported(1.0)
    run(tracing)
    tracing.shutdown()
    assert names(exporter) == ["authenticate", "chat m", "first token", "stream"]


def test_ratio_zero_still_exports_errors_slow_requests_and_sampled_parents() -> None:
    tracing, exporter = exported(0.0, slow=5.0)
    run(tracing)  # fine and fast: dropped
    run(tracing, status="error")
    run(tracing, took=6.0)
    run(tracing, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    run(tracing, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b7-00")  # unsampled parent
    tracing.shutdown()
    roots = [s for s in exporter.get_finished_spans() if s.name == "chat m"]
    assert len(roots) == 3
    assert [r.status.status_code for r in roots].count(StatusCode.ERROR) == 1
    assert len(exporter.get_finished_spans()) == 3 * 4  # each with all of its children


def test_a_failed_step_records_the_kind_not_the_message() -> None:
    tracing, exporter = exported(1.0)
    ctx = Ctx(started=time.monotonic())
    t = tracing.start({}, ctx.protocol, ctx.request_id, ctx.started)
    with pytest.raises(EngineError), t.step("route attempt"):
        raise EngineError("the engine echoed: SECRET PROMPT TEXT")
    ctx.status = "error"
    t.fail("engine")
    t.finish(ctx)
    t.finish(ctx)  # once only
    tracing.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    step = spans["route attempt"]
    assert step.status.status_code is StatusCode.ERROR and step.status.description is None
    assert step.attributes is not None and step.attributes["error.type"] == "EngineError"
    assert step.attributes["mesh.error.kind"] == "engine" and not step.events
    root = spans["chat m"]
    assert root.attributes is not None and root.attributes["error.type"] == "engine"
    assert len(exporter.get_finished_spans()) == 2
    assert "SECRET" not in repr([dict(s.attributes or {}) for s in exporter.get_finished_spans()])


def test_not_traced_is_silent() -> None:
    t = not_traced()
    with t.step("admit"):
        pass
    assert t.log_ids() == {}
    t.finish(Ctx())
    off = Tracing(ObservabilityConfig())
    assert not off.enabled and off.start({}, "p", "r", 0.0).log_ids() == {}
