"""The first-token deadline carried by Http1Client.post(deadline=) and cleared by
Response.clear_deadline(), over real loopback sockets (tests/engines/test_http1.serve)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from tests.engines.test_http1 import read_request, serve

from mesh.canonical import CanonicalRequest, Message, Relayed, TextPart
from mesh.config import OpenAIEngineConfig
from mesh.engines.openai_compat import OpenAIEngine
from mesh.errors import EngineError


def chunk(**delta: Any) -> bytes:
    return orjson.dumps({"id": "e", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def sse(*payloads: bytes) -> bytes:
    body = b"".join(b"data: " + p + b"\n\n" for p in payloads)
    return b"%x\r\n%s\r\n" % (len(body), body)


END = b"0\r\n\r\n"
REQ = CanonicalRequest(model="m", messages=(Message("user", (TextPart("hi"),)),), stream=True)


def engine_for(url: str, **kw: Any) -> OpenAIEngine:
    return OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions"), **kw), "m")


def texts(events: list[Any]) -> list[str]:
    return [t for ev in events if isinstance(ev, Relayed) for t in ev.texts]


async def test_read_timeout_still_bounds_waits_after_the_first_output() -> None:
    """first_token_timeout large, read_timeout small: a gap after the first output longer
    than read_timeout is a timeout (clear_deadline must leave read_timeout in force)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(HEAD + sse(chunk(role="assistant", content=""), chunk(content="Hello")))
        await writer.drain()
        await asyncio.sleep(5)

    async with serve(handler) as (_, url):
        engine = engine_for(url, first_token_timeout=30, read_timeout=0.3)
        loop = asyncio.get_running_loop()
        got: list[Any] = []
        started = loop.time()
        try:
            with pytest.raises(EngineError) as caught:
                async for ev in engine.relay(REQ):
                    got.append(ev)
        finally:
            await engine.aclose()
        assert caught.value.kind == "timeout" and loop.time() - started < 2
        assert texts(got) == ["Hello"]


async def test_a_pooled_connection_reused_gets_a_fresh_deadline_and_a_stall_on_it_times_out() -> None:
    """Answer 1 keeps its connection; answer 2 on it stalls: EngineTimeout at
    first_token_timeout, the connection is not put back; answer 3 is served normally."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        k = 0
        while await read_request(reader) is not None:
            k += 1
            if n == 1 and k == 2:
                writer.write(HEAD + sse(chunk(role="assistant", content="")))
                await writer.drain()
                await asyncio.sleep(5)
                return
            writer.write(HEAD + sse(chunk(content=f"a{n}.{k}"), b"[DONE]") + END)
            await writer.drain()

    async with serve(handler) as (_state, url):
        engine = engine_for(url, first_token_timeout=0.3, read_timeout=20)
        loop = asyncio.get_running_loop()
        try:
            first = [ev async for ev in engine.relay(REQ)]
            assert texts(first) == ["a1.1"]
            await asyncio.sleep(0.05)
            assert engine._chat is not None and len(engine._chat._idle) == 1
            started = loop.time()
            with pytest.raises(EngineError) as caught:
                async for _ in engine.relay(REQ):
                    pass
            assert caught.value.kind == "timeout" and 0.25 < loop.time() - started < 2
            assert not engine._chat._idle
            # a late answer (after first_token_timeout elapsed in total since the pooled
            # connection's previous deadline) is still fine on a new connection
            third = [ev async for ev in engine.relay(REQ)]
            assert texts(third) == ["a2.1"]
        finally:
            await engine.aclose()


async def test_a_stale_deadline_on_a_pooled_connection_does_not_time_out_the_next_request() -> None:
    """An error answer (500) is read under the deadline and its connection kept (drained)
    without clear_deadline: the next request on it must get its own deadline, not the old
    one (which passed long ago)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        k = 0
        while await read_request(reader) is not None:
            k += 1
            if k == 1:
                body = b'{"error": {"message": "boom"}}'
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                continue
            await asyncio.sleep(0.25)  # under first_token_timeout, past the old deadline
            writer.write(HEAD + sse(chunk(content="ok"), b"[DONE]") + END)
            await writer.drain()

    async with serve(handler) as (state, url):
        engine = engine_for(url, first_token_timeout=0.4, read_timeout=20)
        try:
            with pytest.raises(EngineError):
                async for _ in engine.relay(REQ):
                    pass
            await asyncio.sleep(0.3)  # the first request's deadline has passed
            got = [ev async for ev in engine.relay(REQ)]
            assert texts(got) == ["ok"] and state.connections == 1
        finally:
            await engine.aclose()


async def test_concurrent_answers_do_not_share_a_deadline() -> None:
    """Answer A streams with gaps longer than first_token_timeout (after its first output);
    answer B, on its own connection meanwhile, stalls before output. B times out at
    first_token_timeout; A is read to its end."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(HEAD + sse(chunk(content="A0")))
            await writer.drain()
            for i in range(1, 4):
                await asyncio.sleep(0.35)
                writer.write(sse(chunk(content=f"A{i}")))
                await writer.drain()
            writer.write(sse(b"[DONE]") + END)
            await writer.drain()
            await read_request(reader)
        else:
            writer.write(HEAD + sse(chunk(role="assistant", content="")))
            await writer.drain()
            await asyncio.sleep(5)

    async with serve(handler) as (_, url):
        engine = engine_for(url, first_token_timeout=0.3, read_timeout=2)
        loop = asyncio.get_running_loop()

        async def a() -> list[Any]:
            return [ev async for ev in engine.relay(REQ)]

        async def b() -> float:
            await asyncio.sleep(0.1)
            started = loop.time()
            with pytest.raises(EngineError) as caught:
                async for _ in engine.relay(REQ):
                    pass
            assert caught.value.kind == "timeout"
            return loop.time() - started

        try:
            got_a, took_b = await asyncio.gather(a(), b())
        finally:
            await engine.aclose()
        assert texts(got_a) == ["A0", "A1", "A2", "A3"]
        assert 0.25 < took_b < 1.5


async def test_cancelled_while_waiting_for_the_first_output_drops_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(HEAD + sse(chunk(role="assistant", content="")))
        await writer.drain()
        await asyncio.sleep(5)

    async with serve(handler) as (_, url):
        engine = engine_for(url, first_token_timeout=3, read_timeout=20)
        try:
            async def consume() -> None:
                async for _ in engine.relay(REQ):
                    pass
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine._chat is not None and not engine._chat._idle
            assert all(c.closed for c in engine._chat._open)
        finally:
            await engine.aclose()
