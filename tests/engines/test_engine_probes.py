"""The OpenAI-compatible engine's health check and token count (``engines/openai_compat.py``)
on the request path's connection pool, against a scripted server on a real socket: what goes
on the wire, what counts as healthy, and that a probe cut short never leaves a connection
the next request could read its answer from."""

from __future__ import annotations

import asyncio
import time

import orjson
from tests.engines.test_http1 import read_request, serve

from mesh.canonical import CanonicalRequest, Message, TextPart
from mesh.config import OpenAIEngineConfig
from mesh.engines.openai_compat import OpenAIEngine


def answer(status: str, body: bytes = b"{}") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def engine_at(url: str, **extra: object) -> OpenAIEngine:
    base = url.removesuffix("/chat/completions")
    return OpenAIEngine(OpenAIEngineConfig.model_validate(
        {"type": "openai", "base_url": base, "api_key": "sk-engine", "connect_timeout": 0.5, **extra}), "m")


def request_line(req: bytes) -> bytes:
    return req.split(b"\r\n", 1)[0]


def headers_of(req: bytes) -> dict[bytes, bytes]:
    head = req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in head)}


async def test_a_healthy_engine_is_asked_without_the_key_on_one_kept_connection() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            seen.append(req)
            writer.write(answer("200 OK", b'{"status":"ok"}'))
            await writer.drain()

    async with serve(handler) as (state, url):
        engine = engine_at(url)
        try:
            assert [await engine.health() for _ in range(3)] == [True, True, True]
        finally:
            await engine.aclose()
    assert [request_line(r) for r in seen] == [b"GET /health HTTP/1.1"] * 3
    assert all(b"authorization" not in headers_of(r) for r in seen)  # a liveness probe: no secret
    assert all(headers_of(r)[b"content-length"] == b"0" for r in seen)
    assert state.connections == 1  # the pool's kept connection, not one per check


async def test_no_health_endpoint_falls_back_to_the_model_list_with_the_key() -> None:
    seen: list[bytes] = []
    models_status = ["200 OK"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            seen.append(req)
            if request_line(req).startswith(b"GET /health "):
                writer.write(answer("404 Not Found", b"no such route"))
            else:
                writer.write(answer(models_status[0], b'{"data":[]}'))
            await writer.drain()

    async with serve(handler) as (_, url):
        engine = engine_at(url)
        try:
            assert await engine.health() is True
            models_status[0] = "401 Unauthorized"
            assert await engine.health() is False
        finally:
            await engine.aclose()
    assert [request_line(r) for r in seen] == [b"GET /health HTTP/1.1", b"GET /v1/models HTTP/1.1"] * 2
    assert headers_of(seen[1])[b"authorization"] == b"Bearer sk-engine"


async def test_a_redirect_is_not_followed_and_is_not_health() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            seen.append(req)
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with serve(handler) as (_, url):
        engine = engine_at(url)
        try:
            assert await engine.health() is False
        finally:
            await engine.aclose()
    assert [request_line(r) for r in seen] == [b"GET /health HTTP/1.1", b"GET /v1/models HTTP/1.1"]


async def test_a_stalled_probe_is_unhealthy_by_the_connect_timeout_and_its_connection_dropped() -> None:
    """An engine that takes the check and never answers: unhealthy after connect_timeout,
    and the connection (whose late answer would be the next request's) is closed."""
    stalls = [True]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            if stalls[0]:
                await asyncio.sleep(3)
                writer.write(answer("200 OK", b'{"late":true}'))
            else:
                writer.write(answer("200 OK", b'{"count":7}' if b"/tokenize" in req else b"{}"))
            await writer.drain()

    async with serve(handler) as (state, url):
        engine = engine_at(url)
        try:
            started = time.monotonic()
            assert await engine.health() is False
            assert 0.4 < time.monotonic() - started < 2.0  # the connect timeout (0.5 s) bounds it
            stalls[0] = False
            assert await engine.count_tokens(prompt(), prompt_request()) == 7
            assert state.connections == 2  # the stalled one was not handed to the count
        finally:
            await engine.aclose()


async def test_an_unreachable_engine_is_unhealthy_and_has_no_count() -> None:
    engine = engine_at("http://127.0.0.1:9/v1/chat/completions")
    try:
        assert await engine.health() is False
        assert await engine.count_tokens(prompt(), prompt_request()) is None
    finally:
        await engine.aclose()


def prompt() -> tuple[Message, ...]:
    return (Message("user", (TextPart("count me"),)),)


def prompt_request() -> CanonicalRequest:
    return CanonicalRequest(model="m", messages=prompt(), stream=False)


async def test_the_token_count_is_a_keyed_post_and_anything_but_an_integer_is_no_count() -> None:
    seen: list[bytes] = []
    replies = [answer("200 OK", b'{"count":42}'), answer("200 OK", b'{"count":"42"}'),
               answer("200 OK", b'{"count":true}'), answer("200 OK", b"[1,2]"), answer("200 OK", b"not json"),
               answer("500 Internal Server Error", b'{"count":1}')]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            seen.append(req)
            writer.write(replies[len(seen) - 1])
            await writer.drain()

    async with serve(handler) as (state, url):
        engine = engine_at(url)
        try:
            counts = [await engine.count_tokens(prompt(), prompt_request()) for _ in replies]
        finally:
            await engine.aclose()
    assert counts == [42, None, None, None, None, None]
    assert request_line(seen[0]) == b"POST /tokenize HTTP/1.1"
    assert headers_of(seen[0])[b"authorization"] == b"Bearer sk-engine"
    body = orjson.loads(seen[0].split(b"\r\n\r\n", 1)[1])
    assert body["model"] == "m" and body["messages"][0]["content"] == "count me"
    assert state.connections == 1  # every answer was read to its end: the connection was kept


async def test_a_cancelled_probe_leaves_no_connection_behind() -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            arrived.set()
            await asyncio.sleep(5)

    async with serve(handler) as (state, url):
        engine = engine_at(url, connect_timeout=10.0)
        try:
            probe = asyncio.ensure_future(engine.health())
            await asyncio.wait_for(arrived.wait(), 2)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            for _ in range(100):  # the server sees the close
                if state.disconnects or not engine._chat or not engine._chat._open:
                    break
                await asyncio.sleep(0.01)
            assert engine._chat is not None and not engine._chat._open and not engine._chat._idle
        finally:
            await engine.aclose()


async def test_a_closed_engine_is_unhealthy_and_opens_no_connection_again() -> None:
    """A probe that starts after aclose() (a replica removed while the monitor's round was
    under way) must not reopen the pool: its kept connection would outlive the replica."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(answer("200 OK", b'{"count":3}'))
            await writer.drain()

    async with serve(handler) as (state, url):
        engine = engine_at(url)
        assert await engine.health() is True
        await engine.aclose()
        assert await engine.health() is False
        assert await engine.count_tokens(prompt(), prompt_request()) is None
        assert engine._chat is None and state.connections == 1
