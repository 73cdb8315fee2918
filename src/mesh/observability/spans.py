"""Spans around steps, for any layer: a failure marks the span without quoting the error.

Error messages can carry what an engine echoed of the input, so a span records only the
exception's class (``error.type``) and Mesh's neutral error kind (``mesh.error.kind``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode


@contextlib.contextmanager
def failed(span: Span) -> Iterator[None]:
    """Mark ``span`` as failed (class and kind only) if the block raises; re-raise."""
    try:
        yield
    except BaseException as exc:
        span.set_attribute("error.type", type(exc).__name__)
        kind = getattr(exc, "kind", None)
        if isinstance(kind, str):
            span.set_attribute("mesh.error.kind", kind)
        span.set_status(Status(StatusCode.ERROR))
        raise


# What a span context manager is when nothing is traced: shared, stateless, free.
UNTRACED: contextlib.AbstractContextManager[Span] = contextlib.nullcontext(trace.INVALID_SPAN)


def child(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, str | int]
) -> contextlib.AbstractContextManager[Span]:
    """A span under the current one, current inside, failure-marked as above (nothing at
    all when ``tracer`` is OpenTelemetry's no-op: tracing is off)."""
    if isinstance(tracer, trace.NoOpTracer):
        return UNTRACED
    return _child(tracer, name, attributes)


@contextlib.contextmanager
def _child(tracer: trace.Tracer, name: str, attributes: Mapping[str, str | int]) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span, failed(span):
        yield span
