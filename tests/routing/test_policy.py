"""Balancing policies: least outstanding and prefix affinity (pure, no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence

from mesh.canonical import CanonicalRequest, Event, Message, TextPart
from mesh.routing.policy import LeastOutstanding, PrefixAffinity
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


def test_prefix_affinity_sends_a_session_back_to_its_owner() -> None:
    rs = replicas(3)
    policy = PrefixAffinity()
    for i in range(10):
        rs[0].in_flight = i % 2  # a little busier now and then, well within the slack
        chosen, reason = policy.pick(rs, request("s", f"q{i}"), owner="r0")
        assert chosen is rs[0] and reason == "prefix_affinity"


def test_prefix_affinity_sheds_a_session_when_its_owner_is_clearly_busier() -> None:
    rs = replicas(2, capacity=4)
    policy = PrefixAffinity(slack=0.25)
    rs[0].in_flight = 3  # 75% busy against 0%
    other, reason = policy.pick(rs, request("s", "y"), owner="r0")
    assert other is rs[1] and reason == "affinity_shed"
    rs[0].reported_load = None
    rs[0].in_flight = 1  # 25%: not clearly busier
    assert policy.pick(rs, request("s", "y"), owner="r0") == (rs[0], "prefix_affinity")


def test_prefix_affinity_counts_the_kv_cache_a_worker_reports() -> None:
    rs = replicas(2)
    rs[0].reported_load = 0.9  # the engine's KV cache is nearly full
    policy = PrefixAffinity(slack=0.25)
    assert policy.pick(rs, request("s", "y"), owner="r0") == (rs[1], "affinity_shed")
    assert policy.pick(rs, request("s", "new"))[0] is rs[1]  # and new sessions avoid it


def test_new_sessions_and_unknown_owners_spread_evenly() -> None:
    rs = replicas(3)
    policy = PrefixAffinity()
    picks = Counter(policy.pick(rs, request("same system prompt " * 50, f"q{i}"))[0].name for i in range(30))
    assert picks == Counter({"r0": 10, "r1": 10, "r2": 10})
    gone = Counter(policy.pick(rs, request("s", f"q{i}"), owner="r9")[0].name for i in range(30))
    assert gone == Counter({"r0": 10, "r1": 10, "r2": 10})
