"""OpenTelemetry traces: one span per inference request, off unless ``observability.otlp_endpoint``.

Span tree of a request (children of the request span)::

    chat <model>                 SERVER; gen_ai.* and mesh.* attributes, error.type on failure
      authenticate
      admit                      rate limits and the credit hold
      queue wait                 (routing/router.py) waiting for a replica slot
      route attempt              one per replica tried: mesh.replica, mesh.route.reason, error.type
      resume                     (routing/router.py) a replica failed mid-stream: mesh.resume.*,
        route attempt            and the continuation's attempts on other replicas
      first token                from the request's start to the first event
      stream                     from the first event to the end of the stream
      settle                     the ledger write

An incoming W3C ``traceparent`` is continued; the engine adapter sends the current one on
(engines/openai_compat.py), so vLLM's own spans join the trace. Content never goes into a
span: no prompt, no completion, no error message (engines may echo input), only kinds.

Sampling is decided when the request span ends (every span is recorded meanwhile, and
buffered per trace): a trace is exported when its parent was sampled upstream, when the
request failed, when it took ``slow_request_seconds`` or more, or else for a
``sample_ratio`` share of trace ids. The exporter (OTLP/HTTP, protobuf) runs in the SDK's
batch thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.accounts.principal import Principal
from mesh.canonical import Usage
from mesh.config import ModelConfig, ObservabilityConfig
from mesh.observability.spans import failed

# The SDK (provider, batch exporter, tail sampler) is imported only when tracing is on: a
# gateway that does not trace starts without it.
if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_PROPAGATOR = TraceContextTextMapPropagator()
# What step() and active() return when the request is not traced: nothing to open or close
# (a tenth of a request's CPU in bench/'s profile when they built no-op spans).
_NOT_RECORDING: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)
_NOTHING: AbstractContextManager[None] = nullcontext()


class Finished(Protocol):
    """What a finished request tells its span (``mesh.pipeline.RequestContext``)."""

    request_id: str
    protocol: str
    started: float
    principal: Principal | None
    model: ModelConfig | None
    model_id: str
    route_reason: str | None
    replica: str | None
    first_token_at: float | None
    usage: Usage | None
    status: str


class RequestTrace:
    """The spans of one request. Every method is a no-op on a non-recording span."""

    def __init__(self, tracer: trace.Tracer, root: Span, epoch_offset_ns: int) -> None:
        self._tracer = tracer
        self.root = root
        self.context: Context = trace.set_span_in_context(root)
        self._offset = epoch_offset_ns  # epoch ns minus monotonic ns: places monotonic times
        self._done = False
        self._recording = root.is_recording()
        self.error_kind: str | None = None

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset

    def step(self, name: str, **attributes: str | int) -> AbstractContextManager[Span]:
        """A child span of the request around a step; it is the current span inside."""
        return self._step(name, attributes) if self._recording else _NOT_RECORDING

    @contextlib.contextmanager
    def _step(self, name: str, attributes: dict[str, str | int]) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            name, context=self.context, attributes=attributes, record_exception=False,
            set_status_on_exception=False,
        ) as span, failed(span):
            yield span

    def active(self) -> AbstractContextManager[None]:
        """Make the request span current (spans opened inside, e.g. by the router, are its children)."""
        return self._active() if self._recording else _NOTHING

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        with trace.use_span(self.root, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    def log_ids(self) -> dict[str, str]:
        """``trace_id`` and ``span_id`` for the request's log line (nothing when not tracing)."""
        if not self._recording and self.root is trace.INVALID_SPAN:
            return {}
        sc = self.root.get_span_context()
        if not sc.is_valid:
            return {}
        return {"trace_id": format(sc.trace_id, "032x"), "span_id": format(sc.span_id, "016x")}

    def fail(self, kind: str) -> None:
        if self._recording:  # read only for a recording span (the untraced one is shared)
            self.error_kind = kind

    def finish(self, ctx: Finished, *, charged: int | None = None,
               extra: Mapping[str, str | int] | None = None) -> None:
        """Name and annotate the request span, add its first-token and stream spans, end it (once)."""
        if self._done or self.root is trace.INVALID_SPAN:
            return
        self._done = True
        root = self.root
        if not root.is_recording():
            root.end()
            return
        now = time.monotonic()
        model = ctx.model.id if ctx.model is not None else ctx.model_id
        root.update_name(f"chat {model}" if model else ctx.protocol)
        attrs: dict[str, str | int] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "mesh",
            "mesh.request_id": ctx.request_id, "mesh.protocol": ctx.protocol, "mesh.status": ctx.status,
        }
        if ctx.model_id:
            attrs["gen_ai.request.model"] = ctx.model_id
        if ctx.model is not None:
            attrs["gen_ai.response.model"] = ctx.model.id
        if ctx.principal is not None:
            attrs["mesh.account_id"] = ctx.principal.account_id
            if ctx.principal.key_id:
                attrs["mesh.key_id"] = ctx.principal.key_id
        if ctx.replica:
            attrs["mesh.replica"] = ctx.replica
        if ctx.route_reason:
            attrs["mesh.route.reason"] = ctx.route_reason
        if ctx.usage is not None:
            attrs["gen_ai.usage.input_tokens"] = ctx.usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = ctx.usage.output_tokens
            attrs["mesh.usage.cached_tokens"] = ctx.usage.cached_tokens
        if charged is not None:
            attrs["mesh.cost_micro"] = charged
        for key, value in (extra or {}).items():
            attrs[f"mesh.{key}"] = value  # e.g. mesh.resume, mesh.reprocessed_tokens
        root.set_attributes(attrs)
        if ctx.first_token_at is not None:
            first = self._tracer.start_span("first token", context=self.context, start_time=self._ns(ctx.started))
            first.end(end_time=self._ns(ctx.first_token_at))
            stream = self._tracer.start_span("stream", context=self.context, start_time=self._ns(ctx.first_token_at))
            if ctx.usage is not None:
                stream.set_attribute("gen_ai.usage.output_tokens", ctx.usage.output_tokens)
            stream.end(end_time=self._ns(now))
        if ctx.status != "ok" or self.error_kind is not None:
            root.set_attribute("error.type", self.error_kind or ctx.status)
            root.set_status(Status(StatusCode.ERROR))
        root.end(end_time=self._ns(now))


