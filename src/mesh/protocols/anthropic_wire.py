"""Pydantic models of the Anthropic Messages request, as anthropic-sdk-python's types define it.

Content blocks, image and document sources, tools, ``tool_choice`` and ``thinking`` are
unions tagged by ``type``; they are validated one at a time with :func:`validate_tagged`
so that an error names the exact place (``messages[2].content[0].source.media_type``)
rather than pydantic's union bookkeeping. Anthropic errors carry no ``param`` field, so
the place leads the message, as the real API does. Unknown fields are ignored everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mesh.errors import InvalidRequest
from mesh.protocols.validation import param_path

# Anthropic allows 64 characters; Mesh accepts the longer names other protocols allow.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,128}$"

M = TypeVar("M", bound=BaseModel)


class _In(BaseModel):
    # defer_build: the validators are built at the first Messages request, not at every
    # start (~12 ms of this module's import; `mesh serve` answers chat without them).
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, defer_build=True)


# ---- content blocks ------------------------------------------------------------------------


class TextBlockIn(_In):
    type: Literal["text"]
    text: str


class Base64ImageSourceIn(_In):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class URLSourceIn(_In):
    type: Literal["url"]
    url: str

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return v


class ImageBlockIn(_In):
    type: Literal["image"]
    source: Any


class PlainTextSourceIn(_In):
    type: Literal["text"]
    data: str
    media_type: Literal["text/plain"] = "text/plain"


class ContentSourceIn(_In):
    type: Literal["content"]
    content: str | list[Any]


class DocumentBlockIn(_In):
    type: Literal["document"]
    source: Any
    title: str | None = None
    context: str | None = None


class SearchResultBlockIn(_In):
    type: Literal["search_result"]
    source: str
    title: str
    content: list[TextBlockIn]


class ToolResultBlockIn(_In):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[Any] | None = None
    is_error: bool | None = None


class ThinkingBlockIn(_In):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockIn(_In):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlockIn(_In):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


Block = (
    TextBlockIn
    | ImageBlockIn
    | DocumentBlockIn
    | SearchResultBlockIn
    | ToolResultBlockIn
    | ThinkingBlockIn
    | RedactedThinkingBlockIn
    | ToolUseBlockIn
)

_TEXT: dict[str, type[BaseModel]] = {"text": TextBlockIn}
_MEDIA: dict[str, type[BaseModel]] = {
    "image": ImageBlockIn,
    "document": DocumentBlockIn,
    "search_result": SearchResultBlockIn,
}
USER_BLOCKS: dict[str, type[BaseModel]] = {**_TEXT, **_MEDIA, "tool_result": ToolResultBlockIn}
ASSISTANT_BLOCKS: dict[str, type[BaseModel]] = {
    **_TEXT,
    "thinking": ThinkingBlockIn,
    "redacted_thinking": RedactedThinkingBlockIn,
    "tool_use": ToolUseBlockIn,
}
SYSTEM_BLOCKS = _TEXT
TOOL_RESULT_BLOCKS: dict[str, type[BaseModel]] = {**_TEXT, **_MEDIA}
DOCUMENT_BLOCKS: dict[str, type[BaseModel]] = {**_TEXT, "image": ImageBlockIn}
ALL_BLOCKS = {**USER_BLOCKS, **ASSISTANT_BLOCKS}
IMAGE_SOURCES: dict[str, type[BaseModel]] = {"base64": Base64ImageSourceIn, "url": URLSourceIn}
DOCUMENT_SOURCES: dict[str, type[BaseModel]] = {"text": PlainTextSourceIn, "content": ContentSourceIn}

# Blocks that belong to Anthropic's server tools (which Mesh drops from the request), echoed
# back in history by clients: they mean nothing to an engine and are dropped too.
SERVER_TOOL_BLOCKS = frozenset(
    {
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "container_upload",
        "mcp_tool_use",
        "mcp_tool_result",
        "tool_reference",
    }
)


# ---- tools, tool choice, thinking, output ---------------------------------------------------


class ToolIn(_In):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None

    @field_validator("input_schema")
    @classmethod
    def _object(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type", "object") != "object":
            raise ValueError("the input schema must describe an object (type 'object')")
        return v


class ToolChoiceAutoIn(_In):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAnyIn(_In):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceToolIn(_In):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNoneIn(_In):
    type: Literal["none"]


TOOL_CHOICES: dict[str, type[BaseModel]] = {
    "auto": ToolChoiceAutoIn,
    "any": ToolChoiceAnyIn,
    "tool": ToolChoiceToolIn,
    "none": ToolChoiceNoneIn,
}

Display = Literal["summarized", "omitted"]


class ThinkingEnabledIn(_In):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)
    display: Display | None = None


class ThinkingDisabledIn(_In):
    type: Literal["disabled"]


class ThinkingAdaptiveIn(_In):
    """``adaptive`` (the model decides) and ``between_tools``: both mean the model's default."""

    type: Literal["adaptive", "between_tools"]
    display: Display | None = None


