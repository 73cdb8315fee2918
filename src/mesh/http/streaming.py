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
# The scope key under which Mesh's HTTP server (``http/server.py``) offers to call back when
# the client hangs up: ``scope[ON_DISCONNECT](callback)`` (False: gone already), ``None`` to
# stop being called.
ON_DISCONNECT = "mesh.on_disconnect"
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
    then flows with no wrapper around it. With ``idle_ping`` instead (Anthropic's ``ping``
    event), that event goes out whenever nothing was sent for a ``keepalive`` tick, queued
    or mid-stream (an idle gap gets its first ping after one to two ticks): a timer that
    only acts when idle, so a flowing body pays nothing per chunk for it."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str],
        status: int = 200,
        on_close: Callable[[], Awaitable[None]] | None = None,
        *,
        waiting: asyncio.Future[Any] | None = None,
        keepalive: float = 5.0,
        idle_ping: bytes | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers: dict[str, str] = {**SSE_HEADERS, **headers}
        self.on_close = on_close
        self.waiting = waiting
        self.keepalive = keepalive
        self.idle_ping = idle_ping
        self._sent = False  # something went out since the last idle tick

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        on_disconnect = scope.get(ON_DISCONNECT)
        if on_disconnect is None:
            await self._watched(receive, send)
        else:
            await self._told(on_disconnect, send)

    async def _told(self, on_disconnect: Callable[[Callable[[], None] | None], bool], send: Send) -> None:
        """Under Mesh's server (``http/server.py``), which says when the client goes away:
        the body is pumped in this task, and a disconnect cancels it (no pump task, no task
        waiting on ``receive``, two per stream)."""
        task = asyncio.current_task()
        assert task is not None
        gone = False

        def hung_up() -> None:
            nonlocal gone
            if not gone:
                gone = True
                task.cancel()

        failure: Exception | None = None
        cancelled = False
        try:
            if on_disconnect(hung_up):  # else the client left while the request was routed: nothing to send
                await self._pump(send)
        except asyncio.CancelledError:
            cancelled = not gone  # not the hang-up's (the server stopping): it goes on after the clean-up
        except OSError:
            pass
        except Exception as exc:  # a bug in the body: still close it and give back what it held
            failure = exc
        finally:
            on_disconnect(None)  # from here a hang-up cancels nothing: the clean-up runs whole
        if gone and task.uncancel() > 0:
            cancelled = True  # cancelled by someone else as well
        await self._close(failure)
        if cancelled:
            raise asyncio.CancelledError

    async def _watched(self, receive: Receive, send: Send) -> None:
        """Under any other ASGI server: the body in a task of its own, raced against a task
        waiting for ``http.disconnect``."""
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                if not task.done():
                    task.cancel()
            failure: Exception | None = None
            try:
                await pump
            except (asyncio.CancelledError, OSError):
                pass
            except Exception as exc:  # a bug in the body: still close it and give back what it held
                failure = exc
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await self._close(failure)

    async def _close(self, failure: Exception | None) -> None:
        """Close the body and run ``on_close``, whatever happened; then raise ``failure``."""
        try:
            try:
                aclose = getattr(self.body, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_close is not None:
                    await self.on_close()
        finally:
            if failure is not None:
                raise failure  # the first failure is the one to see (a later one is its context)

    async def _pump(self, send: Send) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        waiting = self.waiting
        if waiting is not None:
            while not waiting.done():
                done, _ = await asyncio.wait({waiting}, timeout=self.keepalive)
                if not done:
                    await send({"type": "http.response.body", "body": SSE_COMMENT, "more_body": True})
        if self.idle_ping is None:
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            await self._pump_with_pings(send, self.idle_ping)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump_with_pings(self, send: Send, ping: bytes) -> None:
        loop = asyncio.get_running_loop()
        message = {"type": "http.response.body", "body": ping, "more_body": True}
        pinging: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle

        async def send_ping() -> None:
            await send(message)

        def tick() -> None:
            nonlocal timer, pinging
            if not self._sent and (pinging is None or pinging.done()):
                # Idle for a whole tick. A ping between two whole events is always valid;
                # behind a client that reads slowly it queues after the pending chunk.
                pinging = loop.create_task(send_ping())
                pinging.add_done_callback(_retrieve)
            self._sent = False
            timer = loop.call_later(self.keepalive, tick)

        timer = loop.call_later(self.keepalive, tick)
        try:
            async for chunk in self.body:
                self._sent = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            timer.cancel()
            if pinging is not None and not pinging.done():
                pinging.cancel()  # never after the body's end


def _retrieve(task: asyncio.Task[None]) -> None:
    """A ping to a client already gone fails quietly (the pump sees the disconnect)."""
    if not task.cancelled():
        task.exception()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
