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


class LastChunk(bytes):
    """A body's last chunk (the protocol's closing event, ``[DONE]`` and what comes just
    before it): it goes out with the response's end, one write and one packet instead of
    two or three. The body yields nothing after it; its generator still runs to its end."""

    __slots__ = ()


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
    only acts when idle, so a flowing body pays nothing per chunk for it.

    :meth:`start_early` sends the head (and the keep-alives, or the body's first chunk and
    the pings) from a task of its own while the request's task is still busy routing;
    calling the response then goes on where that task is, once it is done."""

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
        self._early: asyncio.Task[None] | None = None  # start_early's task: the head went out there
        self._timer: asyncio.TimerHandle | None = None  # the idle pings' next tick
        self._pinging: asyncio.Task[None] | None = None
        self._ended = False  # the response's end went out (with a LastChunk)

    def start_early(self, send: Send) -> None:
        """Start the response now, from a task of its own, while the request's task is busy
        (still routing): the head, then keep-alives until ``waiting`` is done or, with
        ``idle_ping``, the body's first chunk (Anthropic's ``message_start``, which waits on
        no event) and the idle timer's pings. Calling the response later waits for that task
        before the body goes on (never two sends at once, no keep-alive after the body's
        first chunk); closing it cancels the task."""
        self._early = asyncio.get_running_loop().create_task(self._open_early(send))

    async def aclose(self) -> None:
        """Close a response that will never be called: its early task, pings, body and ``on_close``."""
        await self._close(None)

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
        complete = False

        async def sending(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True

        pump = asyncio.ensure_future(self._pump(sending))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            if complete and not pump.done():
                # The end went out with a LastChunk, and a complete response's ``receive()``
                # says ``http.disconnect`` (uvicorn): no hang-up, the body runs to its end.
                await asyncio.wait((pump,))
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
        self._stop_pings()
        early = self._early
        if early is not None:
            if not early.done():
                early.cancel()
                await asyncio.wait((early,))
            if not early.cancelled():
                early.exception()  # retrieved: a client gone while the head went out
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
        early = self._early
        if early is None:
            await send(self._start())
            if self.waiting is not None:
                await self._keep_alive(send, self.waiting)
        else:
            await early  # the head went out from there; it ends once ``waiting`` is done
        if self.idle_ping is None:
            async for chunk in self.body:
                await send(self._body_message(chunk))
        else:
            await self._pump_with_pings(send, self.idle_ping)
        if not self._ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _body_message(self, chunk: bytes) -> Message:
        if chunk.__class__ is LastChunk:
            self._ended = True
            self._stop_pings()  # nothing may follow the end, while the body runs to its end
            return {"type": "http.response.body", "body": chunk, "more_body": False}
        return {"type": "http.response.body", "body": chunk, "more_body": True}

    def _start(self) -> Message:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        return {"type": "http.response.start", "status": self.status, "headers": raw}

    async def _keep_alive(self, send: Send, waiting: asyncio.Future[Any]) -> None:
        """A keep-alive every ``keepalive`` seconds until ``waiting`` is done."""
        while not waiting.done():
            done, _ = await asyncio.wait({waiting}, timeout=self.keepalive)
            if not done:
                await send({"type": "http.response.body", "body": SSE_COMMENT, "more_body": True})

    async def _open_early(self, send: Send) -> None:
        await send(self._start())
        if self.waiting is not None:
            await self._keep_alive(send, self.waiting)
        ping = self.idle_ping
        if ping is not None:
            self._arm_pings(send, ping)
            try:
                chunk = await anext(self.body)
            except StopAsyncIteration:
                return
            self._sent = True
            await send(self._body_message(chunk))

    async def _pump_with_pings(self, send: Send, ping: bytes) -> None:
        if self._timer is None and not self._ended:  # else armed by start_early (or its chunk was the last)
            self._arm_pings(send, ping)
        try:
            async for chunk in self.body:
                self._sent = True
                await send(self._body_message(chunk))
        finally:
            self._stop_pings()  # never a ping after the body's end

    def _arm_pings(self, send: Send, ping: bytes) -> None:
        loop = asyncio.get_running_loop()
        message = {"type": "http.response.body", "body": ping, "more_body": True}

        async def send_ping() -> None:
            await send(message)

        def tick() -> None:
            pinging = self._pinging
            if not self._sent and (pinging is None or pinging.done()):
                # Idle for a whole tick. A ping between two whole events is always valid;
                # behind a client that reads slowly it queues after the pending chunk.
                self._pinging = pinging = loop.create_task(send_ping())
                pinging.add_done_callback(_retrieve)
            self._sent = False
            self._timer = loop.call_later(self.keepalive, tick)

        self._timer = loop.call_later(self.keepalive, tick)

    def _stop_pings(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        pinging, self._pinging = self._pinging, None
        if pinging is not None and not pinging.done():
            pinging.cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A ping to a client already gone fails quietly (the pump sees the disconnect)."""
    if not task.cancelled():
        task.exception()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
