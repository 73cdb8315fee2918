"""Steps every inference endpoint shares before and after its protocol's own work."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from mesh.canonical import Aggregator, Event, Result
from mesh.gateway import Gateway
from mesh.http.body import read_body
from mesh.http.credentials import single
from mesh.http.fields import ScopeHeaders, header
from mesh.request_context import RequestContext

# A streaming request still queued after this long starts its response and sends
# keep-alives (SSE comments, or Anthropic pings) while it waits.
QUEUE_PATIENCE = 1.0


async def authenticated_body(request: Request, ctx: RequestContext) -> tuple[Gateway, bytes]:
    """Authenticate (Bearer or x-api-key), then read the body under the size cap."""
    gw: Gateway = request.app.state["gateway"]  # an item: as an attribute it costs 0.4 us more
    scope = request.scope
    fields = ScopeHeaders(scope)
    await gw.pipeline.authenticate(ctx, single(fields, "authorization"), single(fields, "x-api-key"))
    ctx.session_hint = header(scope, b"x-session-id")
    return gw, await read_body(request, gw.settings.server.max_body_bytes)


async def aggregate(events: AsyncIterator[Event]) -> Result:
    """A non-streamed answer: the whole event stream folded into a Result."""
    agg = Aggregator()
    async for ev in events:
        agg.add(ev)
    return agg.result()
