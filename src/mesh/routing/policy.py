"""Balancing policies. Each has a ``name`` and one method, ``pick``; they do no I/O.

Health and breaker filtering happen before ``pick`` (the router passes only replicas
that may take a request now, with room). The router also passes the ``owner``: the
replica the session map (``routing/sessions.py``) says holds this conversation's prefix,
or None. Scores stay in [0, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from mesh.canonical import CanonicalRequest
from mesh.routing.replica import Replica

# A prefix shorter than this is not worth steering for: the engine's prefix cache saves little.
DEFAULT_MIN_PREFIX_CHARS = 256
# "Clearly busier": the owner's load exceeds the least loaded replica's by more than this.
DEFAULT_AFFINITY_SLACK = 0.25


class Policy(Protocol):
    name: str

    def pick(
        self, candidates: Sequence[Replica], request: CanonicalRequest, owner: str | None = None
    ) -> tuple[Replica, str]:
        """Choose one of ``candidates`` (never empty); returns it with the reason for the choice."""
        ...


class LeastOutstanding:
    """Fewest requests in flight relative to capacity (or the engine's reported load,
    KV-cache usage included); ties go round-robin."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._tick = itertools.count()

    def pick(
        self, candidates: Sequence[Replica], request: CanonicalRequest, owner: str | None = None
    ) -> tuple[Replica, str]:
        if len(candidates) == 1:  # no choice to make (the turn still passes, as on a tie of one)
            next(self._tick)
            return candidates[0], "least_loaded"
        best = min(r.load for r in candidates)
        tied = [r for r in candidates if r.load == best]
        return tied[next(self._tick) % len(tied)], "least_loaded"


class PrefixAffinity:
    """A known session goes back to the replica that holds its prefix (``owner``) unless
    that replica is clearly busier than the least loaded one; new conversations go to the
    least loaded replica. So a hot replica sheds new sessions first and keeps the ones it
    holds until the gap passes ``slack``."""

    name = "prefix_affinity"

    def __init__(self, min_prefix_chars: int = DEFAULT_MIN_PREFIX_CHARS, slack: float = DEFAULT_AFFINITY_SLACK) -> None:
        self.min_prefix_chars = min_prefix_chars
        self.slack = slack
        self._fallback = LeastOutstanding()

    def pick(
        self, candidates: Sequence[Replica], request: CanonicalRequest, owner: str | None = None
    ) -> tuple[Replica, str]:
        held = next((r for r in candidates if r.name == owner), None) if owner is not None else None
        if held is not None and held.load - min(r.load for r in candidates) <= self.slack:
            return held, "prefix_affinity"
        least, reason = self._fallback.pick(candidates, request)  # new sessions take turns on ties
        return least, "affinity_shed" if held is not None else reason  # a shed session's new home is remembered


def make_policy(
    name: str, min_prefix_chars: int = DEFAULT_MIN_PREFIX_CHARS, slack: float = DEFAULT_AFFINITY_SLACK
) -> Policy:
    if name == LeastOutstanding.name:
        return LeastOutstanding()
    if name == PrefixAffinity.name:
        return PrefixAffinity(min_prefix_chars, slack)
    raise ValueError(f"unknown routing policy {name!r}")
