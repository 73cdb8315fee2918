"""OpenAI Chat Completions: wire <-> canonical.

``parse_request`` validates a body into a :class:`CanonicalRequest`; ``render_response``
turns an aggregated :class:`Result` into a ``chat.completion``; ``encode_stream`` turns
canonical events into ``chat.completion.chunk`` SSE lines ending in ``[DONE]``, or in an
in-band error object if the stream fails after it started.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from mesh.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    ImagePart,
    Message,
    Part,
    ReasoningConfig,
    ReasoningDelta,
    ReasoningPart,
    Relayed,
    ResponseFormat,
    Result,
    Sampling,
    TextDelta,
    TextPart,
    TokenLogprob,
    Tool,
    ToolArgsDelta,
    ToolCallPart,
    ToolCallStart,
    ToolChoice,
    ToolResultPart,
    Usage,
)
from mesh.errors import InternalError, InvalidRequest, MeshError
from mesh.http.streaming import LastChunk
from mesh.protocols import openai_chat_wire as w
from mesh.protocols.extensions import keep_known
from mesh.protocols.openai_errors import render_error, stream_error_event
from mesh.protocols.validation import loads_object, validate

__all__ = ["ChatOptions", "StreamMeta", "encode_stream", "parse_request", "render_error", "render_response"]

log = logging.getLogger("mesh.protocols.openai_chat")

SYSTEM_FINGERPRINT = "fp_mesh"
# vLLM/SGLang sampling extras that have a canonical home.
_TOP_K = "top_k"


# ---- request ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """Rendering options that live in the request but are not part of the canonical model."""

    include_usage: bool = False


def parse_request(body: bytes) -> tuple[CanonicalRequest, ChatOptions]:
    """Validate a Chat Completions body. Raises :class:`InvalidRequest` with ``param`` set."""
    raw = loads_object(body)
    req = validate(w.ChatRequestIn, raw)
    if req.functions is not None or req.function_call is not None:
        raise InvalidRequest(
            "Legacy 'functions'/'function_call' are not supported; use 'tools' and 'tool_choice'.",
            param="functions" if req.functions is not None else "function_call",
            code="unsupported_parameter",
        )
    messages = _messages(req.messages)
    tools = tuple(
        Tool(t.function.name, t.function.description, t.function.parameters, t.function.strict)
        for t in req.tools
    ) if req.tools else ()
    unknown = req.model_extra
    extra: dict[str, Any] = {}
    top_k = None
    if unknown:  # most bodies have no unknown fields: nothing to split or check
        extra, dropped = keep_known(unknown)
        if dropped:
            log.debug("ignoring unknown fields: %s", dropped)
        top_k = unknown.get(_TOP_K)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
            raise InvalidRequest("Invalid value for 'top_k': expected an integer.", param="top_k")
    stop = req.stop
    canonical = CanonicalRequest(
        model=req.model,
        messages=messages,
        stream=bool(req.stream),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        n=req.n or 1,
        sampling=_sampling(req, top_k),
        tools=tools,
        tool_choice=None if req.tool_choice is None else _tool_choice(req.tool_choice, tools),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=None if req.response_format is None else _response_format(req.response_format),
        reasoning=ReasoningConfig(enabled=req.reasoning_effort != "none", effort=req.reasoning_effort)
        if req.reasoning_effort
        else None,
        # a blank safety_identifier is not one: it would hide the user from a key's user_budget
        user=req.safety_identifier if req.safety_identifier and req.safety_identifier.strip() else req.user,
        metadata=req.metadata,
        cache_key=req.prompt_cache_key,
        extra=extra,
    )
    return canonical, _WITH_USAGE if req.stream_options and req.stream_options.include_usage else _NO_USAGE


# Immutable, so shared: one construction fewer per request.
_NO_USAGE = ChatOptions()
_WITH_USAGE = ChatOptions(include_usage=True)
_DEFAULT_SAMPLING = Sampling()


def _sampling(req: w.ChatRequestIn, top_k: int | None) -> Sampling:
    """The request's sampling; most set none of it, and share one default (frozen) object."""
    if (
        req.temperature is None and req.top_p is None and top_k is None and req.seed is None
        and req.presence_penalty is None and req.frequency_penalty is None and req.logit_bias is None
        and not req.logprobs and req.top_logprobs is None
    ):
        return _DEFAULT_SAMPLING
    return Sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=top_k,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=req.logit_bias,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs,
    )


def _text_parts(content: str | list[w.TextPartIn]) -> tuple[TextPart, ...]:
    """Text parts as sent (the engine's chat template joins them), at least one."""
    if isinstance(content, str) or not content:
        return (TextPart(content if isinstance(content, str) else ""),)
    return tuple(TextPart(p.text) for p in content)


