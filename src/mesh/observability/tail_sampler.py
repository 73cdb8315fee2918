"""The tail sampler of :mod:`mesh.observability.tracing`: a trace is kept or dropped whole,
when its request span ends. Its own module so that the OpenTelemetry SDK is imported only
when tracing is on."""

from __future__ import annotations

from collections import OrderedDict

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

_MAX_OPEN_TRACES = 10_000  # traces buffered at once; past it the oldest is dropped unexported
_MAX_KEPT = 10_000  # trace ids remembered as exported, for spans that end after their root


class TailSampler(SpanProcessor):
    """Buffers a trace's spans until its local root ends, then exports all or none."""

    def __init__(self, inner: SpanProcessor, ratio: float, slow_seconds: float) -> None:
        self._inner = inner
        self._bound = round(ratio * (1 << 64))
        self._slow_ns = int(slow_seconds * 1e9)
        self._open: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._kept: OrderedDict[int, None] = OrderedDict()

    def _keep(self, root: ReadableSpan) -> bool:
        parent = root.parent
        if parent is not None and parent.is_remote and bool(parent.trace_flags.sampled):
            return True
        if root.status.status_code is StatusCode.ERROR:
            return True
        if root.end_time is not None and root.start_time is not None:
            if root.end_time - root.start_time >= self._slow_ns:
                return True
        trace_id: int = root.context.trace_id
        return (trace_id & ((1 << 64) - 1)) < self._bound

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id
        if trace_id in self._kept:
            self._inner.on_end(span)
            return
        if span.parent is not None and not span.parent.is_remote:
            self._open.setdefault(trace_id, []).append(span)
            if len(self._open) > _MAX_OPEN_TRACES:
                self._open.popitem(last=False)
            return
        spans = [*self._open.pop(trace_id, []), span]
        if self._keep(span):
            self._kept[trace_id] = None
            if len(self._kept) > _MAX_KEPT:
                self._kept.popitem(last=False)
            for s in spans:
                self._inner.on_end(s)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
