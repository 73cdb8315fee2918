"""Anthropic Messages: wire <-> canonical.

``parse_request`` validates a ``POST /v1/messages`` body into a :class:`CanonicalRequest`
(``parse_count_request`` does the same for ``count_tokens``). The other half lives beside
it and is re-exported here: ``render_response`` (``anthropic_render``) turns an
aggregated result into a ``message``; ``encode_stream`` and ``PING``
(``anthropic_stream``) write Anthropic's named SSE events; ``render_error``
(``anthropic_errors``) shapes errors.

Mapping choices (see docs/architecture.md and PROTOCOLS.md §4):

* Consecutive same-role turns merge into one; where two merged turns meet text to text,
  ``"\\n\\n"`` separates them. Top-level ``system`` blocks join with ``"\\n\\n"``. A
  ``system``-role message inside ``messages`` stays a system message at its position.
* A final assistant turn with text is a prefill: ``continue_final``; one without text is
  dropped. Empty text blocks are dropped; ``redacted_thinking`` and server-tool blocks too.
* ``thinking`` blocks become :class:`ReasoningPart`\\ s (their signature is kept, never
  checked); replies carry thinking with an invented signature (``StreamMeta.signature``).
* Server tools (a ``type`` other than ``custom``) are dropped; so are unknown top-level
  fields (``context_management``, ``container``, ``mcp_servers``, …) except the engine
  extensions of ``protocols/extensions.py``, which the pipeline checks per model.
  ``thinking.type`` enabled/disabled sets ``ReasoningConfig.enabled``; adaptive leaves the
  model's default; ``output_config.effort`` is the effort.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from mesh.canonical import (
    CanonicalRequest,
    ImagePart,
    Message,
    Part,
    ReasoningConfig,
    ReasoningPart,
    ResponseFormat,
    Role,
    Sampling,
    TextPart,
    Tool,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)
from mesh.protocols import anthropic_wire as w
from mesh.protocols.anthropic_errors import render_error
from mesh.protocols.anthropic_render import StreamMeta, new_signature, render_response
from mesh.protocols.anthropic_stream import PING, encode_stream
from mesh.protocols.anthropic_wire import invalid
from mesh.protocols.extensions import keep_known
from mesh.protocols.validation import loads_object

__all__ = [
    "PING",
    "MessagesOptions",
    "StreamMeta",
    "encode_stream",
    "new_signature",
    "parse_count_request",
    "parse_request",
    "render_error",
    "render_response",
]

log = logging.getLogger("mesh.protocols.anthropic_messages")

TURN_SEPARATOR = "\n\n"
JSON_OUTPUT_NAME = "output"


# ---- request ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessagesOptions:
    """Rendering options from the request that the canonical model does not carry."""

    omit_thinking: bool = False  # thinking.display == "omitted": signature only


def parse_request(body: bytes) -> tuple[CanonicalRequest, MessagesOptions]:
    """Validate a Messages body. Raises :class:`InvalidRequest` naming the offending place."""
    req = w.validate_at(w.MessagesRequestIn, loads_object(body))
    return _canonical(req)


def parse_count_request(body: bytes) -> CanonicalRequest:
    """Validate a ``count_tokens`` body (no ``max_tokens``) into a canonical request."""
    req = w.validate_at(w.CountTokensRequestIn, loads_object(body))
    return _canonical(req)[0]


def _canonical(req: w.MessagesRequestIn) -> tuple[CanonicalRequest, MessagesOptions]:
    extra, dropped = keep_known(req.model_extra or {})
    if dropped:
        log.debug("ignoring unknown fields: %s", dropped)
    tools = _tools(req.tools)
    tool_choice, parallel = _tool_choice(req.tool_choice, tools)
    reasoning, omit = _reasoning(req)
    messages, continue_final = _messages(req.system, req.messages)
    fmt = req.output_config.format if req.output_config else None
    response_format = None
    if fmt is not None:
        parsed = w.validate_tagged(w.OUTPUT_FORMATS, fmt, "output_config.format")
        assert isinstance(parsed, w.JSONOutputFormatIn)
        response_format = ResponseFormat("json_schema", JSON_OUTPUT_NAME, parsed.schema_)
    canonical = CanonicalRequest(
        model=req.model,
        messages=messages,
        stream=bool(req.stream),
        max_tokens=req.max_tokens,
        stop=tuple(req.stop_sequences or ()),
        sampling=Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or None),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=response_format,
        reasoning=reasoning,
        user=req.metadata.user_id if req.metadata else None,
        continue_final=continue_final,
        extra=extra,
    )
    return canonical, MessagesOptions(omit_thinking=omit)


def _tools(raw: list[Any] | None) -> tuple[Tool, ...]:
    out: list[Tool] = []
    for k, item in enumerate(raw or ()):
        param = f"tools[{k}]"
        if not isinstance(item, dict):
            raise invalid(param, "Input should be an object.")
        kind = item.get("type")
        if kind is not None and not isinstance(kind, str):
            raise invalid(f"{param}.type", "Input should be a string.")
        if kind not in (None, "custom"):
            log.debug("dropping server tool %r of type %s", item.get("name"), kind)
            continue
        tool = w.validate_at(w.ToolIn, item, param)
        if any(t.name == tool.name for t in out):
            raise invalid(f"{param}.name", f"Tool names must be unique; {tool.name!r} appears more than once.")
        out.append(Tool(tool.name, tool.description, tool.input_schema, tool.strict))
    return tuple(out)


def _tool_choice(raw: Any, tools: tuple[Tool, ...]) -> tuple[ToolChoice | None, bool | None]:
    """The canonical choice and ``parallel_tool_calls`` (False when parallel use is disabled)."""
    if raw is None:
        return None, None
    choice = w.validate_tagged(w.TOOL_CHOICES, raw, "tool_choice")
    parallel = False if getattr(choice, "disable_parallel_tool_use", None) else None
    match choice:
        case w.ToolChoiceNoneIn():
            return (ToolChoice("none") if tools else None), None
        case w.ToolChoiceAnyIn():
            if not tools:
                raise invalid("tool_choice", "tool_choice 'any' needs at least one tool in 'tools'.")
            return ToolChoice("required"), parallel
        case w.ToolChoiceToolIn(name=name):
            if all(t.name != name for t in tools):
                raise invalid("tool_choice.name", f"Tool {name!r} is not in 'tools'.")
            return ToolChoice("function", name), parallel
    return (ToolChoice("auto") if tools else None), parallel


def _reasoning(req: w.MessagesRequestIn) -> tuple[ReasoningConfig | None, bool]:
    effort = req.output_config.effort if req.output_config else None
    if req.thinking is None:
        return (ReasoningConfig(effort=effort) if effort else None), False
    thinking = w.validate_tagged(w.THINKING, req.thinking, "thinking")
    match thinking:
        case w.ThinkingEnabledIn(budget_tokens=budget, display=display):
            if req.max_tokens is not None and budget >= req.max_tokens:
                raise invalid(
                    "thinking.budget_tokens",
                    f"max_tokens ({req.max_tokens}) must be greater than thinking.budget_tokens ({budget}).",
                )
            return ReasoningConfig(True, effort, budget), display == "omitted"
        case w.ThinkingDisabledIn():
            return ReasoningConfig(False, effort), False
        case w.ThinkingAdaptiveIn(display=display):
            return (ReasoningConfig(effort=effort) if effort else None), display == "omitted"
    return None, False


# ---- messages -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Turn:
    """A merged turn; ``locs[k]`` names where ``parts[k]`` came from (for error messages)."""

    role: Role
    index: int
    parts: list[Part] = field(default_factory=list)
    locs: list[str] = field(default_factory=list)


_ROLE_BLOCKS = {"user": w.USER_BLOCKS, "assistant": w.ASSISTANT_BLOCKS}


def _messages(system: str | list[Any] | None, items: Sequence[w.MessageIn]) -> tuple[tuple[Message, ...], bool]:
    turns: list[_Turn] = []
    if system is not None:
        _append(turns, "system", -1, _system_parts(system))
    last = len(items) - 1
    for i, m in enumerate(items):
        if not m.content and not (i == last and m.role == "assistant"):
            raise invalid(
                f"messages[{i}]",
                "all messages must have non-empty content except for the optional final assistant message.",
            )
        parts: list[tuple[Part, str]]
        if m.role == "system":
            text = _system_text(m.content, f"messages[{i}].content")
            parts = [(TextPart(text), f"messages[{i}]")] if text else []
        else:
            parts = _blocks(m.content, m.role, f"messages[{i}].content")
        _append(turns, m.role, i, parts)
    continue_final = False
    if turns and turns[-1].role == "assistant":
        if any(isinstance(p, TextPart) for p in turns[-1].parts):
            continue_final = True
        elif not any(isinstance(p, ToolCallPart) for p in turns[-1].parts):
            turns.pop()  # nothing to continue: only (dropped) thinking
    if not any(t.role != "system" for t in turns):
        raise invalid("messages", "at least one user or assistant message with content is required.")
    _check_tool_pairing(turns)
    return tuple(Message(t.role, tuple(t.parts)) for t in turns), continue_final


def _append(turns: list[_Turn], role: Role, index: int, parts: list[tuple[Part, str]]) -> None:
    if not parts:
        return
    if not turns or turns[-1].role != role:
        turns.append(_Turn(role, index))
    turn = turns[-1]
    if turn.parts and isinstance(turn.parts[-1], TextPart) and isinstance(parts[0][0], TextPart):
        turn.parts[-1] = TextPart(turn.parts[-1].text + TURN_SEPARATOR)
    for part, loc in parts:
        turn.parts.append(part)
        turn.locs.append(loc)


def _system_text(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, raw in enumerate(content):
        block = w.validate_tagged(w.SYSTEM_BLOCKS, raw, f"{param}[{j}]")
        assert isinstance(block, w.TextBlockIn)
        if block.text:
            texts.append(block.text)
    return TURN_SEPARATOR.join(texts)


def _system_parts(system: str | list[Any]) -> list[tuple[Part, str]]:
    text = _system_text(system, "system")
    return [(TextPart(text), "system")] if text else []


def _block(raw: Any, allowed: dict[str, type[BaseModel]], where: str, param: str) -> BaseModel | None:
    """One validated block, or None for a block that is dropped (server-tool history)."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in w.SERVER_TOOL_BLOCKS:
        log.debug("dropping %s block at %s", kind, param)
        return None
    if isinstance(kind, str) and kind in w.ALL_BLOCKS and kind not in allowed:
        raise invalid(f"{param}.type", f"'{kind}' blocks are not allowed in {where}.")
    return w.validate_tagged(allowed, raw, param)


