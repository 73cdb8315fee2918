"""Pydantic models of the Responses API request, as openai-python's types define it.

The body is validated in two steps: :class:`ResponsesRequestIn` checks the top level and
keeps ``input`` and ``tools`` raw; each input item and each function tool is then validated
on its own (``openai_responses_items``), so that an error names its place (``input[3]``)
and item or tool types Mesh does not run can be recognised and dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from mesh.protocols.validation import check_metadata

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_.:-]{1,128}$"
EFFORTS = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class _In(BaseModel):
    # strict: a JSON string is not a boolean or a number; unknown fields inside items are ignored.
    # defer_build: the validators are built at the first Responses request, not at every
    # start (~15 ms of this module's import; `mesh serve` answers chat without them).
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, defer_build=True)


# ---- content parts ------------------------------------------------------------------------------


class InputTextIn(_In):
    type: Literal["input_text"]
    text: str


class InputImageIn(_In):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None

    @field_validator("image_url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://", "data:")):
            raise ValueError("image_url must be an http(s) URL or a data: URL")
        return v


class InputFileIn(_In):
    type: Literal["input_file"]
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None


class InputAudioIn(_In):
    type: Literal["input_audio"]


class OutputTextIn(_In):
    type: Literal["output_text"]
    text: str


class RefusalIn(_In):
    type: Literal["refusal"]
    refusal: str


ContentPartIn = Annotated[
    InputTextIn | InputImageIn | InputFileIn | InputAudioIn | OutputTextIn | RefusalIn,
    Field(discriminator="type"),
]
ToolOutputPartIn = Annotated[InputTextIn | InputImageIn | InputFileIn, Field(discriminator="type")]


# ---- input items --------------------------------------------------------------------------------


class MessageIn(_In):
    """Both the easy form ``{role, content}`` and ``{"type": "message", …}``."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPartIn]
    id: str | None = None
    status: str | None = None


class FunctionCallIn(_In):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputIn(_In):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ToolOutputPartIn]
    id: str | None = None
    status: str | None = None


class SummaryTextIn(_In):
    type: Literal["summary_text"]
    text: str


class ReasoningTextIn(_In):
    type: Literal["reasoning_text", "text"]
    text: str


class ReasoningIn(_In):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryTextIn] = Field(default_factory=list)
    content: list[ReasoningTextIn] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class ItemReferenceIn(_In):
    type: Literal["item_reference"]
    id: str = Field(min_length=1)


class HostedItemIn(BaseModel):
    """An item of a tool Mesh does not run (web search, shell, MCP, …): kept, never sent on."""

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    type: str
    id: str | None = None


Item = MessageIn | FunctionCallIn | FunctionCallOutputIn | ReasoningIn | ItemReferenceIn | HostedItemIn

ITEM_MODELS: dict[str, type[MessageIn | FunctionCallIn | FunctionCallOutputIn | ReasoningIn | ItemReferenceIn]] = {
    "message": MessageIn,
    "function_call": FunctionCallIn,
    "function_call_output": FunctionCallOutputIn,
    "reasoning": ReasoningIn,
    "item_reference": ItemReferenceIn,
}

# Items of hosted or non-function tools. They are accepted (a conversation started
# elsewhere may carry them) and stored, but no engine can replay them, so they are dropped
# from what the engine sees, calls and outputs alike.
HOSTED_ITEM_TYPES = frozenset(
    {
        "web_search_call", "file_search_call", "computer_call", "computer_call_output",
        "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
        "apply_patch_call", "apply_patch_call_output", "custom_tool_call", "custom_tool_call_output",
        "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "mcp_call",
        "image_generation_call", "code_interpreter_call", "tool_search_call", "tool_search_output",
        "compaction", "additional_tools", "program", "program_output",
    }
)


# ---- tools --------------------------------------------------------------------------------------


class FunctionToolIn(_In):
    """The flat Responses function tool."""

    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoiceIn(_In):
    type: Literal["function"]
    name: str = Field(min_length=1)


class AllowedToolsChoiceIn(_In):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class HostedToolChoiceIn(BaseModel):
    """Forcing a hosted tool (``{"type": "web_search_preview"}``, ``mcp``, ``custom``, …)."""

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    type: str


def _choice_tag(v: Any) -> str | None:
    if isinstance(v, BaseModel):
        v = v.model_dump()
    kind = v.get("type") if isinstance(v, dict) else None
    if not isinstance(kind, str):
        return None
    return kind if kind in ("function", "allowed_tools") else "hosted"


ToolChoiceObjectIn = Annotated[
    Annotated[NamedFunctionChoiceIn, Tag("function")]
    | Annotated[AllowedToolsChoiceIn, Tag("allowed_tools")]
    | Annotated[HostedToolChoiceIn, Tag("hosted")],
    Discriminator(_choice_tag),
]


# ---- output control -----------------------------------------------------------------------------


class TextFormatIn(_In):
    type: Literal["text"]


class JSONObjectFormatIn(_In):
    type: Literal["json_object"]


class JSONSchemaFormatIn(_In):
    """Flat, unlike Chat's ``json_schema`` wrapper."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, populate_by_name=True, defer_build=True)

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfigIn(_In):
    format: Annotated[TextFormatIn | JSONObjectFormatIn | JSONSchemaFormatIn, Field(discriminator="type")] | None = (
        None
    )
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfigIn(_In):
    effort: EFFORTS | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


# ---- the request --------------------------------------------------------------------------------


class ResponsesRequestIn(BaseModel):
    """``POST /v1/responses`` body. Unknown top-level fields are kept in ``model_extra``."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, defer_build=True)

    model: str = Field(min_length=1)
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObjectIn | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    text: TextConfigIn | None = None
    reasoning: ReasoningConfigIn | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)
