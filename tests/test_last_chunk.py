"""A stream's last chunk (``LastChunk``: the protocol's closing event) leaves with the
response's end in one write, where the body's last bytes, an empty end and the chunked
terminator took two or three; a body that yields after it fails loudly, and what the
response held still comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from mesh.http.server import _HeadersWithBody, _MeshCycle
from mesh.http.streaming import ON_DISCONNECT, LastChunk, StreamResponse
from support.cycle import Recorder, response_cycle


def cycle() -> tuple[_MeshCycle, Recorder, list[str]]:
    t = Recorder()
    completed: list[str] = []
    c = response_cycle(_MeshCycle, _HeadersWithBody(t, asyncio.get_running_loop()),  # type: ignore[arg-type]
                       on_response=lambda: completed.append("done"))
    return c, t, completed


async def serve(body: AsyncIterator[bytes], closed: list[str] | None = None) -> tuple[Recorder, list[str], list[str]]:
    c, t, completed = cycle()
    closed = [] if closed is None else closed

    async def on_close() -> None:
        closed.append("closed")

    response = StreamResponse(body, {}, on_close=on_close)
    scope: dict[str, Any] = {"type": "http", ON_DISCONNECT: lambda callback: True}

    async def receive() -> dict[str, Any]:
        raise AssertionError("not read under Mesh's server")

    await response(scope, receive, c.send)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # anything the transport still held
    return t, completed, closed


async def test_the_last_chunk_goes_out_with_the_terminator_in_one_write() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await asyncio.sleep(0)  # the next chunk in a later turn, as an engine's next read
        yield b"data: 2\n\n"
        yield LastChunk(b"data: [DONE]\n\n")

    t, completed, closed = await serve(body())
    assert len(t.writes) == 3, t.writes  # head + first chunk, second chunk, last chunk + end
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and t.writes[0].endswith(b"9\r\ndata: 1\n\n\r\n")
    assert t.writes[1] == b"9\r\ndata: 2\n\n\r\n"
    assert t.writes[2] == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    assert completed == ["done"] and closed == ["closed"]


async def test_without_a_last_chunk_the_end_is_a_write_of_its_own() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"

    t, completed, closed = await serve(body())
    assert t.writes[1:] == [b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"]
    assert completed == ["done"] and closed == ["closed"]


async def test_a_body_that_goes_on_after_its_last_chunk_fails_and_still_closes() -> None:
    finished: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            yield LastChunk(b"data: [DONE]\n\n")
            yield b"data: late\n\n"
        finally:
            finished.append("body closed")

    closed: list[str] = []
    with pytest.raises(RuntimeError):
        await serve(body(), closed)
    assert finished == ["body closed"] and closed == ["closed"]


async def test_the_generator_runs_to_its_end_after_its_last_chunk() -> None:
    # What a body does after its last yield (its epilogue) is not cut short by the end
    # having gone out already.
    after: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield LastChunk(b"data: [DONE]\n\n")
        await asyncio.sleep(0)
        after.append("epilogue")

    t, completed, closed = await serve(body())
    assert after == ["epilogue"] and closed == ["closed"] and completed == ["done"]
    assert t.writes[-1].endswith(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")


async def test_under_another_server_the_generator_still_runs_to_its_end_after_its_last_chunk() -> None:
    # Under an ASGI server other than Mesh's (``StreamResponse._watched``), uvicorn's own
    # cycle: once the response is complete, ``receive()`` answers ``http.disconnect`` at
    # once. That end is the body's own, not a hang-up: its epilogue is not cancelled.
    t = Recorder()
    c = response_cycle(RequestResponseCycle, t)
    after: list[str] = []
    closed: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield LastChunk(b"data: [DONE]\n\n")
        await asyncio.sleep(0.01)
        after.append("epilogue")

    async def on_close() -> None:
        closed.append("closed")

    response = StreamResponse(body(), {}, on_close=on_close)
    await response({"type": "http"}, c.receive, c.send)  # type: ignore[arg-type]
    assert after == ["epilogue"] and closed == ["closed"]
    assert t.writes[-1].endswith(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("early", [False, True], ids=["called", "start-early"])
async def test_no_idle_ping_is_tried_after_the_last_chunk(early: bool) -> None:
    # The response's end went out with the last chunk: the idle timer has nothing left to
    # send while the body's generator runs to its end (start_early: the early task sent it).
    after_end: list[dict[str, Any]] = []
    ended = False

    async def send(message: dict[str, Any]) -> None:
        nonlocal ended
        if ended:
            after_end.append(message)
            raise RuntimeError("sent after the response's end")
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended = True

    async def body() -> AsyncIterator[bytes]:
        if not early:
            yield b"event: message_start\ndata: {}\n\n"
        yield LastChunk(b"event: message_stop\ndata: {}\n\n")
        await asyncio.sleep(0.1)  # several idle ticks

    response = StreamResponse(body(), {}, idle_ping=b"event: ping\ndata: {}\n\n", keepalive=0.01)
    if early:
        response.start_early(send)  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the early task sends the head and the body's first (and last) chunk
    await response({"type": "http", ON_DISCONNECT: lambda callback: True}, None, send)  # type: ignore[arg-type]
    assert ended and after_end == []


async def test_under_another_server_a_hang_up_while_the_last_chunk_waits_in_send_still_closes() -> None:
    # A client that stops reading (``send`` blocks, as on a full socket) and hangs up while
    # the last chunk is being sent: the end never went out, so the hang-up cancels the pump.
    gone = asyncio.Event()
    closed: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            gone.set()
            await asyncio.Event().wait()  # cancelled by the response when it sees the hang-up

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield LastChunk(b"data: [DONE]\n\n")

    async def on_close() -> None:
        closed.append("closed")

    response = StreamResponse(body(), {}, on_close=on_close)
    await asyncio.wait_for(response({"type": "http"}, receive, send), 2)  # type: ignore[arg-type]
    assert closed == ["closed"]