class Tracing:
    """The process's tracer: a real one with ``otlp_endpoint``, else OpenTelemetry's no-op."""

    def __init__(self, config: ObservabilityConfig, exporter: SpanExporter | None = None) -> None:
        self._provider: TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if config.otlp_endpoint is not None or exporter is not None:
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            from mesh.observability.tail_sampler import TailSampler

            self._provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
            self._provider.add_span_processor(
                TailSampler(BatchSpanProcessor(exporter), config.sample_ratio, config.slow_request_seconds)
            )
            self.tracer = self._provider.get_tracer("mesh")

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def start(self, headers: Mapping[str, str], protocol: str, request_id: str, started: float) -> RequestTrace:
        """The request span from ``started`` (monotonic seconds), continuing the caller's
        ``traceparent`` if it sent one."""
        if self._provider is None:
            return _UNTRACED  # tracing off: nothing to build per request
        parent = _PROPAGATOR.extract(headers)
        offset = time.time_ns() - time.monotonic_ns()
        root = self.tracer.start_span(
            protocol, context=parent, kind=SpanKind.SERVER, start_time=int(started * 1e9) + offset,
            attributes={"mesh.request_id": request_id, "mesh.protocol": protocol},
        )
        return RequestTrace(self.tracer, root, offset)

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter's thread."""
        if self._provider is not None:
            self._provider.shutdown()


_UNTRACED = RequestTrace(trace.NoOpTracer(), trace.INVALID_SPAN, 0)  # stateless: every method is a no-op


def not_traced() -> RequestTrace:
    """The trace of a request that is not traced (tracing off, or not an inference endpoint):
    one shared instance, since nothing on it changes."""
    return _UNTRACED
