"""Anthropic Messages responses: the ``message`` object, usage and stop reasons.

Shared by the non-streaming renderer here and the stream encoder (``anthropic_stream``).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from mesh.canonical import FinishReason, Result, Usage

__all__ = ["StreamMeta", "new_signature", "render_response", "stop_reason", "tool_input", "usage_body"]

SIGNATURE_BYTES = 48


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """What the renderers need besides the events: ids, the public model name, options.

    ``input_estimate`` is the ``input_tokens`` that ``message_start`` announces (the real
    count only arrives with the engine's final usage, in ``message_delta``). ``signature``
    is the invented signature of thinking blocks.
    """

    id: str
    model: str
    signature: str
    request_id: str | None = None
    input_estimate: int = 0
    stop_sequences: tuple[str, ...] = ()
    omit_thinking: bool = False
    usage_extras: Callable[[Usage], dict[str, Any]] | None = None


def usage_body(usage: Usage, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Anthropic usage: ``input_tokens`` excludes cached input, reported as cache reads."""
    body: dict[str, Any] = {
        "input_tokens": max(0, usage.input_tokens - usage.cached_tokens),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }
    if usage.reasoning_tokens:
        body["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    if extras:
        body.update(extras)
    return body


def stop_reason(
    reason: FinishReason, matched: str | None, tool_calls: bool, stop_sequences: Sequence[str]
) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)``; a matched stop counts only if the client asked for it."""
    match reason:
        case "length":
            return "max_tokens", None
        case "tool_calls":
            return "tool_use", None
        case "content_filter":
            return "refusal", None
    if tool_calls:
        return "tool_use", None
    if matched is not None and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the ``input`` object; empty or invalid becomes ``{}``."""
    try:
        value = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def render_response(result: Result, meta: StreamMeta) -> dict[str, Any]:
    """A ``message`` object for an aggregated result: thinking, then text, then tool_use blocks."""
    choice = result.choices[0]
    content: list[dict[str, Any]] = []
    if choice.reasoning:
        thinking = "" if meta.omit_thinking else choice.reasoning
        content.append({"type": "thinking", "thinking": thinking, "signature": meta.signature})
    if choice.text.strip():
        content.append({"type": "text", "text": choice.text})
    for call in choice.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments)})
    reason, sequence = stop_reason(
        choice.finish_reason, choice.stop_sequence, bool(choice.tool_calls), meta.stop_sequences
    )
    extras = meta.usage_extras(result.usage) if meta.usage_extras else None
    return {
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_body(result.usage, extras),
    }


def new_signature() -> str:
    """An opaque signature for thinking blocks. Mesh cannot sign the model's thinking the way
    Anthropic does; it invents one per response and accepts any signature back unchecked."""
    return base64.b64encode(secrets.token_bytes(SIGNATURE_BYTES)).decode()
