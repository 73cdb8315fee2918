"""A circuit breaker per replica: closed -> open after repeated failures -> half-open -> closed.

Closed: traffic flows; ``failure_threshold`` consecutive failures open it. Open: no
traffic for ``cooldown`` seconds. Half-open: one probe (a real request or an active
health check) at a time; success closes the breaker, failure re-opens it.

Whoever takes the probe (``acquire`` in half-open state) resolves it on every exit: with
``record_success``/``record_alive``, ``record_failure``, or ``release`` when the request
ended for a reason that says nothing about the replica (a cancellation, an error of the
gateway's own). Otherwise the breaker would stay half-open with its probe taken forever.

Real traffic outranks probes: only a request that ran to its end (``record_success``)
clears the failures counted in closed state; a first token does not, and a passing health
check (``record_probe_passed``) takes back only what health checks counted, so a replica
whose streams stall after their first token still reaches the threshold.
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
        "_clock", "_on_transition", "_opened_at", "_probe_failures", "_probing", "cooldown", "failure_threshold",
        "failures", "state",
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
        self._probe_failures = 0  # of ``failures``, those only health checks saw
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

    @property
    def probing(self) -> bool:
        """Whether the half-open probe is taken (by a request or a health check)."""
        return self.state is BreakerState.HALF_OPEN and self._probing

    def record_success(self) -> None:
        self._set(BreakerState.CLOSED)
        self.failures = 0
        self._probe_failures = 0
        self._probing = False

    def record_probe_passed(self) -> None:
        """A health check passed: it takes back the failures health checks counted, never
        those of real requests."""
        self.failures -= self._probe_failures
        self._probe_failures = 0

    def record_alive(self) -> None:
        """The replica answered (a first token, or a refusal of its own): a half-open probe
        succeeded and closes the breaker; in closed state the failure count stays, for only
        a finished request proves the replica serves."""
        if self.state is BreakerState.HALF_OPEN:
            self.record_success()

    def release(self) -> None:
        """Give back a half-open probe with no verdict, so the next request or health check
        may take it. A no-op in any other state."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False

    def record_failure(self, *, probe: bool = False) -> None:
        """One failure; ``probe``: seen by a health check, not by a real request."""
        self._tick()
        self.failures += 1
        if probe:
            self._probe_failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._set(BreakerState.OPEN)
            self._opened_at = self._clock()
            self._probing = False
