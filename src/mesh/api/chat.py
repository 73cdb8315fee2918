"""``POST /v1/chat/completions``: OpenAI Chat Completions over the pipeline.

A streamed request takes the relay path (:meth:`Chat.relays`): an engine that speaks the
same protocol (``OpenAIEngine``) hands its chunks on as they are, rewritten only where Mesh
must (its id, the public model name, reasoning field names, usage), instead of being decoded
into canonical events and encoded again. Everything else about the request is the same
pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request

from mesh.api.inference import MetaOutput, inference
from mesh.canonical import CanonicalRequest
from mesh.gateway import Gateway
from mesh.protocols import openai_chat
from mesh.request_context import RequestContext


@dataclass(frozen=True, slots=True)
class _Call:
    request: CanonicalRequest
    options: openai_chat.ChatOptions

    def output(
        self, gw: Gateway, ctx: RequestContext, request: CanonicalRequest
    ) -> MetaOutput[openai_chat.StreamMeta]:
        assert ctx.model is not None
        return MetaOutput(openai_chat.StreamMeta(
            id="chatcmpl-" + ctx.request_id.removeprefix("req_"),
            created=int(time.time()),
            model=ctx.model.id,
            include_usage=self.options.include_usage,
            usage_extras=gw.usage_extras(ctx.model),
            reasoning_fields=gw.reasoning_fields,
        ), openai_chat.encode_stream, openai_chat.render_response)


class Chat:
    name = "openai.chat"
    render_error = staticmethod(openai_chat.render_error)
    idle_ping = None

    async def parse(self, gw: Gateway, request: Request, ctx: RequestContext, body: bytes) -> _Call:
        return _Call(*openai_chat.parse_request(body))

    def relays(self, gw: Gateway, request: CanonicalRequest) -> bool:
        """The relay path's predicate: a streamed Chat Completions request, unless the operator
        turned the relay off (``routing.relay: false``). Engines that cannot relay still
        stream canonical events, which the same encoder writes."""
        return gw.settings.routing.relay and request.stream


chat_completions = inference(Chat())
