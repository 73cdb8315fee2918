"""The Responses API's output side: the response object, its output items and usage.

Shared by the non-streaming renderer (here) and the stream encoder
(``openai_responses_stream``), so a streamed ``response.completed`` carries exactly the
object a non-streamed call returns.

Reasoning items follow vLLM: the model's raw thinking is ``content: [{"type":
"reasoning_text", "text"}]`` and ``summary`` is ``[]`` (no summariser runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.canonical import Choice, FinishReason, Result, TokenLogprob, Usage
from mesh.protocols.openai_responses_items import encode_reasoning, new_id

Status = Literal["completed", "incomplete", "failed", "in_progress"]
ItemStatus = Literal["completed", "incomplete", "in_progress"]


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response object of one call shares besides its output.

    ``echo`` holds the request settings echoed back (instructions, tools, tool_choice, …)
    with the public model name; ``encrypted_reasoning`` is the client's
    ``include: ["reasoning.encrypted_content"]``; ``usage_extras`` adds Mesh's cost.
    ``new_id`` (prefix -> item id) and ``clock`` are replaceable for reproducible tests.
    """

    id: str
    created_at: int
    model: str
    echo: Mapping[str, Any] = field(default_factory=dict)
    encrypted_reasoning: bool = False
    usage_extras: Callable[[Usage], dict[str, Any]] | None = None
    new_id: Callable[[str], str] = new_id
    clock: Callable[[], float] = time.time


def finish_status(reason: FinishReason | None) -> tuple[Status, str | None]:
    """The response status and ``incomplete_details.reason`` for a finish reason."""
    if reason == "length":
        return "incomplete", "max_output_tokens"
    if reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def usage_body(usage: Usage, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }
    if extras:
        body.update(extras)
    return body


def logprobs_body(lps: tuple[TokenLogprob, ...] | None) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.bytes or ()),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes or ())} for t in lp.top],
        }
        for lp in lps or ()
    ]


def reasoning_item(item_id: str, text: str, status: ItemStatus, encrypted: bool) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }
    if encrypted:
        item["encrypted_content"] = encode_reasoning(text)
    return item


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, parts: list[dict[str, Any]], status: ItemStatus) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": parts}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: ItemStatus) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(choice: Choice, meta: ResponseMeta) -> list[dict[str, Any]]:
    """Reasoning, then the message (skipped when empty), then one item per function call."""
    items: list[dict[str, Any]] = []
    if choice.reasoning:
        items.append(reasoning_item(meta.new_id("rs_"), choice.reasoning, "completed", meta.encrypted_reasoning))
    if choice.text:
        part = text_part(choice.text, logprobs_body(choice.logprobs))
        items.append(message_item(meta.new_id("msg_"), [part], "completed"))
    for call in choice.tool_calls:
        items.append(function_call_item(meta.new_id("fc_"), call.id, call.name, call.arguments, "completed"))
    if items and finish_status(choice.finish_reason)[0] == "incomplete":
        items[-1]["status"] = "incomplete"
    return items


def response_object(
    meta: ResponseMeta,
    status: Status,
    output: list[dict[str, Any]],
    usage: Usage | None,
    *,
    incomplete_reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``response`` object; ``usage`` None renders as null (in-progress and failed)."""
    body: dict[str, Any] = {
        "id": meta.id,
        "object": "response",
        "created_at": meta.created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "model": meta.model,
        **meta.echo,
        "output": output,
        "usage": None,
    }
    if status in ("completed", "incomplete"):
        body["completed_at"] = int(meta.clock())
    if usage is not None:
        body["usage"] = usage_body(usage, meta.usage_extras(usage) if meta.usage_extras else None)
    return body


def render_response(result: Result, meta: ResponseMeta) -> dict[str, Any]:
    """The ``response`` object for an aggregated (non-streamed) result."""
    choice = result.choices[0]
    status, reason = finish_status(choice.finish_reason)
    return response_object(meta, status, output_items(choice, meta), result.usage, incomplete_reason=reason)
