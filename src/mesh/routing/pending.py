"""A routed request still waiting for a replica slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.canonical import Event
from mesh.errors import MeshError
from mesh.routing.router import RoutedStream


class PendingStream:
    """A stream still waiting for a replica slot: iterating it waits, then relays."""

    def __init__(self, task: asyncio.Task[RoutedStream]) -> None:
        self.task = task

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
