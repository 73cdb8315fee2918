"""Canonical <-> the OpenAI-compatible wire that engines speak (vLLM, SGLang, llama.cpp, …).

``request_body`` builds the upstream Chat Completions body; :class:`ChunkDecoder` turns the
engine's stream chunks back into canonical events. The embedded engine reuses both, so
every engine sees the same messages. The relay path's decoder, which hands chunks on as
they are, is :mod:`mesh.engines.openai_relay`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import orjson

from mesh.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    FinishReason,
    ImagePart,
    Message,
    ReasoningDelta,
    ReasoningPart,
    TextDelta,
    TextPart,
    Tool,
    ToolArgsDelta,
    ToolCallPart,
    ToolCallStart,
    ToolResultPart,
    Usage,
    openai_logprobs,
    openai_stop_sequence,
)
from mesh.errors import EngineError

ReasoningField = Literal["reasoning_content", "reasoning"]
DONE = b"[DONE]"  # the SSE payload that ends an OpenAI stream

# Anthropic-style thinking budgets folded onto OpenAI-style effort levels (documented in
# docs/architecture.md): below 2048 tokens is low, below 8192 medium, above that high.
_BUDGET_LOW = 2048
_BUDGET_MEDIUM = 8192


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # Parts go to the engine as the client sent them: its chat template decides how to join
    # them, so a request through Mesh renders the same prompt as one sent to the engine directly.
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts


def _text_content(parts: Sequence[object]) -> str | list[dict[str, Any]]:
    texts = [{"type": "text", "text": p.text} for p in parts if isinstance(p, TextPart)]
    return _content(texts) if texts else ""


def _part(p: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(p, TextPart):
        return {"type": "text", "text": p.text}
    image: dict[str, Any] = {"url": p.url}
    if p.detail:
        image["detail"] = p.detail
    return {"type": "image_url", "image_url": image}


def _tool_result(part: ToolResultPart) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The tool message, plus image parts that must follow in a user message (tools are text-only)."""
    texts = [p for p in part.content if isinstance(p, TextPart)]
    if part.is_error:
        texts = [TextPart("Error: " + (texts[0].text if texts else "")), *texts[1:]]
    images = [_part(p) for p in part.content if isinstance(p, ImagePart)]
    return {"role": "tool", "tool_call_id": part.call_id, "content": _text_content(texts)}, images


def encode_messages(messages: tuple[Message, ...], reasoning_field: ReasoningField) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        parts = m.parts
        if len(parts) == 1 and type(parts[0]) is TextPart:
            # The common turn, one text part: what the general rules below make of it, directly.
            role = m.role
            if role == "system" or role == "assistant":
                out.append({"role": role, "content": str(parts[0].text)})
            else:
                message: dict[str, Any] = {"role": "user", "content": str(parts[0].text)}
                if m.name:
                    message["name"] = m.name
                out.append(message)
            continue
        if m.role == "system":
            out.append({"role": "system", "content": _text_content(m.parts)})
        elif m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant"}
            text = _text_content(m.parts)
            reasoning = "".join(p.text for p in m.parts if isinstance(p, ReasoningPart))
            calls = [
                {"id": p.id, "type": "function", "function": {"name": p.name, "arguments": p.arguments}}
                for p in m.parts
                if isinstance(p, ToolCallPart)
            ]
            msg["content"] = text if (text or not calls) else None
            if calls:
                msg["tool_calls"] = calls
            if reasoning:
                msg[reasoning_field] = reasoning
            out.append(msg)
        else:  # user or tool: tool results become tool messages, in order, before the rest
            rest: list[dict[str, Any]] = []
            images: list[dict[str, Any]] = []
            for p in m.parts:
                if isinstance(p, ToolResultPart):
                    tool_msg, imgs = _tool_result(p)
                    out.append(tool_msg)
                    images.extend(imgs)
                elif isinstance(p, TextPart | ImagePart):
                    rest.append(_part(p))
            rest = images + rest
            if rest:
                message = {"role": "user", "content": _content(rest)}
                if m.name:
                    message["name"] = m.name
                out.append(message)
    return out


def encode_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                k: v
                for k, v in (
                    ("name", t.name),
                    ("description", t.description),
                    ("parameters", t.parameters),
                    ("strict", t.strict),
                )
                if v is not None
            },
        }
        for t in tools
    ]


def _effort(req: CanonicalRequest) -> str | None:
    r = req.reasoning
    if r is None:
        return None
    if r.effort:
        return r.effort
    if r.budget_tokens is not None:
        if r.budget_tokens < _BUDGET_LOW:
            return "low"
        return "medium" if r.budget_tokens < _BUDGET_MEDIUM else "high"
    return None


