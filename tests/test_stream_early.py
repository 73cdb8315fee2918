"""``StreamResponse.start_early`` (a stream queued past its patience, ``api/inference.py``)
when the body's first chunk is slow to come: the early task is then still inside the body
when the response is called, closed or hung up on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fakes import SlowSource
from mesh.http.streaming import ON_DISCONNECT, StreamResponse

PING = b"event: ping\ndata: {}\n\n"


class Client:
    """What went out, in order, and a hang-up as Mesh's server reports one."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.started = 0
        self.ended = False
        self.callback: Callable[[], None] | None = None
        self.gone = False

    async def send(self, message: dict[str, Any]) -> None:
        assert not self.ended, message
        if message["type"] == "http.response.start":
            self.started += 1
            return
        assert self.started == 1
        if message["body"]:
            self.sent.append(message["body"])
        if not message.get("more_body", False):
            self.ended = True

    def listen(self, callback: Callable[[], None] | None) -> bool:
        self.callback = None if self.gone else callback
        return not self.gone

    def hang_up(self) -> None:
        self.gone = True
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()

    @property
    def scope(self) -> dict[str, Any]:
        return {ON_DISCONNECT: self.listen}


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


def _response(source: SlowSource, closed: list[bool]) -> StreamResponse:
    async def on_close() -> None:
        closed.append(True)

    return StreamResponse(source.run(), {}, on_close=on_close, idle_ping=PING, keepalive=0.02)


async def test_called_while_its_early_task_waits_for_a_slow_first_chunk() -> None:
    source, closed, client = SlowSource([0.2, 0, 0.05]), [], Client()
    response = _response(source, closed)
    response.start_early(client.send)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert client.started == 1 and b"chunk0" not in client.sent  # the head, and the first chunk not yet
    await response(client.scope, _never, client.send)  # type: ignore[arg-type]
    body = [chunk for chunk in client.sent if chunk != PING]
    assert body == [b"chunk0", b"chunk1", b"chunk2"]  # each once, in order
    assert client.sent[-1] == b"chunk2" and client.ended
    await asyncio.sleep(0.1)
    assert client.sent[-1] == b"chunk2"  # no ping after the end
    assert closed == [True] and source.closed and not source.cancelled


async def test_a_hang_up_while_its_early_task_waits_for_the_first_chunk_closes_everything() -> None:
    source, closed, client = SlowSource([10, 0]), [], Client()
    response = _response(source, closed)
    response.start_early(client.send)  # type: ignore[arg-type]
    called = asyncio.ensure_future(response(client.scope, _never, client.send))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    client.hang_up()
    await asyncio.wait_for(called, 2)  # ends, not raised: the hang-up's own cancellation
    count = len(client.sent)
    await asyncio.sleep(0.1)
    assert len(client.sent) == count and set(client.sent) <= {PING}  # no ping once closed
    assert closed == [True] and source.cancelled and source.closed


async def test_closed_uncalled_while_its_early_task_waits_for_the_first_chunk() -> None:
    source, closed, client = SlowSource([10, 0]), [], Client()
    response = _response(source, closed)
    response.start_early(client.send)  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    await asyncio.wait_for(response.aclose(), 2)  # the route failed under a cancellation (api/inference.py)
    count = len(client.sent)
    await asyncio.sleep(0.1)
    assert len(client.sent) == count and set(client.sent) <= {PING}
    assert closed == [True] and source.cancelled and source.closed
