"""vLLM / OpenAI wire shapes: non-stream responses, stream chunks, usage and logprobs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson

from .behaviour import ChoicePlan, Piece, Plan

CHOSEN_LOGPROB = -0.5
_UNSET: Any = object()


def logprob_entry(tok: str, top: int) -> dict[str, Any]:
    tops = [{"token": tok, "logprob": CHOSEN_LOGPROB, "bytes": list(tok.encode())}]
    for j in range(1, top):
        alt = f"{tok}~{j}"
        tops.append({"token": alt, "logprob": CHOSEN_LOGPROB - j, "bytes": list(alt.encode())})
    return {"token": tok, "logprob": CHOSEN_LOGPROB, "bytes": list(tok.encode()), "top_logprobs": tops[:top]}


def usage(plan: Plan, cached: int, completion: int | None = None, *, details: bool = True) -> dict[str, Any]:
    done = sum(c.completion_tokens for c in plan.choices) if completion is None else completion
    out: dict[str, Any] = {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": plan.prompt_tokens + done,
    }
    if details:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
        out["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning_tokens for c in plan.choices)}
    return out


def message(plan: Plan, choice: ChoicePlan) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": None if choice.tool_calls else choice.content,
        "tool_calls": choice.tool_calls,
    }
    if plan.reasoning_field:
        msg[plan.reasoning_field] = choice.reasoning
    return msg


def completion(plan: Plan, rid: str, created: int, cached: int) -> dict[str, Any]:
    choices = []
    for c in plan.choices:
        logprobs = None
        if plan.logprobs:
            entries = [logprob_entry(p.text, plan.top_logprobs) for p in c.pieces if p.kind == "content"]
            logprobs = {"content": entries}
        choices.append(
            {
                "index": c.index,
                "message": message(plan, c),
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "system_fingerprint": "fp_testengine",
        "choices": choices,
        "usage": usage(plan, cached),
        "prompt_logprobs": None,
    }


def piece_delta(plan: Plan, p: Piece) -> dict[str, Any]:
    if p.kind == "reasoning":
        return {plan.reasoning_field or "reasoning_content": p.text}
    if p.kind == "content":
        return {"content": p.text}
    if p.kind == "tool_start":
        call = {
            "index": p.tool_index,
            "id": p.tool_id,
            "type": "function",
            "function": {"name": p.tool_name, "arguments": ""},
        }
        return {"tool_calls": [call]}
    return {"tool_calls": [{"index": p.tool_index, "function": {"arguments": p.text}}]}


class StreamEncoder:
    """Turns a plan into SSE events, honouring ``stream_options`` like vLLM."""

    def __init__(self, plan: Plan, body: dict[str, Any], rid: str, created: int, cached: int):
        self.plan, self.rid, self.created, self.cached = plan, rid, created, cached
        opts = body.get("stream_options") or {}
        self.include_usage = bool(opts.get("include_usage"))
        self.continuous = self.include_usage and bool(opts.get("continuous_usage_stats"))
        self.done_tokens = 0

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: Any = None,
        finish: str | None = None,
        stop_reason: Any = _UNSET,
    ) -> bytes:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        if stop_reason is not _UNSET:
            choice["stop_reason"] = stop_reason
        chunk: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.plan.model,
            "choices": [choice],
        }
        if self.continuous:
            chunk["usage"] = usage(self.plan, self.cached, self.done_tokens, details=False)
        elif self.include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _choice_events(self, c: ChoicePlan) -> Iterator[tuple[str, Piece | None, ChoicePlan]]:
        yield "role", None, c
        for p in c.pieces:
            yield "piece", p, c
        yield "finish", None, c

    def events(self) -> Iterator[tuple[str, bytes]]:
        """Yield (kind, data) with kind in role/piece/finish/usage/done, choices interleaved."""
        streams = [self._choice_events(c) for c in self.plan.choices]
        for step in itertools.zip_longest(*streams):
            for item in step:
                if item is None:
                    continue
                kind, p, c = item
                if kind == "role":
                    yield kind, self._chunk(c.index, {"role": "assistant", "content": ""})
                elif kind == "finish":
                    yield kind, self._chunk(c.index, {}, finish=c.finish_reason, stop_reason=c.stop_reason)
                else:
                    assert p is not None
                    self.done_tokens += p.cost
                    logprobs = None
                    if self.plan.logprobs and p.kind == "content":
                        logprobs = {"content": [logprob_entry(p.text, self.plan.top_logprobs)]}
                    yield kind, self._chunk(c.index, piece_delta(self.plan, p), logprobs)
        if self.include_usage:
            final = {
                "id": self.rid,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.plan.model,
                "choices": [],
                "usage": usage(self.plan, self.cached),
            }
            yield "usage", b"data: " + orjson.dumps(final) + b"\n\n"
        yield "done", b"data: [DONE]\n\n"
