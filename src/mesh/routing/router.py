"""Routing: pick a replica, open its stream, fail over while nothing has reached the client.

:meth:`Router.open` returns a :class:`RoutedStream` only once the engine produced its
first event, so every failure before that point (connection refused, 5xx, overload,
first-token timeout) can still be retried elsewhere. After it, failures belong to the
caller (the protocol encoder ends the stream with its error event).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from mesh.canonical import CanonicalRequest, Event
from mesh.config import ModelConfig
from mesh.errors import EngineError, EngineUnavailable
from mesh.routing.replica import Replica

log = logging.getLogger("mesh.routing")

DEFAULT_MAX_ATTEMPTS = 3


class LeastOutstanding:
    """Fewest requests in flight relative to capacity; ties go round-robin."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._tick = itertools.count()

    def pick(self, candidates: Sequence[Replica], request: CanonicalRequest) -> Replica:
        start = next(self._tick) % len(candidates)
        rotated = list(candidates[start:]) + list(candidates[:start])
        return min(rotated, key=lambda r: (r.load, r.in_flight))


@dataclass(eq=False)
class ModelPool:
    model: ModelConfig
    replicas: list[Replica]


class RoutedStream:
    """The event stream of one replica, primed with its first event.

    Iterate it once; :meth:`aclose` (idempotent) closes the engine stream, which cancels
    the upstream request if it is still running, and frees the replica slot.
    """

    def __init__(self, replica: Replica, events: AsyncIterator[Event], first: Event) -> None:
        self.replica = replica
        self._events = events
        self._first: Event | None = first
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            async for ev in self._events:
                yield ev
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.replica.in_flight -= 1
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


class Router:
    def __init__(self, pools: dict[str, ModelPool], max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        self.pools = pools
        self.policy = LeastOutstanding()
        self.max_attempts = max_attempts

    async def open(self, request: CanonicalRequest) -> RoutedStream:
        """Start ``request`` on a replica of its model. Raises EngineError when none can serve."""
        pool = self.pools[request.model]
        tried: set[int] = set()
        last: EngineError | None = None
        for _ in range(self.max_attempts):
            candidates = [r for r in pool.replicas if r.healthy and id(r) not in tried]
            if not candidates:
                break
            replica = self.policy.pick(candidates, request)
            tried.add(id(replica))
            replica.in_flight += 1
            events = aiter(replica.engine.stream(request))
            try:
                first = await anext(events)
            except EngineError as err:
                replica.in_flight -= 1
                replica.failures += 1
                await _close(events)
                log.warning("replica %s failed before the first token: %s", replica.name, err.message)
                if not err.retryable:
                    raise
                last = err
                continue
            except StopAsyncIteration:
                replica.in_flight -= 1
                last = EngineError(f"Engine {replica.name} ended the stream without output.")
                continue
            except BaseException:
                replica.in_flight -= 1
                await _close(events)
                raise
            replica.served += 1
            return RoutedStream(replica, events, first)
        if last is not None:
            raise last
        raise EngineUnavailable(f"No healthy replica can serve model {request.model!r} right now.", retry_after=1)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            for r in pool.replicas:
                await r.engine.aclose()


async def _close(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
