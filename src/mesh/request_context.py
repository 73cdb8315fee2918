"""What one request accumulates on its way through the pipeline (``mesh.pipeline``)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from mesh.accounts.principal import Principal
from mesh.billing.estimate import typical_prompt_tokens
from mesh.billing.ledger import Admission
from mesh.canonical import CanonicalRequest, Event, Usage
from mesh.config import ModelConfig
from mesh.errors import AuthenticationFailed, MeshError
from mesh.limits.base import Lease, LimitState
from mesh.observability.tracing import RequestTrace, not_traced
from mesh.routing.pending import PendingStream
from mesh.routing.router import RoutedStream

# The protocols of inference requests (not the worker or model-list APIs): traced, and
# logged when refused.
INFERENCE_PROTOCOLS = ("openai.", "anthropic.")


@dataclass(slots=True)
class RequestContext:
    """Everything one request accumulates on its way through the pipeline."""

    request_id: str
    protocol: str
    started: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    model: ModelConfig | None = None
    model_id: str = ""  # the model the client asked for
    models: tuple[str, ...] = ()  # that model, then the fallbacks to try in order
    route_reason: str | None = None
    request: CanonicalRequest | None = None
    admission: Admission | None = None
    prompt_estimate: int = 0
    replica: str | None = None
    first_token_at: float | None = None
    usage: Usage | None = None
    status: str = "ok"
    error: MeshError | None = None  # what it was answered with, if it failed
    finish_reason: str | None = None  # the engine's, for the first choice (the usage record)
    settled: bool = False
    lease: Lease | None = None  # rate limits taken at admission, given back at settlement
    limit_state: LimitState | None = None  # what the rate-limit headers show
    tags: tuple[str, ...] = ()  # x-mesh-tags, for the usage record
    session_hint: str | None = None  # the client's x-session-id header: keeps a session on one replica
    stream: RoutedStream | PendingStream | None = None  # what route() opened, until metered owns it
    routed: RoutedStream | None = None  # the replica's stream once one answered (its resumes, at settlement)
    metering: bool = False  # metered() started: it closes the stream and settles
    metered: AsyncGenerator[Event, None] | None = None  # what metered() returned, for finish() to close
    deadline: float | None = None  # loop time by which the whole request must end
    relay: bool = False  # engines that can are asked for their chunks as they are (Relayed)
    trace: RequestTrace = field(default_factory=not_traced)  # its spans (no-op unless tracing)

    @property
    def ttft_ms(self) -> int | None:
        return None if self.first_token_at is None else int((self.first_token_at - self.started) * 1000)

    @property
    def who(self) -> Principal:
        """The authenticated caller; every step after ``authenticate`` has one."""
        if self.principal is None:
            raise AuthenticationFailed("Not authenticated.")
        return self.principal


def billed_prompt_tokens(ctx: RequestContext) -> int:
    """Prompt tokens to bill when the engine reported none: a typical-density estimate, not
    the hold's (which leans high on purpose so the hold covers any script)."""
    if ctx.request is None:
        return ctx.prompt_estimate
    return min(ctx.prompt_estimate, typical_prompt_tokens(ctx.request))


def refusal_line(ctx: RequestContext) -> tuple[dict[str, Any], bool] | None:
    """The access-log line of an inference request refused before anything was held (401,
    402, 429, 503...), and whether it is always written: the server's own failures are, a
    client's (a bad key, a rate limit) are sampled like successes, so that anyone without a
    key cannot make every one of their requests a line. None for any other request."""
    error = ctx.error
    if ctx.status != "error" or error is None or not ctx.protocol.startswith(INFERENCE_PROTOCOLS):
        return None
    return {
        "request_id": ctx.request_id,
        "account_id": ctx.principal.account_id if ctx.principal is not None else None,
        "model": ctx.model.id if ctx.model is not None else (ctx.model_id or None),
        "protocol": ctx.protocol, "status": ctx.status, "error": error.kind,
        "duration_ms": int((time.monotonic() - ctx.started) * 1000), **ctx.trace.log_ids(),
    }, error.status >= 500