THINKING: dict[str, type[BaseModel]] = {
    "enabled": ThinkingEnabledIn,
    "disabled": ThinkingDisabledIn,
    "adaptive": ThinkingAdaptiveIn,
    "between_tools": ThinkingAdaptiveIn,
}


class JSONOutputFormatIn(_In):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


OUTPUT_FORMATS: dict[str, type[BaseModel]] = {"json_schema": JSONOutputFormatIn}


class OutputConfigIn(_In):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: Any = None


class MetadataIn(_In):
    user_id: str | None = None


# ---- the request ----------------------------------------------------------------------------


class MessageIn(_In):
    role: Literal["user", "assistant", "system"]
    content: str | list[Any]


class MessagesRequestIn(BaseModel):
    """``POST /v1/messages`` body. Unknown top-level fields are collected, logged and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, defer_build=True)

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[Any] | None = None
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: OutputConfigIn | None = None
    metadata: MetadataIn | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not s for s in v):
            raise ValueError("stop sequences cannot be empty")
        return v


class CountTokensRequestIn(MessagesRequestIn):
    """``POST /v1/messages/count_tokens`` body: the same, without ``max_tokens``."""

    max_tokens: int | None = Field(default=None, ge=1)  # type: ignore[assignment]  # optional here


# ---- validation helpers ---------------------------------------------------------------------


def _join(prefix: str, sub: str) -> str:
    if not prefix:
        return sub
    if not sub:
        return prefix
    return prefix + sub if sub.startswith("[") else f"{prefix}.{sub}"


def invalid(param: str, message: str) -> InvalidRequest:
    """An :class:`InvalidRequest` whose message starts with the place it is about."""
    return InvalidRequest(f"{param}: {message}" if param else message, param=param or None)


def validate_at(model: type[M], data: Any, param: str = "") -> M:
    """Validate ``data`` (found at ``param``) into ``model``; the first error becomes a 400."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = max(errors, key=lambda e: len(e["loc"]))
        sub = param_path(tuple(err["loc"]))
        where = _join(param, sub)
        if err["type"] == "missing":
            raise invalid(where, "Field required.") from None
        # Union alternatives fail at the same place: say what each would have accepted.
        msgs: list[str] = []
        for e in errors:
            msg = str(e["msg"]).removeprefix("Value error, ")
            if param_path(tuple(e["loc"])) == sub and msg not in msgs:
                msgs.append(msg if not msgs else msg.removeprefix("Input should be "))
        raise invalid(where, " or ".join(msgs) + ".") from None


def validate_tagged(models: Mapping[str, type[BaseModel]], data: Any, param: str) -> BaseModel:
    """Validate an object whose ``type`` picks its model among ``models``."""
    if not isinstance(data, dict):
        raise invalid(param, "Input should be an object.")
    kind = data.get("type")
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        allowed = ", ".join(f"'{k}'" for k in models)
        got = f"'{kind}'" if isinstance(kind, str) else "missing"
        raise invalid(_join(param, "type"), f"Input should be one of {allowed} (got {got}).")
    return validate_at(model, data, param)
