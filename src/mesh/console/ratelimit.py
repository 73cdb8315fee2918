"""Sign-in throttling: failed attempts per email and per client address, in process.

A sliding window of one minute per key. Once a key has ``limit`` failures in the window,
it is throttled until the oldest failure ages out: an email's sign-ins are refused (even
with the right password); an address's wrong guesses are (its right passwords still sign
in, as many people may share one address; console/auth_routes.py).
In-process state is enough here: with N gateway replicas an attacker gets N times the
budget, which still turns an online guessing attack into a crawl.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

WINDOW = 60.0
MAX_KEYS = 100_000


class AttemptLimiter:
    def __init__(self, limit: int, window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def retry_after(self, key: str) -> int:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        now = self._clock()
        times = self._recent(key, now)
        if len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def fail(self, key: str) -> None:
        now = self._clock()
        if len(self._failures) >= MAX_KEYS:
            for k in list(self._failures):
                self._recent(k, now)
            if len(self._failures) >= MAX_KEYS:
                self._failures.clear()
        self._failures.setdefault(key, deque()).append(now)

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)
