"""Resuming a stream whose replica died after its first byte, on another replica.

Three parts, each usable without canonical events (the relay path feeds them from the
engine's own SSE lines):

* :class:`Delivered` tracks what the client has been sent of one answer: text,
  reasoning, tool calls, whether it finished, how many output tokens it cost so far.
* :func:`refusal` decides whether a failure may be resumed at all (None: it may).
* :func:`continuation` builds the request that makes another replica go on from exactly
  what was delivered: the messages, then an assistant message holding the delivered text
  (and reasoning), sent as a continuation (``continue_final``: vLLM's
  ``continue_final_message`` with ``add_generation_prompt`` off), with ``max_tokens``
  reduced by the delivered output.
* :class:`Splice` rewrites the continuation's numbers onto the interrupted stream: tool
  call indexes go on from the delivered ones, and usage becomes one cumulative usage for
  the whole answer (the prompt once, each delivered token once). What the continuation's
  replica read again (the prompt plus the delivered prefix) is the operator's cost,
  kept in ``reprocessed_tokens`` and never billed.

Which failures resume is documented in docs/resume.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mesh.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    Message,
    Part,
    ReasoningDelta,
    ReasoningPart,
    Relayed,
    TextDelta,
    TextPart,
    ToolArgsDelta,
    ToolCallStart,
    Usage,
)
from mesh.errors import EngineError

# Metric outcomes (mesh_stream_resumes_total{outcome}).
RESUMED = "resumed"  # a continuation on another replica took over the stream
FAILED = "failed"  # eligible, but no other replica could continue it (in time)
REFUSED = "refused"  # the failure is not one that resumes (see refusal())
FINISHED = "finished"  # the answer had already ended (or used its max_tokens): closed without a resume


class Delivered:
    """What one answer has delivered to the client so far (choice 0; more choices refuse)."""

    __slots__ = (
        "_reasoning",
        "_text",
        "cached_tokens",
        "choices",
        "deltas",
        "finished",
        "input_tokens",
        "opaque",
        "reasoning_tokens",
        "reported_output",
        "tool_calls",
    )

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self.choices: set[int] = set()
        self.tool_calls = 0
        self.finished = False
        self.deltas = 0  # non-empty output deltas: at least a token each
        self.reported_output = 0  # the engine's own cumulative output count, when it sent one
        self.input_tokens = 0  # the prompt as the engine counted it (0: not reported yet)
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.opaque = False  # something was delivered that was not tracked

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def output_tokens(self) -> int:
        return max(self.reported_output, self.deltas)

    def add_text(self, text: str, choice: int = 0) -> None:
        self.choices.add(choice)
        if text:
            self._text.append(text)
            self.deltas += 1

    def add_reasoning(self, text: str, choice: int = 0) -> None:
        self.choices.add(choice)
        if text:
            self._reasoning.append(text)
            self.deltas += 1

    def start_tool_call(self, choice: int = 0) -> None:
        self.choices.add(choice)
        self.tool_calls += 1

    def add_tool_args(self, delta: str, choice: int = 0) -> None:
        self.choices.add(choice)
        if delta:
            self.deltas += 1

    def finish(self, choice: int = 0) -> None:
        self.choices.add(choice)
        self.finished = True

    def usage(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> None:
        """A cumulative usage report (already spliced, after a resume)."""
        if input_tokens:
            self.input_tokens, self.cached_tokens = input_tokens, cached_tokens
        self.reported_output = max(self.reported_output, output_tokens)
        self.reasoning_tokens = max(self.reasoning_tokens, reasoning_tokens)

    def observe(self, ev: Event) -> None:
        """Track an event: a canonical one, or the relay path's engine chunks."""
        if isinstance(ev, Relayed):  # the common case first, without a call of its own
            # From what the relay decoder noted on its walk over the chunks: this runs for
            # every read of every relayed stream.
            if ev.active:
                self.choices |= ev.active
            if ev.texts:
                self._text += ev.texts
            if ev.reasoning:
                self._reasoning += ev.reasoning
            self.deltas += ev.deltas
            self.tool_calls += ev.calls
            if ev.finished:
                self.finished = True
            return
        match ev:
            case TextDelta(text=text, choice=c):
                self.add_text(text, c)
            case ReasoningDelta(text=text, choice=c):
                self.add_reasoning(text, c)
            case ToolCallStart(choice=c):
                self.start_tool_call(c)
            case ToolArgsDelta(delta=delta, choice=c):
                self.add_tool_args(delta, c)
            case Finish(choice=c):
                self.finish(c)
            case Usage():
                self.usage(ev.input_tokens, ev.output_tokens, ev.cached_tokens, ev.reasoning_tokens)
            case _:
                # An event this tracker cannot read: what was delivered is unknown, so never
                # resume.
                self.opaque = True

    def final_usage(self) -> Usage:
        """Usage for an answer that ended without its engine's final report (input 0: unknown,
        the pipeline bills its prompt estimate)."""
        return Usage(self.input_tokens, self.output_tokens, self.cached_tokens, self.reasoning_tokens)