def _blocks(content: str | list[Any], role: str, param: str) -> list[tuple[Part, str]]:
    if isinstance(content, str):
        return [(TextPart(content), param)] if content else []
    allowed = _ROLE_BLOCKS[role]
    out: list[tuple[Part, str]] = []
    for j, raw in enumerate(content):
        loc = f"{param}[{j}]"
        block = _block(raw, allowed, f"{role} messages", loc)
        match block:
            case None | w.RedactedThinkingBlockIn():
                continue
            case w.ToolUseBlockIn(id=call_id, name=name, input=args):
                out.append((ToolCallPart(call_id, name, orjson.dumps(args).decode()), loc))
            case w.ThinkingBlockIn(thinking=text, signature=signature):
                if text:
                    out.append((ReasoningPart(text, signature or None), loc))
            case w.ToolResultBlockIn(tool_use_id=call_id, content=result, is_error=is_error):
                parts = _media(result or "", f"{loc}.content", w.TOOL_RESULT_BLOCKS, "tool_result content")
                content_parts = tuple(p for p in parts if isinstance(p, TextPart | ImagePart))
                out.append((ToolResultPart(call_id, content_parts, bool(is_error)), loc))
            case _:
                out.extend((p, loc) for p in _media_block(block, loc))
    return out


def _media(content: str | list[Any], param: str, allowed: dict[str, type[BaseModel]], where: str) -> list[Part]:
    if isinstance(content, str):
        return [TextPart(content)] if content else []
    parts: list[Part] = []
    for j, raw in enumerate(content):
        block = _block(raw, allowed, where, f"{param}[{j}]")
        if block is not None:
            parts.extend(_media_block(block, f"{param}[{j}]"))
    return parts


