"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic Messages over the pipeline.

Authentication takes ``x-api-key`` or ``Authorization: Bearer``; ``anthropic-version`` and
``anthropic-beta`` headers and the ``?beta=true`` query (Claude Code) are accepted and
ignored. Streams get a ``ping`` whenever idle for ``routing.keepalive_interval`` (queued, or a
long first thought), so proxies and clients do not time out.
"""

from __future__ import annotations

from starlette.requests import Request

from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.responses import JSON
from mesh.canonical import Aggregator
from mesh.gateway import Gateway
from mesh.http.body import read_body
from mesh.http.streaming import StreamResponse
from mesh.pipeline import RequestContext
from mesh.protocols import anthropic_messages

# A streaming request still queued after this long starts its response (message_start, then
# pings while it waits); errors met after that arrive as an in-band ``event: error``.
QUEUE_PATIENCE = 1.0


@endpoint("anthropic.messages", anthropic_messages.render_error)
async def messages(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    p = gw.pipeline
    await p.authenticate(ctx, request.headers.get("authorization"), request.headers.get("x-api-key"))
    body = await read_body(request, gw.settings.server.max_body_bytes)
    creq, options = anthropic_messages.parse_request(body)
    creq = p.resolve(ctx, creq)
    creq = await p.admit(ctx, creq)
    stream = await p.route(ctx, creq, patience=QUEUE_PATIENCE if creq.stream else None)
    assert ctx.model is not None
    meta = anthropic_messages.StreamMeta(
        id="msg_" + ctx.request_id.removeprefix("req_"),
        model=ctx.model.id,
        signature=anthropic_messages.new_signature(),
        request_id=ctx.request_id,
        input_estimate=ctx.prompt_estimate,
        stop_sequences=creq.stop,
        omit_thinking=options.omit_thinking,
        usage_extras=gw.usage_extras(ctx.model),
    )
    headers = gw.response_headers(ctx)
    events = p.metered(ctx, stream)
    if creq.stream:
        sse = anthropic_messages.encode_stream(events, meta)
        return StreamResponse(anthropic_messages.with_pings(sse, gw.settings.routing.keepalive_interval), headers)
    agg = Aggregator()
    async for ev in events:
        agg.add(ev)
    result = agg.result()
    headers["x-mesh-cost"] = gw.cost_text(ctx.model, result.usage)
    return JSON(anthropic_messages.render_response(result, meta), headers=headers)


@endpoint("anthropic.count_tokens", anthropic_messages.render_error)
async def count_tokens(request: Request, ctx: RequestContext) -> AnyResponse:
    """``{"input_tokens": N}``: the engine's own tokenizer when a replica can count, else
    Mesh's prompt estimate (``Pipeline.count_tokens``). Free: nothing is held or charged."""
    gw: Gateway = request.app.state.gateway
    p = gw.pipeline
    await p.authenticate(ctx, request.headers.get("authorization"), request.headers.get("x-api-key"))
    body = await read_body(request, gw.settings.server.max_body_bytes)
    creq = p.resolve(ctx, anthropic_messages.parse_count_request(body))
    return JSON({"input_tokens": await p.count_tokens(ctx, creq)})