def refusal(error: EngineError, delivered: Delivered, *, resumes_left: int, can_continue: bool,
            structured: bool = False, choices: int = 1) -> str | None:
    """Why a stream that failed with ``error`` after its first byte may not resume (a short
    reason for the log and the trace), or None when it may. ``can_continue``: another
    replica of the model (healthy now or not) continues a final assistant message;
    ``structured``: the request constrains its output (a JSON schema or JSON mode);
    ``choices``: the request's ``n`` (a drop can come before a later choice's first delta)."""
    if not (error.replica_fault and error.retryable):
        return "not_replica_fault"  # the engine answered an error for this request: another would too
    if resumes_left <= 0:
        return "limit"
    if delivered.opaque:
        return "untracked"
    if structured:
        return "structured_output"  # engines start the grammar afresh, not from the delivered prefix
    if choices > 1 or len(delivered.choices) > 1 or any(c != 0 for c in delivered.choices):
        return "several_choices"
    if delivered.tool_calls:
        return "tool_call"  # no engine continues a partial tool call from an assistant message
    if not can_continue:
        return "engine_cannot_continue"
    return None


def continuation(request: CanonicalRequest, delivered: Delivered) -> CanonicalRequest | None:
    """The request that continues ``request`` from what was delivered, or None when its
    ``max_tokens`` is used up (the answer is complete as delivered)."""
    max_tokens = request.max_tokens
    if max_tokens is not None:
        max_tokens -= delivered.output_tokens
        if max_tokens <= 0:
            return None
    done: list[Part] = []
    if delivered.reasoning:
        done.append(ReasoningPart(delivered.reasoning))
    messages = request.messages
    if request.continue_final and messages and messages[-1].role == "assistant":
        # A prefill: the client's own assistant text goes on with what was delivered.
        last = messages[-1]
        kept = [p for p in last.parts if not isinstance(p, TextPart)]
        prefix = Message("assistant", (*kept, *done, TextPart(last.text + delivered.text)), last.name)
        messages = (*messages[:-1], prefix)
    else:
        messages = (*messages, Message("assistant", (*done, TextPart(delivered.text))))
    extra = {k: v for k, v in request.extra.items() if k != "echo"}  # the echo was delivered already
    least = extra.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool):
        extra["min_tokens"] = max(least - delivered.output_tokens, 0)
    return replace(request, messages=messages, continue_final=True, max_tokens=max_tokens, extra=extra)


@dataclass(slots=True)
class Splice:
    """Rewrites a continuation's events onto the stream it continues (made at the resume
    from what was delivered then)."""

    base_output: int
    base_input: int
    base_cached: int
    base_reasoning: int
    tool_offset: int
    reprocessed_tokens: int = 0  # input the continuation read again: the operator's cost

    @classmethod
    def after(cls, delivered: Delivered) -> Splice:
        return cls(delivered.output_tokens, delivered.input_tokens, delivered.cached_tokens,
                   delivered.reasoning_tokens, delivered.tool_calls)

    def tool_index(self, index: int) -> int:
        return index + self.tool_offset

    def usage(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
              reasoning_tokens: int = 0) -> tuple[int, int, int, int]:
        """The whole answer's (input, output, cached, reasoning) from the continuation's own
        cumulative counts: the prompt as first counted (else the continuation's input less
        the delivered prefix), the delivered output plus the continuation's."""
        self.reprocessed_tokens = max(self.reprocessed_tokens, input_tokens)
        if self.base_input:
            prompt, cached = self.base_input, self.base_cached
        elif input_tokens:
            prompt = max(input_tokens - self.base_output, 0)
            cached = min(cached_tokens, prompt)
        else:
            prompt, cached = 0, 0
        return prompt, self.base_output + output_tokens, cached, self.base_reasoning + reasoning_tokens

    def event(self, ev: Event) -> Event:
        """A canonical event of the continuation as the client's stream goes on."""
        match ev:
            case Usage():
                return Usage(*self.usage(ev.input_tokens, ev.output_tokens, ev.cached_tokens, ev.reasoning_tokens))
            case ToolCallStart(index=i) if self.tool_offset:
                return replace(ev, index=self.tool_index(i))
            case ToolArgsDelta(index=i) if self.tool_offset:
                return replace(ev, index=self.tool_index(i))
        return ev


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    """One failure after the first byte and what became of it (log line, trace, metric)."""

    outcome: str  # RESUMED, FAILED, REFUSED or FINISHED
    reason: str  # the failure's kind, or why it did not resume
    from_replica: str
    to_replica: str | None
    delivered_tokens: int


def resume_fields(resumes: list[ResumeRecord], reprocessed_tokens: int) -> dict[str, str | int]:
    """What the log line and the request span say of failures after the first byte (nothing
    when there were none): e.g. ``resume: "resumed r1->r2 at 12"``, ``reprocessed_tokens``."""
    if not resumes:
        return {}
    said = "; ".join(
        f"{r.outcome} {r.from_replica}->{r.to_replica or '-'} at {r.delivered_tokens} ({r.reason})"
        for r in resumes
    )
    return {"resume": said, "resume_outcome": resumes[-1].outcome,
            "reprocessed_tokens": reprocessed_tokens}
