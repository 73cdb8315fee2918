"""OpenAI Responses API: wire <-> canonical.

A call is parsed in two steps because its conversation may live in storage:

1. :func:`parse_request` validates the body into a :class:`ResponsesCall` (errors are
   400s with ``param``) without touching storage;
2. :func:`build_request` turns it, plus the stored items of ``previous_response_id``'s chain
   and the items that ``item_reference``\\ s name, into a :class:`CanonicalRequest` and the
   input items to store.

:func:`render_response` renders an aggregated result; :func:`encode_stream` turns events
into typed server-sent events (``openai_responses_stream``). Function tools reach the
engine; hosted and other non-function tools are dropped and not echoed, so the response
never claims a tool the model could not call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from mesh.canonical import (
    CanonicalRequest,
    Message,
    ReasoningConfig,
    ResponseFormat,
    Sampling,
    TextPart,
    Tool,
    ToolChoice,
    Usage,
)
from mesh.errors import InvalidRequest
from mesh.protocols import openai_responses_wire as w
from mesh.protocols.extensions import keep_known
from mesh.protocols.openai_errors import render_error
from mesh.protocols.openai_responses_items import (
    parse_item,
    parse_items,
    parse_tools,
    referenced_ids,
    stored_item,
    to_messages,
)
from mesh.protocols.openai_responses_output import ResponseMeta, render_response
from mesh.protocols.openai_responses_stream import encode_stream
from mesh.protocols.validation import loads_object, validate

__all__ = [
    "ResponseMeta",
    "ResponsesCall",
    "build_request",
    "encode_stream",
    "parse_request",
    "render_error",
    "render_response",
    "response_meta",
]

log = logging.getLogger("mesh.protocols.openai_responses")

INCLUDE_ENCRYPTED_REASONING = "reasoning.encrypted_content"
INCLUDE_LOGPROBS = "message.output_text.logprobs"


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    """A validated ``POST /v1/responses`` body.

    ``items`` are the input items in order (``item_reference``\\ s unresolved); ``tools`` the
    function tools the engine may call (already narrowed by ``allowed_tools``).
    """

    body: w.ResponsesRequestIn
    items: tuple[w.Item, ...]
    tools: tuple[Tool, ...]
    declared_tools: tuple[w.FunctionToolIn, ...]
    tool_choice: ToolChoice | None
    top_k: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)

    @property
    def store(self) -> bool:
        """Whether the client wants the response stored (the default)."""
        return self.body.store is not False

    @property
    def previous_response_id(self) -> str | None:
        return self.body.previous_response_id

    @property
    def references(self) -> tuple[str, ...]:
        """Ids named by ``item_reference`` items, to look up before :func:`build_request`."""
        return referenced_ids(self.items)


def _unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def parse_request(body: bytes) -> ResponsesCall:
    """Validate a Responses body. Raises :class:`InvalidRequest` with ``param`` set."""
    raw = loads_object(body)
    req = validate(w.ResponsesRequestIn, raw)
    if req.background:
        raise _unsupported("background", "Background responses are not supported; send 'background': false.")
    if req.conversation is not None:
        raise _unsupported("conversation", "Conversations are not supported; use 'previous_response_id'.")
    if req.prompt is not None:
        raise _unsupported("prompt", "Prompt templates are not supported; send 'instructions' and 'input'.")
    items = parse_items(req.input)
    declared = parse_tools(req.tools)
    tools, choice = _tools_and_choice(req.tool_choice, declared)
    top_k = (req.model_extra or {}).get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise InvalidRequest("Invalid value for 'top_k': expected an integer.", param="top_k")
    kept, ignored = keep_known({k: v for k, v in (req.model_extra or {}).items() if k != "top_k"})
    if ignored:
        log.debug("ignoring unknown fields: %s", ignored)
    return ResponsesCall(req, items, tools, declared, choice, top_k, kept)


def _tools_and_choice(
    choice: Any, declared: tuple[w.FunctionToolIn, ...]
) -> tuple[tuple[Tool, ...], ToolChoice | None]:
    tools = tuple(Tool(t.name, t.description, t.parameters, t.strict) for t in declared)
    names = {t.name for t in tools}
    match choice:
        case None:
            return tools, (ToolChoice("auto") if tools else None)
        case "none" | "auto":
            return tools, (ToolChoice(choice) if tools else None)
        case "required":
            if not tools:
                raise InvalidRequest("tool_choice 'required' needs at least one function tool.", param="tool_choice")
            return tools, ToolChoice("required")
        case w.NamedFunctionChoiceIn(name=name):
            if name not in names:
                raise InvalidRequest(
                    f"tool_choice names function {name!r}, which is not in 'tools'.", param="tool_choice"
                )
            return tools, ToolChoice("function", name)
        case w.AllowedToolsChoiceIn(mode=mode, tools=allowed):
            wanted = {t.get("name") for t in allowed if t.get("type") == "function"}
            unknown = sorted(str(n) for n in wanted - names)
            if unknown:
                raise InvalidRequest(
                    f"tool_choice.tools names functions that are not in 'tools': {', '.join(unknown)}.",
                    param="tool_choice.tools",
                )
            narrowed = tuple(t for t in tools if t.name in wanted)
            if not narrowed:
                if mode == "required":
                    raise InvalidRequest(
                        "tool_choice 'allowed_tools' in mode 'required' needs at least one function tool.",
                        param="tool_choice.tools",
                    )
                return (), None
            return narrowed, ToolChoice(mode)
    kind = getattr(choice, "type", "?")
    raise _unsupported(
        "tool_choice",
        f"tool_choice of type {kind!r} forces a hosted tool, which this server does not run; "
        "use 'auto', 'required' or a function.",
    )


def build_request(
    call: ResponsesCall,
    history: Sequence[Mapping[str, Any]] = (),
    referenced: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[CanonicalRequest, list[dict[str, Any]]]:
    """The canonical request and the input items to store (references replaced, ids set).

    ``history`` is the stored chain of ``previous_response_id`` (each response's input
    items then its output items, oldest first); ``referenced`` maps the ids in
    :attr:`ResponsesCall.references` that were found to their stored items. An unresolved
    reference, a tool output without its call, or a call left unanswered raises
    :class:`InvalidRequest`.
    """
    found = referenced or {}
    items: list[tuple[str, w.Item]] = [("previous_response_id", parse_item(h, "previous_response_id")) for h in history]
    own: list[w.Item] = []
    for i, item in enumerate(call.items):
        where = f"input[{i}]"
        if isinstance(item, w.ItemReferenceIn):
            target = found.get(item.id)
            if target is None:
                raise InvalidRequest(f"Item with id '{item.id}' not found.", param=where)
            item = parse_item(dict(target), where)
        own.append(item)
        items.append((where, item))
    req = call.body
    messages: list[Message] = [Message("system", (TextPart(req.instructions),))] if req.instructions else []
    messages += to_messages(items)
    if all(m.role == "system" for m in messages):
        raise InvalidRequest(
            "The request has no input: send 'input' (or continue a stored response with 'previous_response_id').",
            param="input",
        )
    include = set(req.include or ())
    logprobs = INCLUDE_LOGPROBS in include or bool(req.top_logprobs)
    effort = req.reasoning.effort if req.reasoning else None
    canonical = CanonicalRequest(
        model=req.model,
        messages=tuple(messages),
        stream=call.stream,
        max_tokens=req.max_output_tokens,
        sampling=Sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=call.top_k,
            logprobs=logprobs,
            top_logprobs=req.top_logprobs if logprobs else None,
        ),
        tools=call.tools,
        tool_choice=call.tool_choice,
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req.text),
        reasoning=ReasoningConfig(enabled=effort != "none", effort=effort) if effort else None,
        # a blank safety_identifier is not one: it would hide the user from a key's user_budget
        user=req.safety_identifier if req.safety_identifier and req.safety_identifier.strip() else req.user,
        metadata=req.metadata,
        cache_key=req.prompt_cache_key,
        extra=call.extra,
    )
    return canonical, [stored_item(i) for i in own]


def _response_format(text: w.TextConfigIn | None) -> ResponseFormat | None:
    match text.format if text else None:
        case w.JSONObjectFormatIn():
            return ResponseFormat("json_object")
        case w.JSONSchemaFormatIn() as f:
            return ResponseFormat("json_schema", f.name, f.schema_, f.description, f.strict)
    return None


def _echo(call: ResponsesCall, store: bool) -> dict[str, Any]:
    req = call.body
    choice = req.tool_choice
    text: dict[str, Any] = {"format": {"type": "text"}}
    if req.text is not None:
        if req.text.format is not None:
            text["format"] = req.text.format.model_dump(by_alias=True, exclude_none=True)
        if req.text.verbosity is not None:
            text["verbosity"] = req.text.verbosity
    return {
        "instructions": req.instructions,
        "metadata": dict(req.metadata or {}),
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_logprobs": req.top_logprobs,
        "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else (choice or "auto"),
        "tools": [
            {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
             "strict": t.strict}
            for t in call.declared_tools
        ],
        "max_output_tokens": req.max_output_tokens,
        "previous_response_id": req.previous_response_id,
        "store": store,
        "truncation": req.truncation or "disabled",
        "text": text,
        "reasoning": {
            "effort": req.reasoning.effort if req.reasoning else None,
            "summary": (req.reasoning.summary or req.reasoning.generate_summary) if req.reasoning else None,
        },
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
        "service_tier": "default",
        "background": False,
    }


def response_meta(
    call: ResponsesCall,
    *,
    id: str,
    created_at: int,
    model: str,
    store: bool,
    usage_extras: Callable[[Usage], dict[str, Any]] | None = None,
) -> ResponseMeta:
    """The shared part of every response object for ``call``. ``store`` is whether it will
    really be stored (false when the operator turned storage off)."""
    return ResponseMeta(
        id=id,
        created_at=created_at,
        model=model,
        echo=_echo(call, store),
        encrypted_reasoning=INCLUDE_ENCRYPTED_REASONING in (call.body.include or ()),
        usage_extras=usage_extras,
    )
