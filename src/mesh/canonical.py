"""The canonical layer: one request model and one event stream for every protocol and engine.

Protocols (``mesh.protocols``) parse their wire format into a :class:`CanonicalRequest` and
render :data:`Event` streams (or an aggregated :class:`Result`) back out. Engines
(``mesh.engines``) consume a ``CanonicalRequest`` and produce ``Event``\\ s. Neither side
imports the other: this module is the only contract between them.

Everything here is a frozen dataclass; no raw wire dict crosses a layer except the
deliberately opaque ``extra`` pass-through fields, JSON schemas and the relay path's
:class:`Relayed` chunks (OpenAI Chat to an OpenAI-compatible engine, where decoding each
chunk into events only to encode the same JSON again would be wasted work).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]


# ---- message parts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image by URL: ``https://…`` or a ``data:<media>;base64,…`` URL."""

    url: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ReasoningPart:
    """The model's prior thinking, echoed back by a client on an assistant turn."""

    text: str
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """A call the assistant made. ``arguments`` is the JSON text, passed through verbatim."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResultPart:
    """The result of a tool call, sent by the client. Content is text and images."""

    call_id: str
    content: tuple[TextPart | ImagePart, ...]
    is_error: bool = False

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


Part = TextPart | ImagePart | ReasoningPart | ToolCallPart | ToolResultPart


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. ``tool`` messages carry only :class:`ToolResultPart`\\ s."""

    role: Role
    parts: tuple[Part, ...]
    name: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


# ---- tools and output control ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``auto`` / ``none`` / ``required`` (any tool) / ``function`` (the one named)."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: Mapping[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ReasoningConfig:
    """What the client asked of the model's thinking.

    ``enabled`` None means "the model's default". ``effort`` is one of
    none/minimal/low/medium/high/xhigh/max; ``budget_tokens`` is Anthropic's budget.
    """

    enabled: bool | None = None
    effort: str | None = None
    budget_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class CanonicalRequest:
    """A generation request, whatever protocol it came in by.

    ``model`` is the public name the client sent; engines map it to their own.
    ``max_tokens`` counts output tokens including reasoning. ``extra`` holds unknown
    request fields that engines which accept them receive unchanged (vLLM's ``top_k``,
    ``chat_template_kwargs``, …). ``continue_final`` asks the engine to continue the final
    assistant message (prefill) instead of starting a new turn. ``cache_key`` names the
    conversation for routing (its replica's prefix cache); engines never see it.
    """

    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning: ReasoningConfig | None = None
    user: str | None = None
    metadata: Mapping[str, str] | None = None
    cache_key: str | None = None  # prompt_cache_key or the x-session-id header
    continue_final: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_max_tokens(self, max_tokens: int | None) -> CanonicalRequest:
        return replace(self, max_tokens=max_tokens)


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A new tool call; ``index`` counts calls within the choice from 0."""

    index: int
    id: str
    name: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class ToolArgsDelta:
    index: int
    delta: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of one choice. ``stop_sequence`` is the matched stop string, when known."""

    reason: FinishReason
    choice: int = 0
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the engine reported them.

    ``input_tokens`` includes ``cached_tokens``; ``output_tokens`` includes
    ``reasoning_tokens`` (the OpenAI convention).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True, init=False)
