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
from mesh.http.fields import header
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


_ID_FIELDS = frozenset((b"x-request-id", b"request-id"))
_TAGS = TAGS_HEADER.encode("latin-1")


def _stamp(response: Response, rid: str) -> None:
    """Set ``x-request-id`` and ``request-id``: straight onto the raw header list when neither
    is there yet (what ``MutableHeaders`` would do, without building one and scanning the
    list once per header)."""
    raw = response.raw_headers
    if not _ID_FIELDS.isdisjoint([k for k, _ in raw]):
        response.headers["x-request-id"] = rid
        response.headers["request-id"] = rid
        return
    value = rid.encode("latin-1")
    raw.append((b"x-request-id", value))
    raw.append((b"request-id", value))


def _gateway(request: Request) -> Any:
    """The app's gateway, None without one. Read as an item: ``getattr(state, ...)`` first
    fails a normal attribute lookup, then calls ``State.__getattr__`` (five times slower)."""
    try:
        return request.app.state["gateway"]
    except KeyError:
        return None


def _count_error(gateway: Any, protocol: str, kind: str) -> None:
    if gateway is not None:
        gateway.metrics.error(protocol, kind)


def endpoint(protocol: str, render_error: ErrorRenderer) -> Callable[[Handler], Endpoint]:
    traced = protocol.startswith(INFERENCE_PROTOCOLS)
    def wrap(handler: Handler) -> Endpoint:
        async def run(request: Request) -> AnyResponse:
            rid = request_id()
            ctx = RequestContext(request_id=rid, protocol=protocol)
            gateway = _gateway(request)
            if traced and gateway is not None:
                ctx.trace = gateway.tracing.start(request.headers, protocol, rid, ctx.started)
            response: AnyResponse
            try:
                tags = header(request.scope, _TAGS)
                if tags is not None:
                    ctx.tags = parse_tags(tags)
                with ctx.trace.active():
                    response = await handler(request, ctx)
            except MeshError as err:
                ctx.status, ctx.error = "error", err
                ctx.trace.fail(err.kind)
                _count_error(gateway, protocol, err.kind)
                response = error_response(err, _with_request_id(render_error, rid), limits_headers(ctx))
            except Exception:
                internal = InternalError("The server had an error processing your request.")
                ctx.status, ctx.error = "error", internal
                ctx.trace.fail("internal")
                _count_error(gateway, protocol, "internal")
                log.exception("unhandled error in %s (request %s)", protocol, rid)
                response = error_response(internal, _with_request_id(render_error, rid))
            except BaseException:
                if gateway is not None:
                    await gateway.pipeline.finish(ctx)
                raise
            if isinstance(response, StreamResponse):
                if ctx.status == "error":
                    ctx.trace.finish(ctx)  # else the stream's span ends when it settles
                # The stream owns the request's resources until its body is done or abandoned.
                response.on_close = _chain(response.on_close, _finisher(gateway, ctx))
                response.headers["x-request-id"] = rid
                response.headers["request-id"] = rid
                return response
            ctx.trace.finish(ctx)
            if gateway is not None:
                await gateway.pipeline.finish(ctx)
            _stamp(response, rid)
            return response

        run.__name__ = handler.__name__
        return run

    return wrap
