"""The engine seam: an engine turns a canonical request into a stream of canonical events.

Engines work like httpx transports: one async method, :meth:`Engine.stream`, plus
:meth:`Engine.aclose`. Failures surface as :class:`mesh.errors.EngineError` subclasses,
translated at the adapter's edge. Closing the iterator early (client disconnect) must
cancel the upstream work at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from mesh.canonical import CanonicalRequest, Event, Message


@runtime_checkable
class Engine(Protocol):
    """One replica of one model."""

    name: str  # replica label: appears in usage records, metrics and logs

    def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        """Generate. Yields events; raises EngineError. Always ends with Finish and Usage."""
        ...

    async def health(self) -> bool:
        """A cheap liveness check (the engine's /health or /v1/models)."""
        ...

    async def count_tokens(self, messages: Sequence[Message], request: CanonicalRequest) -> int | None:
        """The prompt's token count with the model's own tokenizer, or None if unknown."""
        ...

    async def aclose(self) -> None: ...