class Relayed:
    """Engine chunks on the relay path (OpenAI Chat in, OpenAI-compatible engine out),
    parsed but not decoded: the protocol rewrites only what Mesh must change and sends them on.

    ``chunks`` are the engine's ``chat.completion.chunk`` objects that arrived in one read
    (written to the client in one piece), with tool calls already re-indexed and usage taken
    out (the engine yields usage as its own :class:`Usage` event). ``deltas`` counts the
    non-empty text, reasoning and tool-argument deltas they carry (each at least one token:
    the same count the canonical path makes); ``answers`` is whether they carry any output
    at all (a delta, a new tool call or a finish), for the first-token deadline; ``finish``
    is the first choice's finish reason once the engine sent it. Not
    frozen: the encoder rewrites ``chunks`` in place, once.

    The rest is what the relay decoder saw on its one walk over the chunks, so that nothing
    after it walks them again (the resume tracker, the encoder): the text and reasoning
    deltas in order, the choices the chunks carry (``indexes``) and those with output, a
    tool call or a finish (``active``), the tool calls they start, whether a finish came,
    whether reasoning sits under the engine's field names (which the encoder renames), and
    whether any tool-call delta or logprobs came (without them, and with one choice, the
    aggregator folds the noted text instead of the chunks).
    """

    chunks: list[dict[str, Any]]
    deltas: int = 0
    answers: bool = False
    finish: str | None = None  # the first choice's finish reason once it came (the usage record's)
    texts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    indexes: set[int] = field(default_factory=set)
    active: set[int] = field(default_factory=set)
    calls: int = 0
    finished: bool = False
    reasoning_fields: bool = False
    tools: bool = False
    logprobs: bool = False

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        # Written out rather than generated: one of these is made for every read of every
        # relayed answer, and the generated __init__ calls a factory for each list and set.
        self.chunks = chunks
        self.deltas = 0
        self.answers = False
        self.finish = None
        self.texts = []
        self.reasoning = []
        self.indexes = set()
        self.active = set()
        self.calls = 0
        self.finished = self.reasoning_fields = self.tools = self.logprobs = False

    def extend(self, other: Relayed) -> None:
        """Append ``other``'s chunks and notes (a later part of the same read)."""
        self.chunks += other.chunks
        self.deltas += other.deltas
        self.answers = self.answers or other.answers
        self.finish = other.finish
        self.texts += other.texts
        self.reasoning += other.reasoning
        self.indexes |= other.indexes
        self.active |= other.active
        self.calls += other.calls
        self.finished = self.finished or other.finished
        self.reasoning_fields = self.reasoning_fields or other.reasoning_fields
        self.tools = self.tools or other.tools
        self.logprobs = self.logprobs or other.logprobs


Event = TextDelta | ReasoningDelta | ToolCallStart | ToolArgsDelta | Finish | Usage | Relayed


# ---- aggregated result ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason
    stop_sequence: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """A whole non-streamed answer: what :func:`aggregate` builds from events."""

    choices: tuple[Choice, ...]
    usage: Usage


