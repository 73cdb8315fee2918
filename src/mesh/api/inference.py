"""One inference handler for every protocol: authenticate, parse, start, then stream or
render. A protocol (``api/chat.py``, ``api/messages.py``, ``api/responses_api.py``) supplies
only what differs: how its body becomes a canonical request and how events and results
become its wire format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from starlette.requests import Request

from mesh.api.common import QUEUE_PATIENCE, aggregate, authenticated_body
from mesh.api.endpoint import AnyResponse, Endpoint, endpoint
from mesh.api.responses import JSON, ErrorRenderer
from mesh.canonical import CanonicalRequest, Event, Result
from mesh.gateway import Gateway
from mesh.http.streaming import StreamResponse
from mesh.request_context import RequestContext
from mesh.routing.pending import PendingStream


class Output(Protocol):
    """How one started request comes back in its protocol (built once the model is known)."""

    def encode(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        """The SSE body of a streamed answer (ending in the protocol's error event on failure)."""
        ...

    def render(self, result: Result) -> Awaitable[dict[str, Any]]:
        """The JSON body of a non-streamed answer."""
        ...


M = TypeVar("M")


@dataclass(slots=True)  # not frozen: one per request, and a frozen __init__ costs 3x
class MetaOutput(Generic[M]):
    """The :class:`Output` of a protocol that is two functions over one request's meta
    (its id, public model name, options): Chat Completions and Messages."""

    meta: M
    encode_stream: Callable[[AsyncIterator[Event], M], AsyncIterator[bytes]]
    render_response: Callable[[Result, M], dict[str, Any]]

    def encode(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        return self.encode_stream(events, self.meta)

    async def render(self, result: Result) -> dict[str, Any]:
        return self.render_response(result, self.meta)


class Call(Protocol):
    """A parsed request, as the protocol understood it."""

    @property
    def request(self) -> CanonicalRequest: ...

    def output(self, gw: Gateway, ctx: RequestContext, request: CanonicalRequest) -> Output: ...


class Wire(Protocol):
    @property
    def name(self) -> str:
        """``openai.chat``: metrics, logs and usage records."""
        ...

    @property
    def render_error(self) -> ErrorRenderer: ...

    @property
    def idle_ping(self) -> bytes | None:
        """The event sent whenever a stream is idle (Anthropic's ``ping``); None: a queued
        stream gets SSE comments until it has a replica, and nothing once it flows."""
        ...

    async def parse(self, gw: Gateway, request: Request, ctx: RequestContext, body: bytes) -> Call: ...

    def relays(self, gw: Gateway, request: CanonicalRequest) -> bool:
        """Whether, for a streamed answer, engines that can should hand their chunks on as
        they are (``Relayed``): only a protocol whose encoder writes them says yes."""
        ...


def inference(wire: Wire) -> Endpoint:
    """The endpoint of ``wire``: the pipeline's steps in order, the same for every protocol."""

    async def handle(request: Request, ctx: RequestContext) -> AnyResponse:
        gw, body = await authenticated_body(request, ctx)
        p = gw.pipeline
        call = await wire.parse(gw, request, ctx, body)
        streamed = call.request.stream
        # An aggregated answer relays whatever the protocol (the Aggregator folds the engine's
        # chunks as they are); a streamed one only where the protocol's encoder writes them.
        ctx.relay = gw.settings.routing.relay and (not streamed or wire.relays(gw, call.request))
        creq, stream = await p.start(ctx, call.request, patience=QUEUE_PATIENCE if streamed else None)
        assert ctx.model is not None
        out = call.output(gw, ctx, creq)
        headers = gw.response_headers(ctx)
        events = p.metered(ctx, stream)
        if streamed:
            ping = wire.idle_ping
            waiting = stream.task if isinstance(stream, PendingStream) and ping is None else None
            return StreamResponse(out.encode(events), headers, waiting=waiting, idle_ping=ping,
                                  keepalive=gw.settings.routing.keepalive_interval)
        result = await aggregate(events)
        body_out = await out.render(result)
        headers["x-mesh-cost"] = gw.cost_text(ctx.model, result.usage)
        return JSON(body_out, headers=headers)

    handle.__name__ = wire.name.replace(".", "_")
    return endpoint(wire.name, wire.render_error)(handle)