def _messages(items: list[w.MessageIn]) -> tuple[Message, ...]:
    out: list[Message] = []
    pending: dict[str, int] = {}  # tool call id -> index of the assistant message that made it
    for i, m in enumerate(items):
        if pending and not isinstance(m, w.ToolMessageIn):
            raise InvalidRequest(
                "An assistant message with 'tool_calls' must be followed by tool messages responding "
                f"to each 'tool_call_id'. Missing responses for: {', '.join(sorted(pending))}.",
                param=f"messages[{i}]",
            )
        match m:  # the most common role first
            case w.UserMessageIn():
                content = m.content
                said = (TextPart(content),) if isinstance(content, str) else _user_parts(content, i)
                out.append(Message("user", said, m.name))
            case w.SystemMessageIn():
                out.append(Message("system", _text_parts(m.content), m.name))
            case w.AssistantMessageIn():
                parts: list[Part] = []
                reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
                if reasoning:
                    parts.append(ReasoningPart(reasoning))
                if isinstance(m.content, str):
                    if m.content:
                        parts.append(TextPart(m.content))
                elif m.content:
                    for p in m.content:
                        text = p.text if isinstance(p, w.TextPartIn) else p.refusal
                        if text:
                            parts.append(TextPart(text))
                for call in m.tool_calls or ():
                    parts.append(ToolCallPart(call.id, call.function.name, call.function.arguments))
                    pending[call.id] = i
                out.append(Message("assistant", tuple(parts), m.name))
            case w.ToolMessageIn():
                if m.tool_call_id not in pending:
                    raise InvalidRequest(
                        "Messages with role 'tool' must be a response to a preceding message with "
                        f"'tool_calls'; no call has id {m.tool_call_id!r}.",
                        param=f"messages[{i}].tool_call_id",
                    )
                del pending[m.tool_call_id]
                out.append(Message("tool", (ToolResultPart(m.tool_call_id, _text_parts(m.content)),)))
    return tuple(out)


def _user_parts(content: str | list[w.UserPart], index: int) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (TextPart(content),)
    parts: list[Part] = []
    for j, p in enumerate(content):
        match p:
            case w.TextPartIn():
                parts.append(TextPart(p.text))
            case w.ImagePartIn():
                parts.append(ImagePart(p.image_url.url, p.image_url.detail))
            case _:
                raise InvalidRequest(
                    f"Content parts of type '{p.type}' are not supported; send text or image_url parts.",
                    param=f"messages[{index}].content[{j}]",
                    code="unsupported_content",
                )
    return tuple(parts)


def _tool_choice(choice: w.ToolChoiceIn | None, tools: tuple[Tool, ...]) -> ToolChoice | None:
    if choice is None:
        return None
    names = {t.name for t in tools}
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs at least one tool.", param="tool_choice")
        return ToolChoice(choice)
    if isinstance(choice, w.NamedToolChoiceIn):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names function {choice.function.name!r}, which is not in 'tools'.",
                param="tool_choice",
            )
        return ToolChoice("function", choice.function.name)
    allowed = choice.allowed_tools
    return ToolChoice("required" if allowed.mode == "required" else "auto")


def _response_format(fmt: w.ResponseFormatIn | None) -> ResponseFormat | None:
    match fmt:
        case None | w.TextFormatIn():
            return None
        case w.JSONObjectFormatIn():
            return ResponseFormat("json_object")
        case w.JSONSchemaFormatIn():
            s = fmt.json_schema
            return ResponseFormat("json_schema", s.name, s.schema_, s.description, s.strict)
    return None


# ---- response ---------------------------------------------------------------------------------


def usage_body(usage: Usage, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    if extras:
        body.update(extras)
    return body


def _logprobs_body(lps: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.bytes) if lp.bytes is not None else None,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes) if t.bytes else None}
                    for t in lp.top
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """What an encoder needs besides the events: ids, the public model name and options."""

    id: str
    created: int
    model: str
    include_usage: bool = False
    # Extra usage fields (Mesh's cost), computed when the usage arrives.
    usage_extras: Callable[[Usage], dict[str, Any]] | None = None
    reasoning_fields: tuple[str, ...] = ("reasoning_content",)


def render_response(result: Result, meta: StreamMeta) -> dict[str, Any]:
    """A ``chat.completion`` object for an aggregated result."""
    choices = []
    for c in result.choices:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": c.text if (c.text or not c.tool_calls) else None,
            "refusal": None,
            "annotations": [],
        }
        if c.reasoning:
            for field in meta.reasoning_fields:
                message[field] = c.reasoning
        if c.tool_calls:
            message["tool_calls"] = [
                {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                for t in c.tool_calls
            ]
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": _logprobs_body(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": _finish(c.finish_reason),
            }
        )
    extras = meta.usage_extras(result.usage) if meta.usage_extras else None
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage_body(result.usage, extras),
    }


def _finish(reason: str) -> str:
    return "stop" if reason == "error" else reason


# ---- stream -----------------------------------------------------------------------------------


