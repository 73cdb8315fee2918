"""One inference handler for every protocol: authenticate, parse, start, then stream or
render. A protocol (``api/chat.py``, ``api/messages.py``, ``api/responses_api.py``) supplies
only what differs: how its body becomes a canonical request and how events and results
become its wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from starlette.requests import Request
from starlette.types import Send

from mesh.api.common import QUEUE_PATIENCE, aggregate, authenticated_body
from mesh.api.endpoint import AnyResponse, Endpoint, endpoint
from mesh.api.responses import JSON, ErrorRenderer
from mesh.canonical import CanonicalRequest, Event, Result
from mesh.gateway import Gateway
from mesh.http.streaming import ON_DISCONNECT, StreamResponse
from mesh.request_context import RequestContext
from mesh.routing.pending import PendingStream
from mesh.routing.router import RoutedStream


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


class _Queued:
    """A stream's route, run in the request's own task, past its patience: the timer's
    :meth:`impatient` starts the response from a task of its own (the head, then keep-alives
    or the protocol's pings) and listens for a hang-up, which cancels the route; once the
    route ends, the handler hands its outcome over (:meth:`routed`, :meth:`failed`) and
    returns that same response. Nothing of this exists for a route within its patience."""

    __slots__ = ("build", "gone", "on_disconnect", "response", "send", "task", "waiting")

    def __init__(self, on_disconnect: Callable[[Callable[[], None] | None], bool], send: Send,
                 build: Callable[[asyncio.Future[RoutedStream]], StreamResponse]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.on_disconnect = on_disconnect
        self.send = send
        self.build = build
        self.gone = False
        self.response: StreamResponse | None = None  # built once the patience ran out
        self.waiting: asyncio.Future[Any] | None = None  # the route's outcome (a RoutedStream), for the response

    def impatient(self) -> None:
        """The patience ran out with the route still under way (called by the event loop)."""
        self.waiting = waiting = self.task.get_loop().create_future()
        self.response = response = self.build(waiting)
        if self.on_disconnect(self._hung_up):
            response.start_early(self.send)
        else:  # the client left already: the route is of no use
            self._hung_up()

    def _hung_up(self) -> None:
        if not self.gone:
            self.gone = True
            self.task.cancel()  # the route, which gives back what it took

    def routed(self, stream: RoutedStream | PendingStream) -> StreamResponse:
        assert self.response is not None and self.waiting is not None
        self.on_disconnect(None)  # the response listens again once called
        if self.gone:
            self.task.uncancel()
        self.waiting.set_result(stream)
        return self.response

    async def failed(self, exc: BaseException) -> StreamResponse:
        """A route that failed: its error goes out as the protocol's in-stream error event
        (already settled, in ``Pipeline._route``). A route cancelled by the client's hang-up
        ends here (the response, called, only closes); another cancellation is raised."""
        assert self.response is not None and self.waiting is not None
        self.on_disconnect(None)
        others = self.gone and self.task.uncancel() > 0  # cancelled by someone else as well
        if isinstance(exc, Exception) and not others:
            self.waiting.set_exception(exc)
            self.waiting.exception()  # retrieved: a client gone never iterates it
            return self.response
        self.waiting.cancel()
        if not self.gone or others or not isinstance(exc, asyncio.CancelledError):
            await self.response.aclose()  # its early task, its body
            raise asyncio.CancelledError if others else exc
        return self.response


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
        if not streamed:
            creq, routed = await p.start(ctx, call.request)
            assert ctx.model is not None
            out = call.output(gw, ctx, creq)
            headers = gw.response_headers(ctx)
            result = await aggregate(p.metered(ctx, routed))
            body_out = await out.render(result)
            headers["x-mesh-cost"] = gw.cost_text(ctx.model, result.usage)
            return JSON(body_out, headers=headers)

        ping = wire.idle_ping
        keepalive = gw.settings.routing.keepalive_interval

        def respond(stream: RoutedStream | PendingStream, waiting: asyncio.Future[Any] | None) -> StreamResponse:
            out = call.output(gw, ctx, creq)
            headers = gw.response_headers(ctx)
            events = p.metered(ctx, stream)
            return StreamResponse(out.encode(events), headers, waiting=waiting, idle_ping=ping, keepalive=keepalive)

        on_disconnect = request.scope.get(ON_DISCONNECT)
        if on_disconnect is None:  # not Mesh's server: the route in a task of its own (PendingStream)
            creq, stream = await p.start(ctx, call.request, patience=QUEUE_PATIENCE)
            waiting = stream.task if isinstance(stream, PendingStream) and ping is None else None
            return respond(stream, waiting)

        creq = await p.resolve(ctx, call.request)
        creq = await p.admit(ctx, creq)

        def early(waiting: asyncio.Future[RoutedStream]) -> StreamResponse:
            # As a response returned now would be: the request ids the endpoint adds as well.
            response = respond(PendingStream(waiting), waiting if ping is None else None)
            response.headers["x-request-id"] = response.headers["request-id"] = ctx.request_id
            return response

        queued = _Queued(on_disconnect, request._send, early)
        try:
            stream = await p.route(ctx, creq, patience=QUEUE_PATIENCE, impatient=queued.impatient)
        except BaseException as exc:
            if queued.response is None:
                raise
            return await queued.failed(exc)
        if queued.response is not None:
            return queued.routed(stream)
        return respond(stream, None)

    handle.__name__ = wire.name.replace(".", "_")
    return endpoint(wire.name, wire.render_error)(handle)