def request_body(
    req: CanonicalRequest,
    model: str,
    reasoning_field: ReasoningField = "reasoning_content",
    continuous_usage: bool = False,
) -> dict[str, Any]:
    """The upstream body. Always streams and always asks for usage (billing needs it)."""
    stream_options: dict[str, bool] = {"include_usage": True}
    if continuous_usage:
        stream_options["continuous_usage_stats"] = True
    body: dict[str, Any] = {
        "model": model,
        "messages": encode_messages(req.messages, reasoning_field),
        "stream": True,
        "stream_options": stream_options,
    }
    # The optional fields in their order, each only when set (None is never sent).
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    s = req.sampling
    if s.temperature is not None:
        body["temperature"] = s.temperature
    if s.top_p is not None:
        body["top_p"] = s.top_p
    if s.top_k is not None:
        body["top_k"] = s.top_k
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty is not None:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty is not None:
        body["frequency_penalty"] = s.frequency_penalty
    if s.logit_bias is not None:
        body["logit_bias"] = s.logit_bias
    if s.logprobs and s.top_logprobs is not None:
        body["top_logprobs"] = s.top_logprobs
    if req.stop:
        body["stop"] = list(req.stop)
    if req.n != 1:
        body["n"] = req.n
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.user is not None:
        body["user"] = req.user
    if s.logprobs:
        body["logprobs"] = True
    if req.tools:
        body["tools"] = encode_tools(req.tools)
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": tc.name}} if tc.mode == "function" else tc.mode
        )
    if req.response_format is not None:
        rf = req.response_format
        if rf.type == "json_schema":
            schema: dict[str, Any] = {"name": rf.name or "response", "schema": rf.schema or {"type": "object"}}
            if rf.strict is not None:
                schema["strict"] = rf.strict
            if rf.description:
                schema["description"] = rf.description
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        else:
            body["response_format"] = {"type": rf.type}
    if req.reasoning is not None:
        effort = _effort(req)
        if effort is not None:
            body["reasoning_effort"] = effort
        if req.reasoning.enabled is not None:
            # The chat-template switch that Qwen3, GLM (enable_thinking) and DeepSeek (thinking) read.
            on = req.reasoning.enabled
            body["chat_template_kwargs"] = {"enable_thinking": on, "thinking": on}
    if req.continue_final:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    # ``extra`` holds only the extensions the model enables (protocols/extensions.py); never
    # let one overwrite a field Mesh set, nor a template kwarg carry a template.
    for key, value in req.extra.items() if req.extra else ():
        if key == "chat_template_kwargs" and isinstance(value, dict):
            kwargs = {k: v for k, v in value.items() if k != "chat_template"}
            body["chat_template_kwargs"] = {**body.get("chat_template_kwargs", {}), **kwargs}
        elif key not in body:
            body[key] = value
    return body


_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "eos": "stop",
}


def decode_usage(raw: dict[str, Any]) -> Usage:
    # Once per read that carries usage: the honest engine's counts (plain ints, absent or
    # null details) are taken as they are, anything else as _count takes it.
    prompt = raw.get("prompt_tokens")
    if type(prompt) is not int or not 0 <= prompt <= _MAX_COUNT:
        prompt = _count(prompt)
    completion = raw.get("completion_tokens")
    if type(completion) is not int or not 0 <= completion <= _MAX_COUNT:
        completion = _count(completion)
    details = raw.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    details = raw.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    return Usage(prompt, completion, cached, reasoning)


_MAX_COUNT = 2**53


def _count(value: Any) -> int:
    """A token count as an engine reported it; anything but a non-negative number counts as 0.

    A worker's engine is not trusted: a negative count would make settlement fail (and leave
    the customer's hold in place), a string would raise here."""
    if type(value) is int and 0 <= value <= 2**53:  # what every honest engine sends
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        return 0
    return int(min(value, 2**53))


def mid_stream_error(err: Any) -> EngineError:
    """The engine's error event after its first byte (vLLM's ``{"error": {...}}``)."""
    message = err.get("message") if isinstance(err, dict) else str(err)
    failure = EngineError(f"The engine failed mid-stream: {message}")
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, int) and 400 <= code < 500:
        # The request's own fault (a content error): another replica would fail it too.
        failure.replica_fault = failure.retryable = False
    return failure


_UNREAD = object()  # a payload that could not be parsed, after what came before it

