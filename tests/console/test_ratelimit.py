"""The sign-in throttle's sliding window."""

from __future__ import annotations

from mesh.console.ratelimit import AttemptLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_locks_after_limit_failures_and_unlocks_as_they_age() -> None:
    clock = Clock()
    limiter = AttemptLimiter(3, window=60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.fail("a")
        clock.now += 10
    assert limiter.retry_after("a") == 30  # the first failure ages out at t=1060
    assert limiter.retry_after("b") == 0
    clock.now += 30
    assert limiter.retry_after("a") == 0


def test_reset_forgets_failures() -> None:
    limiter = AttemptLimiter(1, clock=Clock())
    limiter.fail("a")
    assert limiter.retry_after("a") > 0
    limiter.reset("a")
    assert limiter.retry_after("a") == 0
