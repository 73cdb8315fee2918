"""Health checks and token counts on the chat pool (``engines/openai_compat.py``) against an
engine that answers them oddly: whatever the probe's answer looks like (no length, no body,
chunked, interim answers first, too long, late, followed by a second answer), the probe gives
a plain answer without raising, and the NEXT chat request on the same pool reads its own
answer, never a stale piece of the probe's; nothing is left open after ``aclose``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
from tests.engines.test_http1 import read_request, serve

from mesh.canonical import CanonicalRequest, Message, TextPart, Tool, Usage
from mesh.config import OpenAIEngineConfig
from mesh.engines.openai_compat import OpenAIEngine

Probe = Callable[[asyncio.StreamWriter, bytes], Awaitable[None]]


def chat_answer(tokens: int) -> bytes:
    """A chunked SSE chat answer whose usage carries ``tokens`` prompt tokens (its tag)."""
    chunk = orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1}})
    events = [b"data: " + chunk + b"\n\n", b"data: [DONE]\n\n"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body


def json_answer(status: str, body: bytes = b"{}") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def engine_at(url: str, **extra: object) -> OpenAIEngine:
    return OpenAIEngine(OpenAIEngineConfig.model_validate(
        {"type": "openai", "base_url": url.removesuffix("/chat/completions"), "api_key": "k",
         "connect_timeout": 0.5, "read_timeout": 5.0, **extra}), "m")


def chat_request() -> CanonicalRequest:
    return CanonicalRequest(model="m", messages=(Message("user", (TextPart("hello"),)),), stream=True)


async def chat_tokens(engine: OpenAIEngine) -> int:
    """The tag of the answer the next chat request reads."""
    events = [ev async for ev in engine.relay(chat_request())]
    assert isinstance(events[-1], Usage)
    return events[-1].input_tokens


def is_chat(req: bytes) -> bool:
    return req.startswith(b"POST /v1/chat/completions ")


def scripted(probe: Probe, chats: list[int]) -> Callable[..., Awaitable[None]]:
    """A server answering chat requests with tags 101, 102, ... and probes with ``probe``."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            if is_chat(req):
                chats.append(len(chats) + 101)
                writer.write(chat_answer(chats[-1]))
            else:
                await probe(writer, req)
            await writer.drain()
    return handler


async def no_leak(engine: OpenAIEngine) -> None:
    client = engine._chat
    await engine.aclose()
    assert client is None or (not client._open and not client._idle)


def writes(*pieces: bytes) -> Probe:
    async def probe(writer: asyncio.StreamWriter, req: bytes) -> None:
        for piece in pieces:
            writer.write(piece)
    return probe


