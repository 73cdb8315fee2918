"""A circuit breaker per replica: closed -> open after repeated failures -> half-open -> closed.

Closed: traffic flows; ``failure_threshold`` consecutive failures open it. Open: no
traffic for ``cooldown`` seconds. Half-open: one probe (a real request or an active
health check) at a time; success closes the breaker, failure re-opens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

DEFAULT_FAILURE_THRESHOLD = 3
DEFAULT_COOLDOWN = 5.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    __slots__ = (
        "_clock", "_on_transition", "_opened_at", "_probing", "cooldown", "failure_threshold", "failures", "state",
    )

    def __init__(
        self,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._on_transition = on_transition  # (old, new): metrics and a log line per change
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if old is not state and self._on_transition is not None:
            self._on_transition(old, state)

    def _tick(self) -> None:
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self._set(BreakerState.HALF_OPEN)
            self._probing = False

    @property
    def available(self) -> bool:
        """Whether a request may be sent now (without taking the half-open probe slot)."""
        self._tick()
        return self.state is BreakerState.CLOSED or (self.state is BreakerState.HALF_OPEN and not self._probing)

    def acquire(self) -> bool:
        """Take permission for one request; in half-open state only one probe at a time."""
        self._tick()
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._set(BreakerState.CLOSED)
        self.failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self._tick()
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._set(BreakerState.OPEN)
            self._opened_at = self._clock()
            self._probing = False
