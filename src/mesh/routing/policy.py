"""Balancing policies. Each has a ``name`` and one method, ``pick``; they do no I/O.

Health and breaker filtering happen before ``pick`` (the router passes only replicas
that may take a request now). Scores stay in [0, 1].
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from mesh.canonical import CanonicalRequest, ImagePart, Message, ReasoningPart, TextPart, ToolCallPart, ToolResultPart
from mesh.routing.replica import Replica

# A prefix shorter than this is not worth steering for: the engine's prefix cache saves little.
DEFAULT_MIN_PREFIX_CHARS = 256
# "Clearly busier": the affine replica's load exceeds the least loaded one's by this much.
DEFAULT_AFFINITY_SLACK = 0.25
_AFFINITY_ENTRIES = 10_000


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Replica], request: CanonicalRequest) -> tuple[Replica, str]:
        """Choose one of ``candidates`` (never empty); returns it with the reason for the choice."""
        ...


class LeastOutstanding:
    """Fewest requests in flight relative to capacity; ties go round-robin."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._tick = itertools.count()

    def pick(self, candidates: Sequence[Replica], request: CanonicalRequest) -> tuple[Replica, str]:
        best = min(r.load for r in candidates)
        tied = [r for r in candidates if r.load == best]
        return tied[next(self._tick) % len(tied)], "least_loaded"


def _part_text(p: object) -> str:
    match p:
        case TextPart(text=t) | ReasoningPart(text=t):
            return t
        case ImagePart(url=u):
            return u
        case ToolCallPart(id=i, name=n, arguments=a):
            return f"{i}{n}{a}"
        case ToolResultPart():
            return p.call_id + p.text
    return ""


def prefix_key(messages: Sequence[Message], min_chars: int) -> str | None:
    """A digest of everything before the last message (system prompt and history), if long."""
    if len(messages) < 2:
        return None
    h = hashlib.blake2b(digest_size=16)
    size = 0
    for m in messages[:-1]:
        h.update(m.role.encode())
        for p in m.parts:
            text = _part_text(p)
            size += len(text)
            h.update(text.encode())
    return h.hexdigest() if size >= min_chars else None


class PrefixAffinity:
    """Least outstanding, but a request whose prefix a replica served before goes back there
    (its engine has the prefix in KV cache) unless that replica is clearly busier."""

    name = "prefix_affinity"

    def __init__(self, min_prefix_chars: int = DEFAULT_MIN_PREFIX_CHARS, slack: float = DEFAULT_AFFINITY_SLACK) -> None:
        self.min_prefix_chars = min_prefix_chars
        self.slack = slack
        self._fallback = LeastOutstanding()
        self._owner: OrderedDict[str, str] = OrderedDict()

    def pick(self, candidates: Sequence[Replica], request: CanonicalRequest) -> tuple[Replica, str]:
        key = prefix_key(request.messages, self.min_prefix_chars)
        least, reason = self._fallback.pick(candidates, request)
        if key is None:
            return least, reason
        owner = self._owner.get(key)
        if owner is not None:
            for r in candidates:
                if r.name == owner and r.has_room and r.load - least.load <= self.slack:
                    self._owner.move_to_end(key)
                    return r, "prefix_affinity"
        self._owner[key] = least.name
        self._owner.move_to_end(key)
        if len(self._owner) > _AFFINITY_ENTRIES:
            self._owner.popitem(last=False)
        return least, reason


def make_policy(name: str, min_prefix_chars: int = DEFAULT_MIN_PREFIX_CHARS) -> Policy:
    if name == LeastOutstanding.name:
        return LeastOutstanding()
    if name == PrefixAffinity.name:
        return PrefixAffinity(min_prefix_chars)
    raise ValueError(f"unknown routing policy {name!r}")
