"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

from mesh.routing.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_recovers_through_half_open() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, cooldown=5, clock=clock)
    assert b.acquire() and b.available
    b.record_failure()
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.available and not b.acquire()
    clock.now += 4.9
    assert not b.available
    clock.now += 0.2
    assert b.available and b.state is BreakerState.HALF_OPEN
    assert b.acquire()  # the one probe
    assert not b.acquire() and not b.available  # a second request waits for the probe
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.failures == 0 and b.acquire()


def test_breaker_half_open_failure_reopens_for_a_new_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown=2, clock=clock)
    b.record_failure()
    clock.now += 2
    assert b.acquire()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now += 1.9
    assert not b.available
    clock.now += 0.1
    assert b.available


def test_breaker_success_resets_consecutive_failures() -> None:
    b = CircuitBreaker(failure_threshold=3)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_a_passing_health_check_clears_only_the_failures_health_checks_counted() -> None:
    b = CircuitBreaker(failure_threshold=3)
    b.record_failure()  # a real request timed out
    b.record_failure(probe=True)  # one health check failed
    b.record_probe_passed()  # the next one passed
    assert b.failures == 1
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.OPEN  # three real failures, whatever the probes said