def openai_logprobs(raw: Any) -> tuple[TokenLogprob, ...] | None:
    """A chunk choice's ``logprobs`` in OpenAI's shape (``{"content": [...]}``), or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return None
    out = []
    for item in raw["content"]:
        top = tuple(
            TopLogprob(t.get("token", ""), float(t.get("logprob", 0.0)), tuple(t["bytes"]) if t.get("bytes") else None)
            for t in item.get("top_logprobs") or ()
        )
        b = item.get("bytes")
        out.append(TokenLogprob(item.get("token", ""), float(item.get("logprob", 0.0)), tuple(b) if b else None, top))
    return tuple(out)


def openai_stop_sequence(choice: dict[str, Any]) -> str | None:
    """The stop string that ended a chunk choice: vLLM's ``stop_reason`` or SGLang's
    ``matched_stop`` (either may be a token id instead, which is not a string)."""
    stop = choice.get("stop_reason")
    if isinstance(stop, str):
        return stop
    matched = choice.get("matched_stop")
    return matched if isinstance(matched, str) else None


class _ChoiceBuilder:
    __slots__ = ("calls", "finish", "logprobs", "reasoning", "stop_sequence", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, list[str]] = {}
        self.logprobs: list[TokenLogprob] | None = None
        self.finish: FinishReason | None = None
        self.stop_sequence: str | None = None


_FIRST_CHOICE = frozenset((0,))


class Aggregator:
    """Folds an event stream into a :class:`Result`. Feed events with :meth:`add`."""

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceBuilder] = {}
        self._call_meta: dict[tuple[int, int], tuple[str, str]] = {}
        self.usage = Usage()

    def _choice(self, index: int) -> _ChoiceBuilder:
        builder = self._choices.get(index)
        if builder is None:
            builder = self._choices[index] = _ChoiceBuilder()
        return builder

    def add(self, event: Event) -> None:
        if isinstance(event, Relayed):  # the relay path's chunks: the common case first
            if not self._fold_noted(event):
                self._fold(event.chunks)
            return
        match event:
            case TextDelta(text=text, choice=c, logprobs=lps):
                b = self._choice(c)
                b.text.append(text)
                if lps is not None:
                    if b.logprobs is None:
                        b.logprobs = []
                    b.logprobs.extend(lps)
            case ReasoningDelta(text=text, choice=c):
                self._choice(c).reasoning.append(text)
            case ToolCallStart(index=i, id=call_id, name=name, choice=c):
                self._choice(c).calls.setdefault(i, [])
                self._call_meta[(c, i)] = (call_id, name)
            case ToolArgsDelta(index=i, delta=delta, choice=c):
                self._choice(c).calls.setdefault(i, []).append(delta)
            case Finish(reason=reason, choice=c, stop_sequence=seq):
                b = self._choice(c)
                b.finish = reason
                b.stop_sequence = seq
            case Usage():
                self.usage = event

    def _fold_noted(self, ev: Relayed) -> bool:
        """Relayed chunks of the first choice alone, with no tool call or logprobs: their
        text and reasoning as the relay decoder noted them, and their finish. False when the
        chunks need :meth:`_fold`."""
        if ev.tools or ev.logprobs or not ev.indexes <= _FIRST_CHOICE:
            return False
        b = self._choice(0)
        b.text += ev.texts
        b.reasoning += ev.reasoning
        if ev.finished:
            for chunk in reversed(ev.chunks):  # the last finish wins, as in _fold
                for choice in reversed(chunk["choices"]):
                    reason = choice.get("finish_reason")
                    if reason:
                        b.finish = reason
                        b.stop_sequence = openai_stop_sequence(choice)
                        return True
        return True

    def _fold(self, chunks: list[dict[str, Any]]) -> None:
        """Relayed chunks, folded as the canonical decoder's events would be (their tool calls
        are already numbered and named by the relay decoder, finish reasons already mapped)."""
        for chunk in chunks:
            for choice in chunk["choices"]:
                c = int(choice.get("index") or 0)
                b = self._choice(c)
                delta = choice.get("delta") or {}  # the relay decoder moved "message" content here
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    b.reasoning.append(reasoning)
                content = delta.get("content")
                if content:
                    b.text.append(content)
                    lps = openai_logprobs(choice.get("logprobs"))
                    if lps is not None:
                        if b.logprobs is None:
                            b.logprobs = []
                        b.logprobs.extend(lps)
                for call in delta.get("tool_calls") or ():
                    i = call["index"]
                    args = b.calls.setdefault(i, [])
                    fn = call.get("function") or {}
                    if "id" in call:  # a call's first delta: the relay decoder gave it its id
                        self._call_meta[(c, i)] = (call["id"], fn.get("name") or "")
                    if fn.get("arguments"):
                        args.append(fn["arguments"])
                reason = choice.get("finish_reason")
                if reason:
                    b.finish = reason
                    b.stop_sequence = openai_stop_sequence(choice)

    def result(self) -> Result:
        choices = []
        for index in sorted(self._choices) or [0]:
            b = self._choices.get(index) or _ChoiceBuilder()
            calls = tuple(
                ToolCall(*self._call_meta.get((index, i), (f"call_{index}_{i}", "")), "".join(args))
                for i, args in sorted(b.calls.items())
            )
            finish: FinishReason = b.finish or ("tool_calls" if calls else "stop")
            choices.append(
                Choice(
                    index=index,
                    text="".join(b.text),
                    reasoning="".join(b.reasoning),
                    tool_calls=calls,
                    finish_reason=finish,
                    stop_sequence=b.stop_sequence,
                    logprobs=tuple(b.logprobs) if b.logprobs is not None else None,
                )
            )
        return Result(choices=tuple(choices), usage=self.usage)
