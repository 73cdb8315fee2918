"""Balancing policies: least outstanding and prefix affinity (pure, no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence

from mesh.canonical import CanonicalRequest, Event, Message, TextPart
from mesh.routing.policy import LeastOutstanding, PrefixAffinity, prefix_key
from mesh.routing.replica import Replica


class NamedEngine:
    def __init__(self, name: str) -> None:
        self.name = name

    def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        raise NotImplementedError

    async def health(self) -> bool:
        return True

    async def count_tokens(self, messages: Sequence[Message], request: CanonicalRequest) -> int | None:
        return None

    async def aclose(self) -> None:
        return None


def replicas(n: int, capacity: int | None = 8) -> list[Replica]:
    return [Replica(NamedEngine(f"r{i}"), capacity=capacity) for i in range(n)]


def request(system: str, user: str) -> CanonicalRequest:
    return CanonicalRequest(
        model="m", messages=(Message("system", (TextPart(system),)), Message("user", (TextPart(user),)))
    )


def test_least_outstanding_prefers_idle_and_rotates_ties() -> None:
    rs = replicas(3)
    rs[0].in_flight = 2
    policy = LeastOutstanding()
    picks = Counter(policy.pick(rs, request("s", str(i)))[0].name for i in range(10))
    assert picks["r0"] == 0 and picks["r1"] + picks["r2"] == 10 and abs(picks["r1"] - picks["r2"]) <= 1


def test_prefix_affinity_sticks_to_the_replica_that_served_the_prefix() -> None:
    rs = replicas(3)
    policy = PrefixAffinity(min_prefix_chars=50)
    long_system = "You are a careful assistant. " * 10
    first, _ = policy.pick(rs, request(long_system, "q0"))
    for i in range(1, 20):
        chosen, reason = policy.pick(rs, request(long_system, f"q{i}"))
        assert chosen is first and reason == "prefix_affinity"


def test_prefix_affinity_yields_when_the_owner_is_clearly_busier() -> None:
    rs = replicas(2, capacity=4)
    policy = PrefixAffinity(min_prefix_chars=10)
    owner, _ = policy.pick(rs, request("a long shared system prompt", "x"))
    owner.in_flight = 3  # 75% busy against 0%
    other, reason = policy.pick(rs, request("a long shared system prompt", "y"))
    assert other is not owner and reason == "least_loaded"


def test_short_or_missing_prefixes_spread_evenly() -> None:
    rs = replicas(3)
    policy = PrefixAffinity(min_prefix_chars=256)
    picks = Counter(policy.pick(rs, request("short", f"q{i}"))[0].name for i in range(30))
    assert picks == Counter({"r0": 10, "r1": 10, "r2": 10})
    assert prefix_key(request("short", "x").messages, 256) is None
