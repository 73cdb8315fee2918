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
