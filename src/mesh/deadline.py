"""The request's deadline over a whole stream, with one timer."""

from __future__ import annotations

import asyncio


class StreamDeadline:
    """The request's deadline over a whole stream with one timer instead of an
    ``asyncio.timeout`` per event (which costs more than relaying the event). When it fires
    while the stream's task waits for the engine, it cancels that wait, as a timeout would;
    at any other moment (the client reading slowly) it only marks the stream expired, and
    the stream ends with the deadline error before its next wait."""

    __slots__ = ("_cancelling", "_fired", "_handle", "_task", "expired", "waiting")

    def __init__(self, when: float | None) -> None:
        self.expired = False
        self.waiting = False  # the task is awaiting the engine's next event
        self._fired = False  # the task was cancelled by this deadline
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling() if self._task is not None else 0
        self._handle = None if when is None else asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self.waiting and self._task is not None:
            self._fired = True
            self._task.cancel()

    def cancelled_us(self) -> bool:
        """Whether a CancelledError just caught is this deadline's (and only its): then the
        cancellation is taken back, as ``asyncio.timeout`` does, and the caller raises."""
        return self._fired and self._task is not None and self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
