"""A streamed answer's first socket read that holds its first output and more: that output is
handed on before the rest of the read is decoded, and whatever fails in the rest fails after
it (the client has the text, and it is billed), as when the read is not split."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from tests.engines.test_http1 import Handler, read_request, serve

from mesh.canonical import CanonicalRequest, Event, Message, Relayed, TextPart, Usage
from mesh.config import OpenAIEngineConfig
from mesh.engines.openai_compat import OpenAIEngine
from mesh.errors import EngineError


def chunk(**delta: Any) -> bytes:
    return orjson.dumps({"id": "e", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


ROLE = chunk(role="assistant", content="")
BAD = {
    "engine_error": orjson.dumps({"error": {"message": "policy violation", "code": 400}}),
    "bad_json": b"{not json",
    "bad_shape": orjson.dumps({"choices": "oops"}),
}


def one_read(payloads: list[bytes]) -> Handler:
    body = b"".join(b"data: " + p + b"\n\n" for p in payloads)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # one write: one read
            await writer.drain()
    return handler


async def events_until_failure(payloads: list[bytes], stream: bool) -> tuple[list[Event], EngineError | None]:
    request = CanonicalRequest(model="m", messages=(Message("user", (TextPart("hi"),)),), stream=stream)
    got: list[Event] = []
    async with serve(one_read(payloads)) as (_, url):
        engine = OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions")), "m")
        try:
            async for ev in engine.relay(request):
                got.append(ev)
        except EngineError as err:
            return got, err
        finally:
            await engine.aclose()
    return got, None


def texts(events: list[Event]) -> list[str]:
    return [t for ev in events if isinstance(ev, Relayed) for t in ev.texts]


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "aggregated"])
async def test_output_before_a_bad_payload_of_the_first_read_comes_first(bad: str, stream: bool) -> None:
    payloads = [ROLE, ROLE, ROLE, chunk(content="Hello"), BAD[bad], chunk(content=" world"), b"[DONE]"]
    events, failure = await events_until_failure(payloads, stream)
    assert texts(events) == ["Hello"] and failure is not None  # the text, then the failure


async def test_a_split_first_read_hands_on_the_whole_answer() -> None:
    words = [f" w{i}" for i in range(12)]
    usage = orjson.dumps({"id": "e", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 12}})
    payloads = [ROLE, *(chunk(content=w) for w in words), usage, b"[DONE]"]
    streamed, failure = await events_until_failure(payloads, True)
    assert failure is None and texts(streamed) == words
    relayed = [ev for ev in streamed if isinstance(ev, Relayed)]
    assert len(relayed) == 2 and relayed[0].texts == [" w0"]  # the first output went on by itself
    assert isinstance(streamed[-1], Usage) and streamed[-1].output_tokens == 12
    whole, _ = await events_until_failure(payloads, False)
    assert len([ev for ev in whole if isinstance(ev, Relayed)]) == 1 and texts(whole) == words


def stalls(headers: bool, first: bytes = b"", then_after: float | None = None) -> Handler:
    """Answers nothing (``headers`` False), or its headers and ``first``, then, ``then_after``
    seconds later, one answering chunk and the end (else nothing more)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if headers:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            if first:
                writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        if then_after is None:
            await asyncio.sleep(30)
            return
        await asyncio.sleep(then_after)
        rest = b"data: " + chunk(content="late") + b"\n\ndata: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        await writer.drain()
        await read_request(reader)
    return handler


@pytest.mark.parametrize("headers", [False, True], ids=["no_headers", "no_output"])
async def test_the_first_token_deadline_ends_a_stalled_engine(headers: bool) -> None:
    """No first output within ``first_token_timeout``: an EngineTimeout then, well before
    the read timeout, and the connection is dropped (the engine stops generating)."""
    request = CanonicalRequest(model="m", messages=(Message("user", (TextPart("hi"),)),), stream=True)
    async with serve(stalls(headers, b"data: " + ROLE + b"\n\n")) as (_, url):
        engine = OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions"),
                                                 first_token_timeout=0.3, read_timeout=20), "m")
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(EngineError) as caught:
                async for _ in engine.relay(request):
                    pass
            assert caught.value.kind == "timeout" and 0.25 < loop.time() - started < 2
            assert engine._chat is not None and not engine._chat._idle  # dropped, not kept
            assert all(conn.closed for conn in engine._chat._open)
        finally:
            await engine.aclose()


async def test_the_first_token_deadline_ends_with_the_first_output() -> None:
    """Once the first output came, only the read timeout bounds the waits: a gap longer than
    ``first_token_timeout`` after it is not a timeout."""
    request = CanonicalRequest(model="m", messages=(Message("user", (TextPart("hi"),)),), stream=True)
    first = b"data: " + chunk(content="Hello") + b"\n\n"
    async with serve(stalls(True, first, then_after=0.5)) as (_, url):
        engine = OpenAIEngine(OpenAIEngineConfig(type="openai", base_url=url.removesuffix("/chat/completions"),
                                                 first_token_timeout=0.2, read_timeout=20), "m")
        try:
            got = [ev async for ev in engine.relay(request)]
        finally:
            await engine.aclose()
    assert texts(got) == ["Hello", "late"]
