"""Mesh's response cycle writes the status line and headers byte for byte as uvicorn's
does, keeps the same response state, and refuses the same bad names and values."""

from __future__ import annotations

from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from mesh.http.server import _MeshCycle
from support.cycle import Recorder, response_cycle


def _cycle(cls: type[RequestResponseCycle], method: str, keep_alive: bool) -> tuple[RequestResponseCycle, Recorder]:
    t = Recorder()
    cycle = response_cycle(cls, t, method=method, keep_alive=keep_alive,
                           default_headers=[(b"date", b"Mon, 07 Dec 2026 09:00:00 GMT")])
    return cycle, t


HEADER_SETS: list[tuple[int, list[tuple[bytes, bytes]], str, bool]] = [
    (200, [(b"content-length", b"4"), (b"content-type", b"application/json"), (b"x-request-id", b"req_1")],
     "POST", True),
    (200, [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")], "POST", True),
    (200, [(b"transfer-encoding", b"Chunked")], "POST", True),
    (429, [(b"content-length", b"4"), (b"connection", b"keep-alive, Close"), (b"retry-after", b"1")],
     "POST", True),
    (204, [], "DELETE", True),
    (200, [(b"content-length", b"4")], "HEAD", False),
    (503, [(b"content-length", b"4"), (b"x-a", b"value with\ttab")], "GET", False),
]


@pytest.mark.parametrize(("status", "headers", "method", "keep_alive"), HEADER_SETS)
async def test_the_head_and_state_are_uvicorns(
    status: int, headers: list[tuple[bytes, bytes]], method: str, keep_alive: bool
) -> None:
    seen: list[tuple[list[bytes], dict[str, Any]]] = []
    for cls in (RequestResponseCycle, _MeshCycle):
        cycle, t = _cycle(cls, method, keep_alive)
        await cycle.send({"type": "http.response.start", "status": status, "headers": list(headers)})
        state = {k: getattr(cycle, k) for k in ("keep_alive", "chunked_encoding", "expected_content_length",
                                                "response_started", "waiting_for_100_continue")}
        seen.append((t.writes, state))
    assert seen[0] == seen[1]
    assert seen[1][0], "nothing was written"


@pytest.mark.parametrize("header", [
    (b"x-bad\r\nset-cookie", b"1"),  # a name that would split the head
    (b"x-ok", b"v\r\nset-cookie: a=b"),  # a value that would
    (b"x-ok", b"nul\x00"),
    (b"bad name", b"1"),
])
async def test_a_header_that_could_split_the_head_is_refused(header: tuple[bytes, bytes]) -> None:
    for cls in (RequestResponseCycle, _MeshCycle):
        cycle, t = _cycle(cls, "POST", True)
        with pytest.raises(RuntimeError, match="Invalid HTTP header"):
            await cycle.send({"type": "http.response.start", "status": 200,
                              "headers": [(b"content-length", b"0"), header]})
        assert t.writes == []


async def test_the_body_goes_out_as_uvicorn_sends_it() -> None:
    writes = []
    for cls in (RequestResponseCycle, _MeshCycle):
        cycle, t = _cycle(cls, "POST", True)
        await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
        await cycle.send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
        assert cycle.response_complete
        writes.append(t.writes)
    assert writes[0] == writes[1]
