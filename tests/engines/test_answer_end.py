"""The end of an engine's answer after ``[DONE]`` (the chunked terminator, which a server may
send a moment later): the answer is not held up for it, and the connection goes back to the
pool once it came, or is dropped when it does not come."""

from __future__ import annotations

import asyncio
import time

import orjson
from tests.engines.test_http1 import Handler, read_request, serve

from mesh.canonical import CanonicalRequest, Message, TextPart, Usage
from mesh.config import OpenAIEngineConfig
from mesh.engines.openai_compat import OpenAIEngine

CHUNK = orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                      "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def sse(payload: bytes) -> bytes:
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def handler_with_gap(gap: float) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(sse(CHUNK) + sse(b"[DONE]"))
            await writer.drain()
            await asyncio.sleep(gap)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    return handler


def request() -> CanonicalRequest:
    return CanonicalRequest(model="m", messages=(Message("user", (TextPart("hello"),)),), stream=True)


async def answer(engine: OpenAIEngine) -> tuple[float, Usage]:
    started = time.monotonic()
    events = [ev async for ev in engine.relay(request())]
    usage = events[-1]
    assert isinstance(usage, Usage)
    return time.monotonic() - started, usage


async def test_the_answer_ends_at_done_and_the_connection_is_kept_once_the_end_comes() -> None:
    async with serve(handler_with_gap(0.4)) as (state, url):
        engine = OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions")), "m")
        took, usage = await answer(engine)
        assert took < 0.3 and usage.input_tokens == 3 and usage.output_tokens == 1
        await asyncio.sleep(0.6)  # the end came: the connection is back in the pool
        took, _ = await answer(engine)
        assert took < 0.3
        await asyncio.sleep(0.6)
        await engine.aclose()
    assert state.connections == 1


async def test_an_end_that_never_comes_drops_the_connection() -> None:
    async with serve(handler_with_gap(30)) as (state, url):
        engine = OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions")), "m")
        took, _ = await answer(engine)
        assert took < 0.3
        await asyncio.sleep(1.4)  # past the drain's second
        await answer(engine)
        await engine.aclose()
    assert state.connections == 2


async def test_closing_the_engine_ends_the_drains_it_started() -> None:
    """An answer whose end is still being read when the engine is closed (a reload, a
    shutdown): closing cancels that read and waits for it, so no task outlives the engine."""
    async with serve(handler_with_gap(30)) as (_, url):
        engine = OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions")), "m")
        await answer(engine)
        draining = list(engine._draining)
        assert draining and not any(task.done() for task in draining)
        await engine.aclose()
        assert all(task.done() for task in draining) and not engine._draining
