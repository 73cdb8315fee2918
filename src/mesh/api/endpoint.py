"""Wraps a handler with a request id and protocol-shaped error rendering.

Every response, error or not, carries ``x-request-id`` and ``request-id``; an error after
the rate limits were consulted (a 429 above all) carries their headers too. No exception
escapes as a traceback: unknown ones are logged and answered as the protocol's 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mesh.api.responses import ErrorRenderer, error_response
from mesh.billing.attribution import TAGS_HEADER, parse_tags
from mesh.errors import InternalError, MeshError
from mesh.http.ids import request_id
from mesh.http.streaming import StreamResponse
from mesh.limits.headers import limits_headers
from mesh.request_context import INFERENCE_PROTOCOLS, RequestContext

log = logging.getLogger("mesh.api")

AnyResponse = Response | StreamResponse
Handler = Callable[[Request, RequestContext], Awaitable[AnyResponse]]
Endpoint = Callable[[Request], Awaitable[AnyResponse]]


def _with_request_id(render: ErrorRenderer, rid: str) -> ErrorRenderer:
    """Fill in the ``request_id`` a renderer left empty in its body (Anthropic's errors carry one)."""

    def render_with_id(err: MeshError) -> tuple[int, dict[str, Any]]:
        status, body = render(err)
        if "request_id" in body and body["request_id"] is None:
            body = {**body, "request_id": rid}
        return status, body

    return render_with_id


def _finisher(gateway: Any, ctx: RequestContext) -> Callable[[], Awaitable[None]]:
    """``Pipeline.finish`` for this request: whatever it opened or held comes back."""

    async def finish() -> None:
        if gateway is not None:
            await gateway.pipeline.finish(ctx)

    return finish


def _chain(
    first: Callable[[], Awaitable[None]] | None, then: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    if first is None:
        return then

    async def both() -> None:
        try:
            await first()
        finally:
            await then()

    return both


def _count_error(gateway: Any, protocol: str, kind: str) -> None:
    if gateway is not None:
        gateway.metrics.error(protocol, kind)


def endpoint(protocol: str, render_error: ErrorRenderer) -> Callable[[Handler], Endpoint]:
    traced = protocol.startswith(INFERENCE_PROTOCOLS)
    def wrap(handler: Handler) -> Endpoint:
        async def run(request: Request) -> AnyResponse:
            ctx = RequestContext(request_id=request_id(), protocol=protocol)
            gateway = getattr(request.app.state, "gateway", None)
            if traced and gateway is not None:
                ctx.trace = gateway.tracing.start(request.headers, protocol, ctx.request_id, ctx.started)
            response: AnyResponse
            finish = _finisher(gateway, ctx)
            try:
                ctx.tags = parse_tags(request.headers.get(TAGS_HEADER))
                with ctx.trace.active():
                    response = await handler(request, ctx)
            except MeshError as err:
                ctx.status, ctx.error = "error", err
                ctx.trace.fail(err.kind)
                _count_error(gateway, protocol, err.kind)
                response = error_response(err, _with_request_id(render_error, ctx.request_id), limits_headers(ctx))
            except Exception:
                internal = InternalError("The server had an error processing your request.")
                ctx.status, ctx.error = "error", internal
                ctx.trace.fail("internal")
                _count_error(gateway, protocol, "internal")
                log.exception("unhandled error in %s (request %s)", protocol, ctx.request_id)
                response = error_response(internal, _with_request_id(render_error, ctx.request_id))
            except BaseException:
                await finish()
                raise
            if not isinstance(response, StreamResponse) or ctx.status == "error":
                ctx.trace.finish(ctx)  # a stream's span ends when it settles
            if isinstance(response, StreamResponse):
                # The stream owns the request's resources until its body is done or abandoned.
                response.on_close = _chain(response.on_close, finish)
            else:
                await finish()
            response.headers["x-request-id"] = ctx.request_id
            response.headers["request-id"] = ctx.request_id
            return response

        run.__name__ = handler.__name__
        return run

    return wrap
