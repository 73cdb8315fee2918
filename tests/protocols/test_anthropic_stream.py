"""Anthropic Messages streaming: golden SSE transcripts, SDK accumulation, errors and pings.

Golden files live in ``golden/``; regenerate them with ``MESH_UPDATE_GOLDEN=1`` and review
the diff by eye.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event

from fakes import SlowSource
from mesh.canonical import (
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolArgsDelta,
    ToolCallStart,
    Usage,
)
from mesh.errors import EngineError, EngineOverloaded
from mesh.http.streaming import LastChunk, StreamResponse
from mesh.protocols.anthropic_messages import StreamMeta, encode_stream
from mesh.protocols.anthropic_stream import PING

GOLDEN = Path(__file__).parent / "golden"
META = StreamMeta(id="msg_test", model="test-model", signature="U0lHTkFUVVJF", request_id="req_test",
                  input_estimate=50, stop_sequences=("STOP",))


async def _events(items: Iterable[Event], fail: Exception | None = None) -> AsyncIterator[Event]:
    for ev in items:
        yield ev
    if fail is not None:
        raise fail


async def encode(items: Iterable[Event], meta: StreamMeta = META, fail: Exception | None = None) -> bytes:
    return b"".join([chunk async for chunk in encode_stream(_events(items, fail), meta)])


def sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs; every event must have both lines and matching types."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        name, data = name_line[7:], json.loads(data_line[6:])
        assert data["type"] == name
        out.append((name, data))
    return out


def accumulate(raw: bytes) -> Any:
    """The message the anthropic SDK's own accumulator builds from the stream."""
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in sse(raw):
        if name != "ping":
            snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)  # type: ignore[arg-type]
    return snapshot


def check_golden(name: str, raw: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("MESH_UPDATE_GOLDEN"):
        path.write_bytes(raw)
    assert raw == path.read_bytes()


TEXT: list[Event] = [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), Usage(25, 2)]
THINKING_THEN_TEXT: list[Event] = [
    ReasoningDelta("Let me"),
    ReasoningDelta(" think."),
    TextDelta("\n\n"),
    TextDelta("Answer"),
    TextDelta(" here"),
    Finish("stop", stop_sequence="STOP"),
    Usage(30, 6, cached_tokens=10, reasoning_tokens=2),
]
PARALLEL_TOOLS: list[Event] = [
    TextDelta("\n"),
    ToolCallStart(0, "call_a", "get_weather"),
    ToolArgsDelta(0, '{"city"'),
    ToolArgsDelta(0, ': "Paris"}'),
    ToolCallStart(1, "call_b", "get_time"),
    ToolArgsDelta(1, "{}"),
    Finish("tool_calls"),
    Usage(40, 12),
]


async def test_golden_text() -> None:
    raw = await encode(TEXT)
    check_golden("anthropic_text.sse", raw)
    names = [n for n, _ in sse(raw)]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    message = accumulate(raw)
    assert message.content[0].text == "Hello world"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (25, 2)


async def test_golden_thinking_then_text() -> None:
    raw = await encode(THINKING_THEN_TEXT)
    check_golden("anthropic_thinking_text.sse", raw)
    events = sse(raw)
    thinking_stop = next(i for i, (n, d) in enumerate(events) if n == "content_block_stop" and d["index"] == 0)
    assert events[thinking_stop - 1][1]["delta"] == {"type": "signature_delta", "signature": "U0lHTkFUVVJF"}
    message = accumulate(raw)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think." and message.content[0].signature == "U0lHTkFUVVJF"
    assert message.content[1].text == "\n\nAnswer here"
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "STOP"
    assert message.usage.input_tokens == 20 and message.usage.cache_read_input_tokens == 10
    assert message.usage.output_tokens == 6 and message.usage.output_tokens_details.thinking_tokens == 2


async def test_golden_parallel_tool_use() -> None:
    raw = await encode(PARALLEL_TOOLS)
    check_golden("anthropic_parallel_tools.sse", raw)
    starts = [d["content_block"] for n, d in sse(raw) if n == "content_block_start"]
    assert starts == [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
    ]
    message = accumulate(raw)
    assert [(b.name, b.input) for b in message.content] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert message.stop_reason == "tool_use"


async def test_message_start_announces_the_estimate_and_delta_the_real_usage() -> None:
    events = sse(await encode(TEXT))
    assert events[0][1]["message"]["usage"] == {
        "input_tokens": 50, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0
    }
    assert events[-2][1]["usage"] == {
        "input_tokens": 25, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0
    }


async def test_empty_and_blank_text_never_opens_a_block() -> None:
    raw = await encode([TextDelta(""), TextDelta("  "), Finish("stop"), Usage(3, 1)])
    assert [n for n, _ in sse(raw)] == ["message_start", "message_delta", "message_stop"]
    assert accumulate(raw).content == []


