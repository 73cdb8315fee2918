"""Anthropic Messages streaming: canonical events -> named SSE events.

:func:`encode_stream` writes ``message_start``, then one content block at a time
(``content_block_start``, deltas, ``content_block_stop``), then ``message_delta`` and
``message_stop``. Rules the SDK's accumulator relies on:

* Block indices count 0, 1, 2… in order; a block is closed before the next opens.
* A text block opens only on text that is not all whitespace (whitespace before it is
  carried into it, whitespace alone between other blocks is dropped): no empty text block.
* A thinking block starts ``{"thinking": "", "signature": ""}`` and ends with one
  ``signature_delta`` (the invented :attr:`StreamMeta.signature`) before its stop.
* A tool_use block starts with ``input: {}``; the engine's argument fragments pass
  through as ``input_json_delta.partial_json``.
* ``message_start`` announces the pipeline's prompt estimate as ``input_tokens``: the
  engine reports usage only at the end, after the response has started. ``message_delta``
  then carries the real cumulative usage (input, output, cache reads), which the SDK
  writes over the estimate.
* One ``ping`` follows the first block start, as Anthropic's API does; the response adds
  more (:data:`PING`) while the stream is idle (``StreamResponse(idle_ping=...)``).
* A failure after the start ends the stream with ``event: error`` (no ``message_stop``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from mesh.canonical import (
    Event,
    Finish,
    FinishReason,
    ReasoningDelta,
    Relayed,
    TextDelta,
    ToolArgsDelta,
    ToolCallStart,
    Usage,
)
from mesh.errors import InternalError, MeshError
from mesh.http.streaming import LastChunk
from mesh.protocols.anthropic_errors import stream_error_event
from mesh.protocols.anthropic_render import StreamMeta, stop_reason, usage_body

__all__ = ["PING", "encode_stream"]

log = logging.getLogger("mesh.protocols.anthropic_stream")

PING = b'event: ping\ndata: {"type":"ping"}\n\n'

_BLOCK_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _delta(index: int, kind: bytes, key: bytes, value: str) -> bytes:
    """A content_block_delta, serialized around the one string that changes."""
    return (
        _BLOCK_DELTA + str(index).encode() + b',"delta":{"type":"' + kind + b'","' + key + b'":'
        + orjson.dumps(value) + b"}}\n\n"
    )


class _Blocks:
    """The block state machine: which block is open, and the bytes each event produces."""

    def __init__(self, meta: StreamMeta) -> None:
        self.meta = meta
        self.next_index = 0
        self.open: str | None = None  # "text" | "thinking" | "tool_use"
        self.open_tool: int | None = None
        self.tool_blocks: dict[int, int] = {}  # canonical tool index -> block index
        self.pending_space = ""

    @property
    def index(self) -> int:
        return self.next_index - 1

    def close(self) -> bytes:
        self.pending_space = ""
        if self.open is None:
            return b""
        out = b""
        if self.open == "thinking":
            out += _delta(self.index, b"signature_delta", b"signature", self.meta.signature)
        self.open = None
        self.open_tool = None
        return out + _event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def start(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self.close()
        self.open = kind
        self.next_index += 1
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        out += _event("content_block_start", start)
        if self.next_index == 1:
            out += PING
        return out

    def text(self, text: str) -> bytes:
        if self.open != "text":
            text = self.pending_space + text
            if not text.strip():
                self.pending_space = text
                return b""
            out = self.start("text", {"type": "text", "text": ""})
        else:
            out = b""
        return out + _delta(self.index, b"text_delta", b"text", text)

    def thinking(self, text: str) -> bytes:
        out = b""
        if self.open != "thinking":
            out = self.start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if self.meta.omit_thinking:
            return out
        return out + _delta(self.index, b"thinking_delta", b"thinking", text)

    def tool_start(self, index: int, call_id: str, name: str) -> bytes:
        out = self.start("tool_use", {"type": "tool_use", "id": call_id, "name": name, "input": {}})
        self.open_tool = index
        self.tool_blocks[index] = self.index
        return out

    def tool_args(self, index: int, fragment: str) -> bytes:
        block = self.tool_blocks.get(index)
        if block is None:
            log.warning("arguments for unknown tool call %d dropped", index)
            return b""
        # A fragment for an earlier, closed call (engines interleaving parallel calls) still
        # names that call's block: the SDK's accumulator looks blocks up by index.
        return _delta(block, b"input_json_delta", b"partial_json", fragment)

    def message_start(self) -> bytes:
        usage = {
            "input_tokens": self.meta.input_estimate,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        message: dict[str, Any] = {
            "id": self.meta.id,
            "type": "message",
            "role": "assistant",
            "model": self.meta.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def message_end(self, finish: Finish | None, usage: Usage) -> bytes:
        reason: FinishReason = finish.reason if finish else "stop"
        matched = finish.stop_sequence if finish else None
        stop, sequence = stop_reason(reason, matched, bool(self.tool_blocks), self.meta.stop_sequences)
        extras = self.meta.usage_extras(usage) if self.meta.usage_extras else None
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": sequence},
            "usage": usage_body(usage, extras),
        }
        return self.close() + _event("message_delta", delta) + _event("message_stop", {"type": "message_stop"})


async def encode_stream(events: AsyncIterator[Event], meta: StreamMeta) -> AsyncIterator[bytes]:
    """SSE bytes for a stream of events (choice 0; Anthropic has no ``n``).

    A :class:`MeshError` raised by ``events`` ends the stream with ``event: error``.
    """
    blocks = _Blocks(meta)
    yield blocks.message_start()
    finish: Finish | None = None
    usage: Usage | None = None
    try:
        async for ev in events:
            out = b""
            match ev:
                case Usage():
                    usage = ev
                case Relayed():  # never asked for here: only Chat Completions relays
                    continue
                case _ if ev.choice != 0:
                    continue
                case TextDelta(text=text):
                    out = blocks.text(text) if text else b""
                case ReasoningDelta(text=text):
                    out = blocks.thinking(text) if text else b""
                case ToolCallStart(index=i, id=call_id, name=name):
                    out = blocks.tool_start(i, call_id, name)
                case ToolArgsDelta(index=i, delta=fragment):
                    out = blocks.tool_args(i, fragment) if fragment else b""
                case Finish():
                    finish = ev
            if out:
                yield out
        yield LastChunk(blocks.message_end(finish, usage or Usage()))
    except MeshError as err:
        yield LastChunk(stream_error_event(err, meta.request_id))
    except Exception:
        log.exception("stream failed")
        yield LastChunk(stream_error_event(InternalError("The stream failed because of an internal error."),
                                           meta.request_id))