# What a chunk of the wrong shape raises (a worker's engine is not trusted to send the right
# one): an engine error like any other, not a gateway failure.
_MALFORMED = (AttributeError, TypeError, ValueError, KeyError, IndexError)


def _malformed() -> EngineError:
    return EngineError("The engine sent a malformed chunk.")


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError("not text")
    return value


class ChunkDecoder:
    """Stateful decoder of ``chat.completion.chunk`` objects into canonical events.

    Re-indexes tool calls per choice from 0 in order of appearance, and remembers the
    engine's usage until :meth:`finish`, which yields it last.
    """

    def __init__(self) -> None:
        self._calls: dict[tuple[int, int], int] = {}
        self._next_call: dict[int, int] = {}
        self.usage: Usage | None = None
        self.finished: set[int] = set()
        self.reasoning_deltas = 0
        self.output_deltas = 0
        # An engine error that came in one read after output: raised once that output is out.
        self.failure: EngineError | None = None

    def decode(self, chunk: dict[str, Any]) -> Iterator[Event]:
        if chunk.get("error"):
            raise mid_stream_error(chunk["error"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            # Cumulative: with continuous usage every chunk has one, and the newest wins.
            self.usage = decode_usage(usage)
            yield self.usage
        for choice in chunk.get("choices") or ():
            idx = int(choice.get("index") or 0)
            delta = choice.get("delta") or choice.get("message") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self.reasoning_deltas += 1
                self.output_deltas += 1
                yield ReasoningDelta(_text(reasoning), idx)
            content = delta.get("content")
            if content:
                self.output_deltas += 1
                yield TextDelta(_text(content), idx, openai_logprobs(choice.get("logprobs")))
            for position, call in enumerate(delta.get("tool_calls") or ()):
                yield from self._tool_call(idx, position, call)
            reason = choice.get("finish_reason")
            if reason:
                if reason == "abort":
                    raise EngineError("The engine aborted the request.")
                self.finished.add(idx)
                yield Finish(_FINISH.get(reason, "stop"), idx, openai_stop_sequence(choice))

    def _parse(self, payload: bytes, delivered: bool) -> Any:
        """One payload's JSON; ``_UNREAD`` (and ``failure`` set) when it is malformed after
        output or usage of the same read, which is delivered first; raises when nothing came
        before. JSON that is not an object is left to the decoder (a malformed chunk)."""
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            if not delivered:
                raise
            self.failure = EngineError("The engine sent malformed JSON.")
            return _UNREAD

    def decode_batch(self, payloads: list[bytes]) -> tuple[list[Event], bool]:
        """The events of the SSE payloads of one read, and whether ``[DONE]`` was among them."""
        events: list[Event] = []
        usage: Any = None
        done = False
        for payload in payloads:
            if payload == DONE:
                done = True
                break
            chunk = self._parse(payload, bool(events) or usage is not None)
            if chunk is _UNREAD:
                break
            reported = chunk.pop("usage", None) if isinstance(chunk, dict) else None
            if isinstance(reported, dict):
                usage = reported  # cumulative: only the newest of the read counts
            try:
                events.extend(self.decode(chunk))
            except (EngineError, *_MALFORMED) as exc:
                err = exc if isinstance(exc, EngineError) else _malformed()
                if not events:
                    raise err from None
                self.failure = err  # what came before it in this read is delivered first
                break
        if usage is not None:
            self.usage = decode_usage(usage)
            events.append(self.usage)
        return events, done

    def _tool_call(self, choice: int, position: int, call: dict[str, Any]) -> Iterator[Event]:
        engine_index = call.get("index")
        key = (choice, int(engine_index) if engine_index is not None else position)
        fn = call.get("function") or {}
        ours = self._calls.get(key)
        if ours is None or (call.get("id") and engine_index is None):
            ours = self._next_call.get(choice, 0)
            self._next_call[choice] = ours + 1
            self._calls[key] = ours
            call_id = call.get("id") or f"call_{choice}_{ours}"
            yield ToolCallStart(ours, _text(call_id), _text(fn.get("name") or ""), choice)
        args = fn.get("arguments")
        if args:
            self.output_deltas += 1
            yield ToolArgsDelta(ours, _text(args), choice)

    def final_usage(self) -> Usage:
        """The engine's usage, with reasoning tokens estimated when the engine omits them."""
        u = self.usage or Usage(output_tokens=self.output_deltas)
        if u.reasoning_tokens == 0 and self.reasoning_deltas:
            u = Usage(u.input_tokens, u.output_tokens, u.cached_tokens, min(self.reasoning_deltas, u.output_tokens))
        return u
