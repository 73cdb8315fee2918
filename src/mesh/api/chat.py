"""``POST /v1/chat/completions``: OpenAI Chat Completions over the pipeline."""

from __future__ import annotations

import time

from starlette.requests import Request

from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.responses import JSON
from mesh.canonical import Aggregator
from mesh.gateway import Gateway
from mesh.http.body import read_body
from mesh.http.keepalive import keepalive_while
from mesh.http.streaming import StreamResponse
from mesh.pipeline import PendingStream, RequestContext
from mesh.protocols import openai_chat

# A streaming request still queued after this long starts its response and sends keep-alives.
QUEUE_PATIENCE = 1.0


@endpoint("openai.chat", openai_chat.render_error)
async def chat_completions(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    p = gw.pipeline
    await p.authenticate(ctx, request.headers.get("authorization"), request.headers.get("x-api-key"))
    body = await read_body(request, gw.settings.server.max_body_bytes)
    creq, options = openai_chat.parse_request(body)
    creq = p.resolve(ctx, creq)
    creq = await p.admit(ctx, creq)
    stream = await p.route(ctx, creq, patience=QUEUE_PATIENCE if creq.stream else None)
    assert ctx.model is not None
    meta = openai_chat.StreamMeta(
        id="chatcmpl-" + ctx.request_id.removeprefix("req_"),
        created=int(time.time()),
        model=ctx.model.id,
        include_usage=options.include_usage,
        usage_extras=gw.usage_extras(ctx.model),
        reasoning_fields=gw.reasoning_fields,
    )
    headers = gw.response_headers(ctx)
    events = p.metered(ctx, stream)
    if creq.stream:
        waiting = stream.task if isinstance(stream, PendingStream) else None
        sse = openai_chat.encode_stream(events, meta)
        return StreamResponse(keepalive_while(waiting, sse, gw.settings.routing.keepalive_interval), headers)
    agg = Aggregator()
    async for ev in events:
        agg.add(ev)
    result = agg.result()
    headers["x-mesh-cost"] = gw.cost_text(ctx.model, result.usage)
    return JSON(openai_chat.render_response(result, meta), headers=headers)
