"""The limiter seam: one interface, two backends (in-process and Redis).

A request takes one :class:`Lease` at admission, covering every :class:`Scope` of its
principal at once (all or nothing), and gives it back when it settles::

    lease = await limiter.acquire(scopes, tokens=prompt_estimate)   # or RateLimited
    ...                                                              # the request runs
    await limiter.settle(lease, tokens=usage.input + usage.output)  # exactly once

The algorithm is the same in both backends. Requests and tokens per minute are token
buckets, as OpenAI's and Anthropic's limits are: a bucket of ``L`` per minute holds ``L``
units and drains continuously at ``L / 60`` per second, so a burst of a minute's worth
passes and then one more every ``60 / L`` seconds. A bucket's state is how much of it is
in use (``level``) as of a time (``at``); in units rather than time, so an operator who
raises a limit gives room at once. A request needs room for one unit in every request
bucket. A token bucket only has to be non-empty (``level <= L - 1``): the prompt estimate
is charged and may overdraw it, and settlement corrects the charge to the real usage.
Concurrency is a count of leases in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh.errors import RateLimited
from mesh.limits.policy import Scope

WINDOW = 60.0  # seconds: the "per minute" of rpm and tpm, and the size of every bucket
# A concurrency refusal cannot know when a slot frees up; this is the hint clients get.
CONCURRENCY_RETRY_AFTER = 1.0

DIMENSIONS = ("requests", "tokens", "concurrent")
_UNITS = {"requests": "requests per minute (RPM)", "tokens": "tokens per minute (TPM)",
          "concurrent": "concurrent requests"}


@dataclass(frozen=True, slots=True)
class Window:
    """One bucket as the response headers show it: ``reset`` is the seconds until it is
    full again (``remaining == limit``)."""

    limit: int
    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class LimitState:
    """The tightest request and token buckets among a request's scopes, measured at
    admission; ``at`` is the wall-clock time (epoch seconds) of the measurement."""

    requests: Window | None
    tokens: Window | None
    at: float


@dataclass(slots=True)
class Lease:
    """What one admitted request holds. ``tokens`` is what was charged at admission."""

    scopes: tuple[Scope, ...]
    tokens: int
    state: LimitState | None  # None: the limiter could not be asked (failed open)
    # Set by a limiter that names leases outside the process (Redis); the in-process one
    # needs none, and os.urandom per request was measurable.
    id: str = ""
    done: bool = False

    @property
    def concurrent(self) -> bool:
        """Whether the lease holds a concurrency slot somewhere (and must give it back)."""
        return any(s.limits.concurrent is not None for s in self.scopes)


@dataclass(frozen=True, slots=True)
class ScopeUsage:
    """How much of one scope's limits is in use now, as the limiter knows it: the request
    and token buckets' levels (what the last minute used, drained continuously; None
    without that limit) and the requests in flight (None without a concurrency limit)."""

    requests: float | None
    tokens: float | None
    concurrent: int | None


class LimitExceeded(RateLimited):
    """A request refused by a rate limit (429). ``retry_after`` is the seconds until the same
    request would pass; ``state`` the buckets for the response headers; nothing was taken."""

    def __init__(self, scope: Scope, dimension: str, limit: int, retry_after: float, state: LimitState) -> None:
        wait = _seconds_text(retry_after)
        super().__init__(
            f"Rate limit reached for {_UNITS[dimension]} on {scope.kind} {scope.id}: limit {limit}. "
            f"Please try again in {wait}.",
            retry_after=retry_after,
        )
        self.scope = scope
        self.dimension = dimension
        self.limit = limit
        self.state = state


def _seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    return f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".") + "s"


class Limiter(Protocol):
    """Rate limits over a set of scopes, shared by every request of the process (in-memory)
    or of every gateway on one Redis."""

    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Lease:
        """Take one request, ``tokens`` tokens and one concurrency slot in every scope, or
        nothing at all.

        A request bucket must have room for the request; a token bucket must not be empty
        (the prompt estimate is charged even if it overdraws the bucket, and corrected at
        :meth:`settle`); a concurrency limit must have a free slot. Raises
        :class:`LimitExceeded` (a ``RateLimited``, 429) naming the scope and limit that
        refused, with the longest wait among the refusals as ``retry_after``.
        """
        ...

    async def settle(self, lease: Lease, tokens: int) -> None:
        """The request is over and used ``tokens`` (input + output): correct the token
        buckets from the admission charge to that, and free the concurrency slots.
        Idempotent; never raises."""
        ...

    async def release(self, lease: Lease) -> None:
        """Free the concurrency slots and leave the admission charge as it is (the usage is
        unknown). Idempotent; never raises."""
        ...

    async def peek(self, scopes: Sequence[Scope]) -> list[ScopeUsage | None]:
        """What each scope uses now, taking nothing; None for a scope the limiter could
        not be asked about (Redis down). Never raises."""
        ...

    async def start(self) -> None:
        """Start background work (the Redis backend refreshes its slots)."""
        ...

    async def aclose(self) -> None: ...


def bucket_window(limit: int, level: float) -> Window:
    """A bucket of ``limit`` per minute of which ``level`` units are in use (more than
    ``limit`` when a token bucket is in debt)."""
    level = max(0.0, level)
    remaining = math.floor(limit - level + 1e-9)
    return Window(limit=limit, remaining=max(0, min(limit, remaining)), reset=level * WINDOW / limit)


def tightest(windows: Sequence[Window]) -> Window | None:
    """The window that runs out first: least remaining, then the smaller limit."""
    if not windows:
        return None
    return min(windows, key=lambda w: (w.remaining, w.limit, -w.reset))