def _media_block(block: BaseModel, param: str) -> list[Part]:
    """Text, image, document and search-result blocks as text and image parts."""
    match block:
        case w.TextBlockIn(text=text):
            return [TextPart(text)] if text else []
        case w.ImageBlockIn(source=source):
            _unsupported_source(
                source, f"{param}.source", "file", message="File images are not supported; send base64 or url images."
            )
            src = w.validate_tagged(w.IMAGE_SOURCES, source, f"{param}.source")
            if isinstance(src, w.Base64ImageSourceIn):
                return [ImagePart(f"data:{src.media_type};base64,{src.data}")]
            assert isinstance(src, w.URLSourceIn)
            return [ImagePart(src.url)]
        case w.DocumentBlockIn(source=source, title=title, context=context):
            _unsupported_source(
                source, f"{param}.source", "base64", "url", "file",
                message="Only text documents ('text' or 'content' sources) are supported; PDFs and files are not.",
            )
            doc = w.validate_tagged(w.DOCUMENT_SOURCES, source, f"{param}.source")
            head = [t for t in (title, context) if t]
            if isinstance(doc, w.PlainTextSourceIn):
                return [TextPart(TURN_SEPARATOR.join([*head, doc.data]))]
            assert isinstance(doc, w.ContentSourceIn)
            inner = _media(doc.content, f"{param}.source.content", w.DOCUMENT_BLOCKS, "document content")
            return ([TextPart(TURN_SEPARATOR.join(head) + TURN_SEPARATOR)] if head else []) + inner
        case w.SearchResultBlockIn(title=title, source=source, content=content):
            body = "".join(b.text for b in content)
            return [TextPart(TURN_SEPARATOR.join(t for t in (title, source, body) if t))]
    raise invalid(param, f"Unsupported block {type(block).__name__}.")  # pragma: no cover - exhaustive