async def test_text_between_tools_and_reasoning_resuming_open_new_blocks() -> None:
    raw = await encode([
        ReasoningDelta("a"), ToolCallStart(0, "call_1", "f"), TextDelta("after"), ReasoningDelta("b"),
        Finish("tool_calls"), Usage(1, 4),
    ])
    message = accumulate(raw)
    assert [b.type for b in message.content] == ["thinking", "tool_use", "text", "thinking"]
    assert [d["index"] for n, d in sse(raw) if n == "content_block_start"] == [0, 1, 2, 3]


async def test_omitted_thinking_sends_only_the_signature() -> None:
    meta = StreamMeta(id="msg_1", model="m", signature="sig", omit_thinking=True)
    raw = await encode([ReasoningDelta("secret"), TextDelta("hi"), Finish("stop"), Usage(1, 2)], meta)
    assert b"secret" not in raw
    message = accumulate(raw)
    assert message.content[0].thinking == "" and message.content[0].signature == "sig"


async def test_other_choices_are_ignored_and_usage_extras_added() -> None:
    meta = StreamMeta(id="msg_1", model="m", signature="s", usage_extras=lambda u: {"cost": "0.5"})
    raw = await encode([TextDelta("x", choice=1), TextDelta("y"), Finish("stop"), Usage(1, 1)], meta)
    assert accumulate(raw).content[0].text == "y"
    assert sse(raw)[-2][1]["usage"]["cost"] == "0.5"


@pytest.mark.parametrize(
    ("error", "kind"), [(EngineError("engine died"), "api_error"), (EngineOverloaded("busy"), "overloaded_error"),
                        (RuntimeError("bug"), "api_error")]
)
async def test_failure_after_start_ends_with_error_event(error: Exception, kind: str) -> None:
    raw = await encode([TextDelta("partial")], fail=error)
    events = sse(raw)
    assert [n for n, _ in events][-1] == "error"
    assert "message_stop" not in [n for n, _ in events]
    assert events[-1][1]["error"]["type"] == kind and events[-1][1]["request_id"] == "req_test"


# ---- pings ---------------------------------------------------------------------------------------


async def respond(body: AsyncIterator[bytes], interval: float, hang_up_after: float | None = None) -> list[bytes]:
    """The body bytes a client receives from ``StreamResponse(idle_ping=PING)``; with
    ``hang_up_after``, the client disconnects after that many seconds."""
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            sent.append(message["body"])

    async def receive() -> dict[str, Any]:
        if hang_up_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(hang_up_after or 0)
        return {"type": "http.disconnect"}

    await StreamResponse(body, {}, idle_ping=PING, keepalive=interval)({}, receive, send)  # type: ignore[arg-type]
    return sent


async def test_idle_pings_fill_gaps_without_cancelling_the_pending_read() -> None:
    source = SlowSource([0, 0.35, 0])
    out = await respond(source.run(), interval=0.1)
    assert out[0] == b"chunk0" and out[-2:] == [b"chunk1", b"chunk2"]
    assert 2 <= out.count(PING) <= 4
    assert source.cancelled is False and source.closed is True


async def test_a_hang_up_while_idle_cancels_the_pending_read_and_closes_the_source() -> None:
    source = SlowSource([0, 10])
    out = await respond(source.run(), interval=0.05, hang_up_after=0.2)
    assert out[0] == b"chunk0" and PING in out
    assert source.cancelled is True and source.closed is True


async def test_a_fast_stream_passes_unchanged_and_no_ping_follows_its_end() -> None:
    raw = await encode(TEXT)
    assert b"".join(await respond(encode_stream(_events(TEXT), META), interval=10)) == raw
    out = await respond(SlowSource([0, 0.1]).run(), interval=0.02)
    count = len(out)
    await asyncio.sleep(0.1)  # a ping timer left running would still be sending
    assert len(out) == count and out[-1] == b"chunk1"


@pytest.mark.parametrize("fail", [None, EngineError("engine fell over")])
async def test_the_closing_event_alone_is_the_last_chunk(fail: Exception | None) -> None:
    # message_delta + message_stop, or the error event, go out with the response's end.
    chunks = [c async for c in encode_stream(_events([TextDelta("Hi"), Finish("stop"), Usage(3, 1)], fail), META)]
    assert [type(c) for c in chunks[:-1]] == [bytes] * (len(chunks) - 1)
    last = chunks[-1]
    assert type(last) is LastChunk
    names = [name for name, _ in sse(bytes(last))]
    assert names == (["error"] if fail is not None else ["content_block_stop", "message_delta", "message_stop"])
