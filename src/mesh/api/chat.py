"""``POST /v1/chat/completions``: OpenAI Chat Completions over the pipeline.

A streamed request takes the relay path (:func:`relays`): an engine that speaks the same
protocol (``OpenAIEngine``) hands its chunks on as they are, rewritten only where Mesh must
(its id, the public model name, reasoning field names, usage), instead of being decoded into
canonical events and encoded again. Everything else about the request is the same pipeline.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from mesh.api.common import QUEUE_PATIENCE, aggregate, authenticated_body
from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.responses import JSON
from mesh.canonical import CanonicalRequest
from mesh.config import Settings
from mesh.http.streaming import StreamResponse
from mesh.pipeline import PendingStream, RequestContext
from mesh.protocols import openai_chat


def relays(settings: Settings, request: CanonicalRequest) -> bool:
    """The relay path's predicate: a streamed Chat Completions request, unless the operator
    turned the relay off (``routing.relay: false``). Engines that cannot relay still stream
    canonical events, which the same encoder writes."""
    return settings.routing.relay and request.stream


@endpoint("openai.chat", openai_chat.render_error)
async def chat_completions(request: Request, ctx: RequestContext) -> AnyResponse:
    gw, body = await authenticated_body(request, ctx)
    p = gw.pipeline
    parsed, options = openai_chat.parse_request(body)
    ctx.relay = relays(gw.settings, parsed)
    creq, stream = await p.start(ctx, parsed, patience=QUEUE_PATIENCE if parsed.stream else None)
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
        return StreamResponse(sse, headers, waiting=waiting, keepalive=gw.settings.routing.keepalive_interval)
    result = await aggregate(events)
    headers["x-mesh-cost"] = gw.cost_text(ctx.model, result.usage)
    return JSON(openai_chat.render_response(result, meta), headers=headers)