# The spellings engines use for reasoning text in a delta (vLLM's newer ``reasoning``).
_ENGINE_REASONING = ("reasoning_content", "reasoning")
_DONE = b"data: [DONE]\n\n"
_LAST_DONE = LastChunk(_DONE)


class _ChunkWriter:
    """Serializes chunks around a pre-encoded envelope: only the choices are dumped per chunk."""

    __slots__ = ("_choices_head", "_choices_tail", "_head", "_reasoning", "_tail", "_usage_head")

    def __init__(self, meta: StreamMeta) -> None:
        self._reasoning = meta.reasoning_fields
        envelope = orjson.dumps(
            {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
             "system_fingerprint": SYSTEM_FINGERPRINT}
        )
        self._choices_head = b"data: " + envelope[:-1] + b',"choices":'
        self._choices_tail = b',"usage":null}\n\n' if meta.include_usage else b"}\n\n"
        self._head = self._choices_head + b"["
        self._tail = b"]" + self._choices_tail
        self._usage_head = b"data: " + envelope[:-1] + b',"choices":[],"usage":'

    def choice(self, body: dict[str, Any]) -> bytes:
        return self._head + orjson.dumps(body) + self._tail

    def usage(self, body: dict[str, Any]) -> bytes:
        return self._usage_head + orjson.dumps(body) + b"}\n\n"

    def relayed(self, chunks: list[dict[str, Any]], rename: bool = True) -> bytes:
        """Engine chunks (usage already taken out) as the client gets them, in one piece:
        Mesh's own envelope (its id, creation time, public model name; ``"usage": null``
        only when the client asked for usage) around the engine's choices, with reasoning
        under the field names the client reads. Nothing else of the engine's envelope (its
        id, model, extra fields) reaches the client. ``rename``: whether any delta may carry
        reasoning under the engine's field names (``Relayed.reasoning_fields``)."""
        head, tail = self._choices_head, self._choices_tail
        if len(chunks) == 1:
            return b"".join((head, orjson.dumps(self._renamed(chunks[0]["choices"], rename)), tail))
        parts: list[bytes] = []  # one join for the whole read: no bytes object per chunk
        for c in chunks:
            parts += (head, orjson.dumps(self._renamed(c["choices"], rename)), tail)
        return b"".join(parts)

    def _renamed(self, choices: list[dict[str, Any]], rename: bool) -> list[dict[str, Any]]:
        """``choices`` with reasoning under the client's field names (in place)."""
        if not rename:
            return choices
        for choice in choices:
            delta = choice.get("delta")
            if delta:
                for name in _ENGINE_REASONING:
                    if name in delta:
                        text = delta.pop(name)
                        if text:
                            for field in self._reasoning:
                                delta[field] = text
        return choices


async def encode_stream(events: AsyncIterator[Event], meta: StreamMeta) -> AsyncIterator[bytes]:
    """SSE bytes for a stream of events. A :class:`MeshError` raised by ``events`` ends the
    stream with OpenAI's in-band error object instead of ``[DONE]``."""
    out = _ChunkWriter(meta)
    started: set[int] = set()
    usage: Usage | None = None
    try:
        async for ev in events:
            if isinstance(ev, Relayed):  # the relay path: the engine's chunks, rewritten
                started |= ev.indexes  # the engine opened these choices: a resume's continuation must not again
                yield out.relayed(ev.chunks, ev.reasoning_fields)
                continue
            if isinstance(ev, Usage):
                usage = ev
                continue
            c = ev.choice
            if c not in started:
                started.add(c)
                yield out.choice(
                    {"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
                )
            match ev:
                case TextDelta(text=text, logprobs=lps):
                    yield out.choice(
                        {"index": c, "delta": {"content": text},
                         "logprobs": _logprobs_body(lps) if lps is not None else None, "finish_reason": None}
                    )
                case ReasoningDelta(text=text):
                    yield out.choice(
                        {"index": c, "delta": dict.fromkeys(meta.reasoning_fields, text), "logprobs": None,
                         "finish_reason": None}
                    )
                case ToolCallStart(index=i, id=call_id, name=name):
                    call = {"index": i, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}
                    yield out.choice(
                        {"index": c, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
                    )
                case ToolArgsDelta(index=i, delta=delta):
                    call = {"index": i, "function": {"arguments": delta}}
                    yield out.choice(
                        {"index": c, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
                    )
                case Finish(reason=reason):
                    yield out.choice(
                        {"index": c, "delta": {}, "logprobs": None, "finish_reason": _finish(reason)}
                    )
        if meta.include_usage:
            u = usage or Usage()
            yield LastChunk(out.usage(usage_body(u, meta.usage_extras(u) if meta.usage_extras else None)) + _DONE)
        else:
            yield _LAST_DONE
    except MeshError as err:
        yield LastChunk(stream_error_event(err))
    except Exception:
        log.exception("stream failed")
        yield LastChunk(stream_error_event(InternalError("The stream failed because of an internal error.")))
