"""Canonical events -> Responses API server-sent events.

Every event is ``event: <type>`` + ``data: <json>`` with a ``sequence_number`` counting from
0. Order: ``response.created``, ``response.in_progress``, then one output item at a time
(``output_item.added`` … ``output_item.done``), then the terminal event:

- ``response.completed``, or ``response.incomplete`` when the output was cut
  (``incomplete_details.reason``: ``max_output_tokens`` / ``content_filter``);
- ``response.failed`` when the engine fails after the stream started: status ``failed``,
  ``error: {code, message}`` and the output produced so far. It is the only failure event:
  openai-python parses it as a typed ``ResponseFailedEvent`` and ends the iteration cleanly
  (``responses.stream().get_final_response()`` then raises, as it does against OpenAI), and
  Codex treats it as the end of the turn. A bare ``error`` event would leave both waiting
  for a terminal event that never comes.

Items: reasoning (raw thinking, vLLM style) is ``content_part.added{reasoning_text}``,
``reasoning_text.delta`` … ``.done``, ``content_part.done``; a message is
``content_part.added{output_text}``, ``output_text.delta`` … ``.done``,
``content_part.done``; a function call is ``function_call_arguments.delta`` … ``.done``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from mesh.canonical import Event, Finish, FinishReason, ReasoningDelta, TextDelta, ToolArgsDelta, ToolCallStart, Usage
from mesh.errors import InternalError, MeshError
from mesh.http.streaming import LastChunk
from mesh.protocols.openai_responses_output import (
    ItemStatus,
    ResponseMeta,
    finish_status,
    function_call_item,
    logprobs_body,
    message_item,
    reasoning_item,
    response_object,
    text_part,
)

log = logging.getLogger("mesh.protocols.openai_responses")

OnFinal = Callable[[dict[str, Any]], Awaitable[None]]

# MeshError.kind -> the Responses error code (ResponseError.code in openai-python).
_ERROR_CODES = {
    "rate_limit": "rate_limit_exceeded",
    "overloaded": "rate_limit_exceeded",
    "invalid_request": "invalid_prompt",
}


@dataclass(slots=True)
class _Item:
    """The output item being streamed."""

    kind: Literal["reasoning", "message", "function_call"]
    index: int
    id: str
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    call: int = -1
    call_id: str = ""
    name: str = ""


class _Encoder:
    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self.seq = 0
        self.done: list[dict[str, Any]] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item | dict[str, Any]] = {}  # call index -> open item or finished item
        self.finish: FinishReason | None = None
        self.usage: Usage | None = None

    def event(self, kind: str, payload: dict[str, Any]) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.seq, **payload})
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _ids(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index}

    # ---- opening and closing items ----------------------------------------------------------------

    def _start(self, item: _Item, snapshot: dict[str, Any]) -> list[bytes]:
        self.open = item
        out = [self.event("response.output_item.added", {"output_index": item.index, "item": snapshot})]
        if item.kind != "function_call":
            part = {"type": "reasoning_text", "text": ""} if item.kind == "reasoning" else text_part("")
            out.append(self.event("response.content_part.added", {**self._ids(item), "content_index": 0, "part": part}))
        return out

    def open_item(self, kind: Literal["reasoning", "message"]) -> list[bytes]:
        if self.open is not None and self.open.kind == kind:
            return []
        out = self.close("completed")
        item = _Item(kind, len(self.done), self.meta.new_id("rs_" if kind == "reasoning" else "msg_"))
        if kind == "reasoning":
            snapshot = {"type": "reasoning", "id": item.id, "summary": [], "content": [], "status": "in_progress"}
        else:
            snapshot = message_item(item.id, [], "in_progress")
        return out + self._start(item, snapshot)

    def open_call(self, index: int, call_id: str, name: str) -> list[bytes]:
        out = self.close("completed")
        item = _Item("function_call", len(self.done), self.meta.new_id("fc_"), call=index, call_id=call_id, name=name)
        self.calls[index] = item
        return out + self._start(item, function_call_item(item.id, call_id, name, "", "in_progress"))

    def finished(self, item: _Item, status: ItemStatus) -> dict[str, Any]:
        text = "".join(item.text)
        if item.kind == "reasoning":
            return reasoning_item(item.id, text, status, self.meta.encrypted_reasoning)
        if item.kind == "message":
            return message_item(item.id, [text_part(text, item.logprobs)], status)
        return function_call_item(item.id, item.call_id, item.name, text, status)

    def close(self, status: ItemStatus) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        text = "".join(item.text)
        ids = self._ids(item)
        out: list[bytes] = []
        if item.kind == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": text}
            out.append(self.event("response.reasoning_text.done", {**ids, "content_index": 0, "text": text}))
            out.append(self.event("response.content_part.done", {**ids, "content_index": 0, "part": part}))
        elif item.kind == "message":
            done = {**ids, "content_index": 0, "text": text, "logprobs": item.logprobs}
            out.append(self.event("response.output_text.done", done))
            part = text_part(text, item.logprobs)
            out.append(self.event("response.content_part.done", {**ids, "content_index": 0, "part": part}))
        else:
            done = {**ids, "name": item.name, "arguments": text}
            out.append(self.event("response.function_call_arguments.done", done))
        final = self.finished(item, status)
        self.done.append(final)
        if item.kind == "function_call":
            self.calls[item.call] = final
        out.append(self.event("response.output_item.done", {"output_index": item.index, "item": final}))
        return out

    # ---- events -----------------------------------------------------------------------------------

    def feed(self, ev: Event) -> list[bytes]:
        match ev:
            case Usage():
                self.usage = ev
            case Finish(reason=reason, choice=0):
                self.finish = reason
            case ReasoningDelta(text=text, choice=0):
                out = self.open_item("reasoning")
                assert self.open is not None
                self.open.text.append(text)
                delta = {**self._ids(self.open), "content_index": 0, "delta": text}
                return [*out, self.event("response.reasoning_text.delta", delta)]
            case TextDelta(text=text, choice=0, logprobs=lps):
                out = self.open_item("message")
                assert self.open is not None
                self.open.text.append(text)
                lp = logprobs_body(lps)
                self.open.logprobs.extend(lp)
                delta = {**self._ids(self.open), "content_index": 0, "delta": text, "logprobs": lp}
                return [*out, self.event("response.output_text.delta", delta)]
            case ToolCallStart(index=i, id=call_id, name=name, choice=0):
                return self.open_call(i, call_id, name)
            case ToolArgsDelta(index=i, delta=delta, choice=0):
                call = self.calls.get(i)
                if isinstance(call, _Item):
                    call.text.append(delta)
                    return [self.event("response.function_call_arguments.delta", {**self._ids(call), "delta": delta})]
                if call is not None:  # a late fragment of a finished call: keep it in the final item
                    call["arguments"] += delta
        return []

    def end(self) -> tuple[list[bytes], dict[str, Any]]:
        status, reason = finish_status(self.finish)
        out = self.close("incomplete" if status == "incomplete" else "completed")
        final = response_object(self.meta, status, self.done, self.usage or Usage(), incomplete_reason=reason)
        return out, final

    def failed(self, err: MeshError) -> bytes:
        output = list(self.done)
        if self.open is not None:
            output.append(self.finished(self.open, "incomplete"))
        error = {"code": _ERROR_CODES.get(err.kind, "server_error"), "message": err.message}
        response = response_object(self.meta, "failed", output, None, error=error)
        return self.event("response.failed", {"response": response})


async def encode_stream(
    events: AsyncIterator[Event], meta: ResponseMeta, on_final: OnFinal | None = None
) -> AsyncIterator[bytes]:
    """SSE bytes for a stream of events (see the module docstring for the event order).

    ``on_final`` receives the final response object (completed or incomplete) before the
    terminal event is sent, so a client that chains on it at once finds it stored. A
    :class:`MeshError` from ``events`` ends the stream with ``response.failed``.
    """
    enc = _Encoder(meta)
    try:
        initial = response_object(meta, "in_progress", [], None)
        yield enc.event("response.created", {"response": initial})
        yield enc.event("response.in_progress", {"response": initial})
        async for ev in events:
            for chunk in enc.feed(ev):
                yield chunk
        tail, final = enc.end()
        for chunk in tail:
            yield chunk
        if on_final is not None:
            await on_final(final)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield LastChunk(enc.event(kind, {"response": final}))
    except MeshError as err:
        yield LastChunk(enc.failed(err))
    except Exception:
        log.exception("responses stream failed")
        yield LastChunk(enc.failed(InternalError("The stream failed because of an internal error.")))
