"""Responses input items and tools: validation, the stored item shape, and canonical messages.

An input list is validated item by item (errors name ``input[i]…``). Items become canonical
messages with the same rules OpenAI applies: consecutive assistant output (reasoning,
message, function calls) forms one assistant turn, reasoning attaches to the turn that
follows it, and every ``function_call_output`` answers an earlier ``function_call`` that
must itself be answered before the next user message (OpenAI's rule).

Reasoning round trip: a reasoning item Mesh returns carries the raw thinking in
``content`` and, when the client asked for ``include: ["reasoning.encrypted_content"]``, an
opaque ``encrypted_content`` that encodes the same text. Clients that resend only
``summary`` and ``encrypted_content`` (Codex does) therefore keep their reasoning. It is
the client's own model output, so it is encoded, not encrypted; blobs Mesh did not make
(another provider's) are ignored.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from mesh.canonical import ImagePart, Message, Part, ReasoningPart, TextPart, ToolCallPart, ToolResultPart
from mesh.errors import InvalidRequest
from mesh.protocols import openai_responses_wire as w
from mesh.protocols.validation import validate

log = logging.getLogger("mesh.protocols.openai_responses")

ENCRYPTED_REASONING_PREFIX = "mesh.r1."
_ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# ---- reasoning codec ----------------------------------------------------------------------------


def encode_reasoning(text: str) -> str:
    """The ``encrypted_content`` Mesh returns for a reasoning item's text."""
    return ENCRYPTED_REASONING_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()