@pytest.mark.parametrize(("name", "probe", "healthy", "kept"), [
    # 204/304 have no body whatever they say: the answer ends at its head and the connection is kept.
    ("204", writes(b"HTTP/1.1 204 No Content\r\n\r\n"), True, True),  # then /v1/models answers 200
    ("304", writes(b"HTTP/1.1 304 Not Modified\r\n\r\n"), True, True),
    ("chunked", writes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"), True, True),
    ("interim", writes(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                       json_answer("200 OK")), True, True),
    # More than read() takes (1 MiB): healthy by its status, but the rest must not be the chat's.
    ("huge", writes(json_answer("200 OK", b"x" * (3 * 1024 * 1024))), True, False),
    # A second answer right behind the first, whole or begun: never read as the next request's.
    ("two answers", writes(json_answer("200 OK"), chat_answer(999)), True, False),
    ("half a second answer", writes(json_answer("200 OK"), b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"),
     True, False),
    ("not http", writes(b"SSH-2.0-OpenSSH_9.6\r\n"), False, False),
])
async def test_an_odd_health_answer_is_read_and_the_next_chat_gets_its_own(
        name: str, probe: Probe, healthy: bool, kept: bool) -> None:
    chats: list[int] = []

    async def answer(writer: asyncio.StreamWriter, req: bytes) -> None:
        if req.startswith(b"GET /v1/models "):
            writer.write(json_answer("200 OK", b'{"data":[]}'))
        else:
            await probe(writer, req)

    async with serve(scripted(answer, chats)) as (state, url):
        engine = engine_at(url)
        try:
            assert await engine.health() is healthy
            assert await chat_tokens(engine) == 101
            assert await chat_tokens(engine) == 102
            if kept:
                assert state.connections == 1, name
        finally:
            await no_leak(engine)


async def test_a_lengthless_health_answer_ends_with_its_connection_and_is_not_kept() -> None:
    """No Content-Length, not chunked: the body ends when the engine closes; the probe must
    wait for that, count it, and the chat goes on a new connection."""
    chats: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            if is_chat(req):
                chats.append(len(chats) + 101)
                writer.write(chat_answer(chats[-1]))
                await writer.drain()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n{\"status\":")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b'"ok"}')
                return  # the close ends the answer

    async with serve(handler) as (state, url):
        engine = engine_at(url)
        try:
            assert await engine.health() is True
            assert await chat_tokens(engine) == 101
            assert state.connections == 2
        finally:
            await no_leak(engine)


async def test_a_stray_answer_after_the_probe_was_released_is_never_the_chats() -> None:
    """The engine sends a second answer a moment after the health one, when the connection
    already sits idle in the pool: the connection is dropped, the chat reads its own answer."""
    chats: list[int] = []
    sent = asyncio.Event()

    async def stray(writer: asyncio.StreamWriter, req: bytes) -> None:
        writer.write(json_answer("200 OK"))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(chat_answer(999))
        await writer.drain()
        sent.set()

    async with serve(scripted(stray, chats)) as (state, url):
        engine = engine_at(url)
        try:
            assert await engine.health() is True
            await asyncio.wait_for(sent.wait(), 2)
            for _ in range(200):  # the stray bytes reach the client
                if not engine._chat or not engine._chat._open:
                    break
                await asyncio.sleep(0.01)
            assert await chat_tokens(engine) == 101
            assert state.connections == 2
        finally:
            await no_leak(engine)


async def test_a_health_body_that_comes_after_the_deadline_is_not_the_chats() -> None:
    """Half the body by the deadline, the rest later: unhealthy, and the late half (which
    would parse as the start of the next answer) goes with the dropped connection."""
    chats: list[int] = []

    async def late(writer: asyncio.StreamWriter, req: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(1.0)
        writer.write(b"67890" + chat_answer(999))

    async with serve(scripted(late, chats)) as (state, url):
        engine = engine_at(url)
        try:
            started = time.monotonic()
            assert await engine.health() is False
            assert time.monotonic() - started < 0.9  # connect_timeout (0.5 s), not the late body
            assert await chat_tokens(engine) == 101
            assert state.connections == 2
        finally:
            await no_leak(engine)


async def test_a_health_check_during_a_chat_stream_takes_its_own_connection() -> None:
    """The pool is shared: a probe while a chat stream is mid-answer must neither read from
    nor disturb it."""
    resume = asyncio.Event()
    head_sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            if is_chat(req):
                whole = chat_answer(101)
                cut = whole.index(b"\r\n\r\n") + 4 + 10
                writer.write(whole[:cut])
                await writer.drain()
                head_sent.set()
                await resume.wait()
                writer.write(whole[cut:])
            else:
                writer.write(json_answer("200 OK", b'{"status":"ok"}'))
            await writer.drain()

    async with serve(handler) as (state, url):
        engine = engine_at(url)
        try:
            chat = asyncio.ensure_future(chat_tokens(engine))
            await asyncio.wait_for(head_sent.wait(), 2)
            assert [await engine.health() for _ in range(3)] == [True, True, True]
            resume.set()
            assert await asyncio.wait_for(chat, 2) == 101
            assert state.connections == 2
        finally:
            await no_leak(engine)


@pytest.mark.parametrize("where", ["before connecting", "waiting for the head", "reading the body"])
async def test_a_probe_cancelled_anywhere_leaves_nothing_for_the_next_chat(where: str) -> None:
    chats: list[int] = []
    arrived = asyncio.Event()

    async def stall(writer: asyncio.StreamWriter, req: bytes) -> None:
        if where == "reading the body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()
        arrived.set()
        await asyncio.sleep(1.0)
        writer.write(b"x" * 99 if where == "reading the body" else json_answer("200 OK"))
        writer.write(chat_answer(999))

    async with serve(scripted(stall, chats)) as (_, url):
        engine = engine_at(url, connect_timeout=10.0)
        try:
            probe = asyncio.ensure_future(engine.health())
            if where == "before connecting":
                await asyncio.sleep(0)
            else:
                await asyncio.wait_for(arrived.wait(), 2)
                if where == "reading the body":
                    await asyncio.sleep(0.05)  # the head is in: the probe waits on the body
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            assert probe.cancelled()
            assert engine._chat is not None and not engine._chat._idle
            assert await chat_tokens(engine) == 101
        finally:
            await no_leak(engine)


async def test_an_https_base_url_that_is_plain_http_is_unhealthy_and_has_no_count() -> None:
    """TLS spoken to a plain HTTP server: no exception out of either probe, within the
    connect timeout, nothing left open."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read(1024)  # the ClientHello
        writer.write(json_answer("400 Bad Request", b"plain http"))
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()  # never answers the ClientHello; ends when the client gives up

    for h in (handler, silent):
        async with serve(h) as (_, url):
            engine = engine_at(url.replace("http://", "https://"))
            try:
                started = time.monotonic()
                assert await engine.health() is False
                req = CanonicalRequest(model="m", messages=(Message("user", (TextPart("x"),)),), stream=False)
                assert await engine.count_tokens(req.messages, req) is None
                assert time.monotonic() - started < 2.5
            finally:
                await no_leak(engine)


async def test_a_huge_or_too_nested_count_is_a_count_or_none_and_the_chat_still_works() -> None:
    """A 4 MiB prompt goes whole (the engine counts it); a tool schema orjson cannot encode
    (nested past its limit) is no count, not an exception, and sends nothing."""
    chats: list[int] = []
    lengths: list[int] = []

    async def count(writer: asyncio.StreamWriter, req: bytes) -> None:
        lengths.append(len(req.split(b"\r\n\r\n", 1)[1]))
        writer.write(json_answer("200 OK", b'{"count":%d}' % lengths[-1]))

    nested: dict[str, object] = {"type": "object"}
    for _ in range(300):
        nested = {"type": "object", "properties": {"a": nested}}
    huge = (Message("user", (TextPart("y" * (4 * 1024 * 1024)),)),)

    async with serve(scripted(count, chats)) as (state, url):
        engine = engine_at(url, connect_timeout=5.0)
        try:
            n = await engine.count_tokens(huge, CanonicalRequest(model="m", messages=huge, stream=False))
            assert n is not None and n > 4 * 1024 * 1024 and lengths == [n]
            deep = CanonicalRequest(model="m", messages=chat_request().messages, stream=False,
                                    tools=(Tool("t", None, nested),))
            assert await engine.count_tokens(deep.messages, deep) is None
            assert len(lengths) == 1
            assert await chat_tokens(engine) == 101
            assert state.connections == 1
        finally:
            await no_leak(engine)


async def test_closing_the_engine_between_the_two_health_requests_is_unhealthy_not_an_error() -> None:
    """The engine is closed (a reload) just as the /health answer (404) came in: the check
    must not go on to /v1/models on a client that is gone (it raised AssertionError)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(json_answer("404 Not Found", b"no"))
            await writer.drain()

    async with serve(handler) as (_, url):
        engine = engine_at(url, connect_timeout=5.0)
        try:
            engine._chat_client()
            client = engine._chat
            assert client is not None
            probe = asyncio.ensure_future(engine.health())
            for _ in range(100_000):  # the 404 is in; the probe has not yet been woken to read it
                if any(c.complete for c in client._open):
                    break
                await asyncio.sleep(0)
            await engine.aclose()
            assert await asyncio.wait_for(probe, 2) is False
            assert not client._open and not client._idle
        finally:
            await no_leak(engine)
