"""A routed request still waiting for a replica slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.canonical import Event
from mesh.errors import MeshError
from mesh.routing.router import RoutedStream


class PendingStream:
    """A stream still waiting for a replica slot: iterating it waits, then relays.

    ``task`` is the route's task, or the future a request's own task resolves when the
    route it runs ends (``api/inference.py``: a stream that started its response early)."""

    def __init__(self, task: asyncio.Future[RoutedStream]) -> None:
        self.task = task

    async def routed_within(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for the route to end (routed or failed); whether it did.
        ``asyncio.wait({task}, timeout=...)`` without its sets and second callback."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        self.task.add_done_callback(wake)
        timer = loop.call_later(seconds, wake)
        try:
            await woken
        finally:
            timer.cancel()
            self.task.remove_done_callback(wake)
        return self.task.done()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        stream = await self.task
        async for ev in stream:
            yield ev

    async def aclose(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MeshError):
                await self.task
        elif not self.task.cancelled() and self.task.exception() is None:
            await self.task.result().aclose()