def decode_reasoning(blob: str | None) -> str | None:
    """The text behind an ``encrypted_content`` Mesh made, else ``None``."""
    if not blob or not blob.startswith(ENCRYPTED_REASONING_PREFIX):
        return None
    try:
        return base64.b64decode(blob[len(ENCRYPTED_REASONING_PREFIX) :], altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        return None


def reasoning_text(item: w.ReasoningIn) -> str:
    """Raw thinking if present, else what Mesh's ``encrypted_content`` holds, else the summary."""
    if item.content:
        return "".join(p.text for p in item.content)
    decoded = decode_reasoning(item.encrypted_content)
    if decoded is not None:
        return decoded
    return "\n\n".join(s.text for s in item.summary)


# ---- validation ---------------------------------------------------------------------------------


def parse_item(raw: Any, where: str) -> w.Item:
    """Validate one input item; ``where`` (``input[3]``) names it in errors."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"Invalid value for '{where}': each input item must be an object.", param=where)
    kind = raw.get("type", "message" if "role" in raw else None)
    if not isinstance(kind, str):
        raise InvalidRequest(f"Missing required parameter: '{where}.type'.", param=f"{where}.type")
    model = w.ITEM_MODELS.get(kind)
    if model is not None:
        return validate(model, raw, where)
    if kind in w.HOSTED_ITEM_TYPES:
        return w.HostedItemIn.model_validate(raw)
    raise InvalidRequest(
        f"Invalid value for '{where}.type': input items of type '{kind}' are not supported.",
        param=f"{where}.type",
        code="invalid_value",
    )


def parse_items(raw: str | list[Any] | None) -> tuple[w.Item, ...]:
    """``input``: a string is one user message."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (w.MessageIn(role="user", content=raw),)
    return tuple(parse_item(item, f"input[{i}]") for i, item in enumerate(raw))


def parse_tools(raw: list[Any] | None) -> tuple[w.FunctionToolIn, ...]:
    """The function tools. Tools of other types (hosted, ``namespace``, ``custom``, …) are
    accepted and dropped: no engine runs them, and the response does not list them."""
    tools: list[w.FunctionToolIn] = []
    dropped: list[str] = []
    names: set[str] = set()
    for i, t in enumerate(raw or ()):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise InvalidRequest(f"Invalid value for '{where}': each tool must be an object.", param=where)
        kind = t.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest(f"Missing required parameter: '{where}.type'.", param=f"{where}.type")
        if kind != "function":
            dropped.append(kind)
            continue
        tool = validate(w.FunctionToolIn, t, where)
        if tool.name in names:
            raise InvalidRequest(
                f"Invalid value for '{where}.name': the function name {tool.name!r} is used twice.",
                param=f"{where}.name",
            )
        names.add(tool.name)
        tools.append(tool)
    if dropped:
        log.debug("dropping tools that no engine runs: %s", sorted(set(dropped)))
    return tuple(tools)


# ---- the stored shape ---------------------------------------------------------------------------


def _stored_part(part: BaseModel) -> dict[str, Any]:
    out = part.model_dump(exclude_none=True)
    if out["type"] == "output_text":
        out["annotations"] = []
    return out


def stored_item(item: w.Item) -> dict[str, Any]:
    """An input item as stored and as ``input_items`` lists it: typed, with an id and status."""
    if isinstance(item, w.HostedItemIn):
        return item.model_dump(exclude_none=True)
    kind = item.type
    out: dict[str, Any] = {"type": kind, "id": item.id or new_id(_ID_PREFIXES.get(kind, "item_"))}
    match item:
        case w.MessageIn():
            out["role"] = item.role
            if isinstance(item.content, str):
                part: dict[str, Any] = (
                    {"type": "output_text", "text": item.content, "annotations": []}
                    if item.role == "assistant"
                    else {"type": "input_text", "text": item.content}
                )
                out["content"] = [part]
            else:
                out["content"] = [_stored_part(p) for p in item.content]
        case w.FunctionCallIn():
            out.update(call_id=item.call_id, name=item.name, arguments=item.arguments)
        case w.FunctionCallOutputIn():
            out["call_id"] = item.call_id
            out["output"] = (
                item.output if isinstance(item.output, str) else [p.model_dump(exclude_none=True) for p in item.output]
            )
        case w.ReasoningIn():
            out["summary"] = [s.model_dump() for s in item.summary]
            if item.content is not None:
                out["content"] = [c.model_dump() for c in item.content]
            if item.encrypted_content is not None:
                out["encrypted_content"] = item.encrypted_content
    if not isinstance(item, w.ItemReferenceIn):
        out["status"] = item.status or "completed"
    return out


# ---- to canonical -------------------------------------------------------------------------------


def _unsupported(where: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid value for '{where}': {what} are not supported; send text and image_url content.",
        param=where,
        code="unsupported_content",
    )


def _image(p: w.InputImageIn, where: str) -> ImagePart:
    if not p.image_url:
        raise _unsupported(where, "images by file_id")
    return ImagePart(p.image_url, p.detail)


def _content_parts(content: str | list[Any], where: str, images: bool) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (TextPart(content),)
    parts: list[Part] = []
    for j, p in enumerate(content):
        at = f"{where}.content[{j}]"
        match p:
            case w.InputTextIn() | w.OutputTextIn():
                parts.append(TextPart(p.text))
            case w.RefusalIn():
                parts.append(TextPart(p.refusal))
            case w.InputImageIn() if images:
                parts.append(_image(p, at))
            case w.InputImageIn():
                raise _unsupported(at, "images in this role")
            case w.InputFileIn():
                raise _unsupported(at, "input_file parts")
            case _:
                raise _unsupported(at, f"'{p.type}' parts")
    return tuple(parts)


def _tool_output(item: w.FunctionCallOutputIn, where: str) -> tuple[TextPart | ImagePart, ...]:
    if isinstance(item.output, str):
        return (TextPart(item.output),)
    out: list[TextPart | ImagePart] = []
    for j, p in enumerate(item.output):
        at = f"{where}.output[{j}]"
        match p:
            case w.InputTextIn():
                out.append(TextPart(p.text))
            case w.InputImageIn():
                out.append(_image(p, at))
            case _:
                raise _unsupported(at, "input_file parts")
    return tuple(out)


class _Turns:
    """Builds canonical messages from items in order (see the module docstring)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.assistant: list[Part] | None = None
        self.reasoning: list[str] = []
        self.unanswered: dict[str, str] = {}  # call_id -> where the call was made
        self.calls: set[str] = set()

    def flush(self) -> None:
        if self.assistant:
            self.messages.append(Message("assistant", tuple(self.assistant)))
        self.assistant = None

    def open(self) -> list[Part]:
        if self.assistant is None:
            self.assistant = [ReasoningPart("\n\n".join(self.reasoning))] if self.reasoning else []
            self.reasoning = []
        return self.assistant

    def require_answers(self, where: str) -> None:
        if self.unanswered:
            call_id = next(iter(self.unanswered))
            raise InvalidRequest(
                f"No tool output found for function call {call_id}: each function_call needs a "
                f"function_call_output before the next user message.",
                param=where,
            )

    def add(self, item: w.Item, where: str) -> None:
        match item:
            case w.MessageIn(role="assistant"):
                self.flush()  # one message item is one assistant turn; calls may follow it
                parts = _content_parts(item.content, where, images=False)
                texts = [p for p in parts if isinstance(p, TextPart) and p.text]
                if texts:
                    self.open().extend(texts)
            case w.MessageIn():
                self.flush()
                if item.role == "user":
                    self.require_answers(where)
                    self.messages.append(Message("user", _content_parts(item.content, where, images=True)))
                else:
                    text = "".join(
                        p.text for p in _content_parts(item.content, where, images=False) if isinstance(p, TextPart)
                    )
                    self.messages.append(Message("system", (TextPart(text),)))
            case w.FunctionCallIn():
                self.open().append(ToolCallPart(item.call_id, item.name, item.arguments))
                self.unanswered[item.call_id] = where
                self.calls.add(item.call_id)
            case w.FunctionCallOutputIn():
                if item.call_id not in self.calls:
                    raise InvalidRequest(
                        f"No tool call found for function call output with call_id {item.call_id}.",
                        param=f"{where}.call_id",
                    )
                self.unanswered.pop(item.call_id, None)
                self.flush()
                result = ToolResultPart(item.call_id, _tool_output(item, where))
                self.messages.append(Message("tool", (result,)))
            case w.ReasoningIn():
                self.flush()  # reasoning starts the next assistant turn
                text = reasoning_text(item)
                if text:
                    self.reasoning.append(text)
            case w.ItemReferenceIn():
                raise InvalidRequest(f"Item with id '{item.id}' not found.", param=where)
            case w.HostedItemIn():
                pass


def to_messages(items: Iterable[tuple[str, w.Item]]) -> list[Message]:
    """Canonical messages for ``(where, item)`` pairs, in order. Raises InvalidRequest."""
    turns = _Turns()
    last = "input"
    for where, item in items:
        turns.add(item, where)
        last = where
    turns.flush()
    turns.require_answers(last)
    return turns.messages


def referenced_ids(items: Sequence[w.Item]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.id for i in items if isinstance(i, w.ItemReferenceIn)))
