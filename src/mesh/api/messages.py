"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic Messages over the pipeline.

Authentication takes ``x-api-key`` or ``Authorization: Bearer``; ``anthropic-version`` and
``anthropic-beta`` headers and the ``?beta=true`` query (Claude Code) are accepted and
ignored. Streams get a ``ping`` whenever idle for ``routing.keepalive_interval`` (queued, or a
long first thought), so proxies and clients do not time out.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from mesh.api.common import authenticated_body
from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.inference import MetaOutput, inference
from mesh.api.responses import JSON
from mesh.canonical import CanonicalRequest
from mesh.gateway import Gateway
from mesh.protocols import anthropic_messages
from mesh.request_context import RequestContext


@dataclass(frozen=True, slots=True)
class _Call:
    request: CanonicalRequest
    options: anthropic_messages.MessagesOptions

    def output(
        self, gw: Gateway, ctx: RequestContext, request: CanonicalRequest
    ) -> MetaOutput[anthropic_messages.StreamMeta]:
        assert ctx.model is not None
        return MetaOutput(anthropic_messages.StreamMeta(
            id="msg_" + ctx.request_id.removeprefix("req_"),
            model=ctx.model.id,
            signature=anthropic_messages.new_signature(),
            request_id=ctx.request_id,
            input_estimate=ctx.prompt_estimate,
            stop_sequences=request.stop,
            omit_thinking=self.options.omit_thinking,
            usage_extras=gw.usage_extras(ctx.model),
        ), anthropic_messages.encode_stream, anthropic_messages.render_response)


class Messages:
    name = "anthropic.messages"
    render_error = staticmethod(anthropic_messages.render_error)
    idle_ping = anthropic_messages.PING  # whenever the stream is idle, queued or not

    async def parse(self, gw: Gateway, request: Request, ctx: RequestContext, body: bytes) -> _Call:
        return _Call(*anthropic_messages.parse_request(body))

    def relays(self, gw: Gateway, request: CanonicalRequest) -> bool:
        return False  # no engine speaks Anthropic Messages: always the canonical path


messages = inference(Messages())


@endpoint("anthropic.count_tokens", anthropic_messages.render_error)
async def count_tokens(request: Request, ctx: RequestContext) -> AnyResponse:
    """``{"input_tokens": N}``: the engine's own tokenizer when a replica can count, else
    Mesh's prompt estimate (``Pipeline.count_tokens``). Free (nothing is held or charged)
    but rate-limited like any request, and refused (400) past what the context can hold."""
    gw, body = await authenticated_body(request, ctx)
    creq = await gw.pipeline.resolve(ctx, anthropic_messages.parse_count_request(body), fit_context=False)
    count = await gw.pipeline.count_tokens(ctx, creq)
    return JSON({"input_tokens": count}, headers=gw.response_headers(ctx))