def _unsupported_source(source: Any, param: str, *kinds: str, message: str) -> None:
    if isinstance(source, dict) and source.get("type") in kinds:
        raise invalid(f"{param}.type", message)


def _check_tool_pairing(turns: list[_Turn]) -> None:
    """Each tool_use is answered by a tool_result in the next (non-system) turn, and only then."""
    open_calls: dict[str, str] = {}  # tool_use id -> where the call was made
    opened_at = ""
    for turn in turns:
        if turn.role == "system":
            continue
        calls = [(p, loc) for p, loc in zip(turn.parts, turn.locs, strict=True) if isinstance(p, ToolCallPart)]
        results = [(p, loc) for p, loc in zip(turn.parts, turn.locs, strict=True) if isinstance(p, ToolResultPart)]
        for result, loc in results:
            if result.call_id not in open_calls:
                raise invalid(
                    loc,
                    f"unexpected `tool_use_id` found in `tool_result` blocks: {result.call_id}. Each `tool_result` "
                    "block must have a corresponding `tool_use` block in the previous message.",
                )
            del open_calls[result.call_id]
        _unanswered(open_calls, opened_at)
        for call, loc in calls:
            if call.id in open_calls:
                raise invalid(loc, f"`tool_use` ids must be unique; {call.id!r} is used twice.")
            open_calls[call.id] = loc
        opened_at = f"messages[{turn.index}]"
    _unanswered(open_calls, opened_at)


def _unanswered(open_calls: dict[str, str], where: str) -> None:
    if open_calls:
        raise invalid(
            where,
            f"`tool_use` ids were found without `tool_result` blocks immediately after: {', '.join(open_calls)}. "
            "Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
        )
