"""uvicorn's response cycle (or Mesh's) over a transport that records what is written, for
tests of how a response's bytes leave: no socket, no server, every write kept in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

C = TypeVar("C", bound=RequestResponseCycle)


class Recorder:
    """A transport that keeps each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Flow:
    """The protocol's flow control, never paused."""

    write_paused = False

    def resume_reading(self) -> None:
        pass


def response_cycle(
    cls: type[C], transport: Any, *, method: str = "POST", keep_alive: bool = True,
    default_headers: list[tuple[bytes, bytes]] | None = None, on_response: Callable[[], None] = lambda: None,
) -> C:
    """A ``cls`` (uvicorn's cycle or ``_MeshCycle``) for one request, writing to ``transport``."""
    return cls(
        scope={"type": "http", "method": method},  # type: ignore[typeddict-item]
        transport=transport, flow=Flow(), logger=None, access_logger=None, access_log=False,  # type: ignore[arg-type]
        default_headers=default_headers or [], message_event=asyncio.Event(), expect_100_continue=False,
        keep_alive=keep_alive, on_response=on_response,
    )
