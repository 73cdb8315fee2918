"""A pure-ASGI streaming response that races the body against the client's disconnect.

When the client goes away, the body iterator is cancelled and closed at once, so the
engine request behind it is cancelled too (Starlette's habit, without its task group).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.types import Message, Receive, Scope, Send

SSE_COMMENT = b": keep-alive\n\n"
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


class StreamResponse:
    """``on_close`` runs once the body is done or abandoned, whatever happened (the client
    hung up before the body's first chunk included): the owner of the request's resources
    releases them there, since a generator that never started runs no ``finally``.

    ``waiting`` (a request still queued for a replica slot) gets an SSE comment every
    ``keepalive`` seconds until it is done, before the body's first chunk; the body itself
    then flows with no wrapper around it."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str],
        status: int = 200,
        on_close: Callable[[], Awaitable[None]] | None = None,
        *,
        waiting: asyncio.Future[Any] | None = None,
        keepalive: float = 5.0,
    ) -> None:
        self.body = body
        self.status = status
        self.headers: dict[str, str] = {**SSE_HEADERS, **headers}
        self.on_close = on_close
        self.waiting = waiting
        self.keepalive = keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            try:
                aclose = getattr(self.body, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_close is not None:
                    await self.on_close()

    async def _pump(self, send: Send) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        waiting = self.waiting
        if waiting is not None:
            while not waiting.done():
                done, _ = await asyncio.wait({waiting}, timeout=self.keepalive)
                if not done:
                    await send({"type": "http.response.body", "body": SSE_COMMENT, "more_body": True})
        async for chunk in self.body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
