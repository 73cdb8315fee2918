"""Pydantic models of the Chat Completions request, as openai-python's types define it.

Unknown top-level fields are kept (``extra="allow"``); the protocol keeps only the known
engine extensions among them (``protocols/extensions.py``), which the pipeline checks
against the model's allow-list. Unknown fields inside messages and parts are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mesh.protocols.validation import check_metadata

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_.:-]{1,128}$"


class _In(BaseModel):
    # strict: a JSON string is not a boolean or a number (OpenAI rejects "stream": "yes").
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class TextPartIn(_In):
    type: Literal["text"]
    text: str


class ImageURLIn(_In):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "data:")):
            raise ValueError("image_url.url must be an http(s) URL or a data: URL")
        return v


class ImagePartIn(_In):
    type: Literal["image_url"]
    image_url: ImageURLIn


class AudioPartIn(_In):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePartIn(_In):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPartIn(_In):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[TextPartIn | ImagePartIn | AudioPartIn | FilePartIn, Field(discriminator="type")]
AssistantPart = Annotated[TextPartIn | RefusalPartIn, Field(discriminator="type")]


class SystemMessageIn(_In):
    role: Literal["system", "developer"]
    content: str | list[TextPartIn]
    name: str | None = None


class UserMessageIn(_In):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class FunctionCallIn(_In):
    name: str = Field(min_length=1)
    arguments: str = ""


class ToolCallIn(_In):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class AssistantMessageIn(_In):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    refusal: str | None = None
    name: str | None = None
    # De-facto reasoning fields (DeepSeek/SGLang and vLLM names); either is accepted.
    reasoning_content: str | None = None
    reasoning: str | None = None


class ToolMessageIn(_In):
    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1)
    content: str | list[TextPartIn]


MessageIn = Annotated[
    SystemMessageIn | UserMessageIn | AssistantMessageIn | ToolMessageIn,
    Field(discriminator="role"),
]


class FunctionDefIn(_In):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_In):
    type: Literal["function"]
    function: FunctionDefIn


class NamedFunctionIn(_In):
    name: str


class NamedToolChoiceIn(_In):
    type: Literal["function"]
    function: NamedFunctionIn


class AllowedToolsIn(_In):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoiceIn(_In):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedToolsIn


ToolChoiceIn = (
    Literal["none", "auto", "required"]
    | Annotated[NamedToolChoiceIn | AllowedToolsChoiceIn, Field(discriminator="type")]
)


class JSONSchemaIn(_In):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormatIn(_In):
    type: Literal["text"]


class JSONObjectFormatIn(_In):
    type: Literal["json_object"]


class JSONSchemaFormatIn(_In):
    type: Literal["json_schema"]
    json_schema: JSONSchemaIn


ResponseFormatIn = Annotated[
    TextFormatIn | JSONObjectFormatIn | JSONSchemaFormatIn, Field(discriminator="type")
]


class StreamOptionsIn(_In):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatRequestIn(BaseModel):
    """``POST /v1/chat/completions`` body."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    model: str = Field(min_length=1)
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptionsIn | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stop: str | list[str] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatIn | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    verbosity: str | None = None
    # Legacy function calling is refused with a clear 400 (see openai_chat.parse_request).
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(not s for s in v):
                raise ValueError("stop sequences cannot be empty")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)

    @model_validator(mode="after")
    def _cross_field(self) -> ChatRequestIn:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self
