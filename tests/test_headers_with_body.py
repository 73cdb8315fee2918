"""The response cycle's transport: headers leave with the body in one write, never later
than the end of the event-loop turn, and never after the connection is closed."""

from __future__ import annotations

import asyncio
from typing import Any

from mesh.http.server import _HeadersWithBody


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def wrap(t: Recorder) -> _HeadersWithBody:
    return _HeadersWithBody(t, asyncio.get_running_loop())  # type: ignore[arg-type]


async def test_headers_and_body_go_out_in_one_write() -> None:
    t = Recorder()
    w = wrap(t)
    w.write(b"HTTP/1.1 200 OK\r\n\r\n")
    w.write(b"body")
    w.write(b"more")
    await asyncio.sleep(0)
    assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


async def test_headers_alone_leave_at_the_end_of_the_turn() -> None:
    # A stream's headers do not wait for its first event.
    t = Recorder()
    w = wrap(t)
    w.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert t.writes == []
    await asyncio.sleep(0)
    assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    w.write(b"data: 1\n\n")
    assert t.writes[-1] == b"data: 1\n\n"


async def test_close_sends_what_is_held_first_and_nothing_after() -> None:
    t = Recorder()
    w = wrap(t)
    w.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    w.close()
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert t.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and t.closed
    assert w.is_closing() and w.get_extra_info("peername") == ("127.0.0.1", 1)
