"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic Messages over the pipeline.

Authentication takes ``x-api-key`` or ``Authorization: Bearer``; ``anthropic-version`` and
``anthropic-beta`` headers and the ``?beta=true`` query (Claude Code) are accepted and
ignored. Streams get a ``ping`` whenever idle for ``routing.keepalive_interval`` (queued, or a
long first thought), so proxies and clients do not time out.
"""

from __future__ import annotations

from starlette.requests import Request

from mesh.api.common import QUEUE_PATIENCE, aggregate, authenticated_body
from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.responses import JSON
from mesh.http.streaming import StreamResponse
from mesh.pipeline import RequestContext
from mesh.protocols import anthropic_messages


@endpoint("anthropic.messages", anthropic_messages.render_error)
async def messages(request: Request, ctx: RequestContext) -> AnyResponse:
    gw, body = await authenticated_body(request, ctx)
    p = gw.pipeline
    parsed, options = anthropic_messages.parse_request(body)
    creq, stream = await p.start(ctx, parsed, patience=QUEUE_PATIENCE if parsed.stream else None)
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
    result = await aggregate(events)
    headers["x-mesh-cost"] = gw.cost_text(ctx.model, result.usage)
    return JSON(anthropic_messages.render_response(result, meta), headers=headers)


@endpoint("anthropic.count_tokens", anthropic_messages.render_error)
async def count_tokens(request: Request, ctx: RequestContext) -> AnyResponse:
    """``{"input_tokens": N}``: the engine's own tokenizer when a replica can count, else
    Mesh's prompt estimate (``Pipeline.count_tokens``). Free (nothing is held or charged)
    but rate-limited like any request, and refused (400) past what the context can hold."""
    gw, body = await authenticated_body(request, ctx)
    creq = await gw.pipeline.resolve(ctx, anthropic_messages.parse_count_request(body), fit_context=False)
    count = await gw.pipeline.count_tokens(ctx, creq)
    return JSON({"input_tokens": count}, headers=gw.response_headers(ctx))
