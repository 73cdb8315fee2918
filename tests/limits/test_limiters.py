"""Both limiter backends through the one interface: a dict in this process (on a fake
clock, so waits are exact) and the real Redis (real time, so waits are checked to within
a few milliseconds)."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from mesh.limits import Limiter, LimitExceeded, MemoryLimiter, RateLimits, RedisLimiter, Scope
from mesh.limits.base import ScopeUsage
from mesh.limits.redis_limiter import scope_key

ACCOUNT = "acct_1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A limiter, and how far its clock may be off from the one the test thinks it has."""

    limiter: Limiter
    clock: Clock | None  # None: Redis' real clock
    slack: float

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


def key(rpm: int | None = None, tpm: int | None = None, concurrent: int | None = None, id: str = "key_1") -> Scope:
    return Scope("key", id, ACCOUNT, RateLimits(rpm, tpm, concurrent))


def account(rpm: int | None = None, tpm: int | None = None, concurrent: int | None = None) -> Scope:
    return Scope("account", ACCOUNT, ACCOUNT, RateLimits(rpm, tpm, concurrent))


def prefix() -> str:
    return f"mesh-test-{secrets.token_hex(4)}:"


@pytest.fixture
async def redis_backend(redis_url: str) -> AsyncIterator[Backend]:
    limiter = RedisLimiter(redis_url, prefix=prefix())
    yield Backend(limiter, None, 0.05)
    await limiter.aclose()


@pytest.fixture
def memory_backend() -> Backend:
    clock = Clock()
    return Backend(MemoryLimiter(clock=clock), clock, 1e-6)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.getfixturevalue(f"{request.param}_backend")
    return b


async def refused(call: Callable[[], Awaitable[object]]) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as exc:
        await call()
    return exc.value


async def test_rpm_admits_a_minutes_worth_then_refuses_with_the_wait(backend: Backend) -> None:
    lim = backend.limiter
    remaining = []
    for _ in range(3):
        lease = await lim.acquire([key(rpm=3)], 10)
        assert lease.state is not None and lease.state.requests is not None
        remaining.append(lease.state.requests.remaining)
        await lim.settle(lease, 10)
    assert remaining == [2, 1, 0]
    assert lease.state.requests.reset == pytest.approx(60, abs=backend.slack)
    err = await refused(lambda: lim.acquire([key(rpm=3)], 10))
    assert (err.status, err.kind, err.code, err.dimension, err.limit) == (429, "rate_limit", "rate_limit_exceeded",
                                                                         "requests", 3)
    # The bucket refills one request every 20 s; the first left at t=0.
    assert err.retry_after == pytest.approx(20, abs=backend.slack)
    assert err.state.requests is not None and err.state.requests.remaining == 0
    assert "requests per minute (RPM) on key key_1: limit 3" in err.message
    wait = re.search(r"Please try again in ([0-9.]+)s\.$", err.message)
    assert wait is not None and float(wait.group(1)) == pytest.approx(20, abs=backend.slack)


async def test_rpm_refills_continuously() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    for _ in range(2):
        await lim.acquire([key(rpm=2)], 1)
    await refused(lambda: lim.acquire([key(rpm=2)], 1))
    clock.now += 29.9
    err = await refused(lambda: lim.acquire([key(rpm=2)], 1))
    assert err.retry_after == pytest.approx(0.1)
    clock.now += 0.1
    lease = await lim.acquire([key(rpm=2)], 1)
    assert lease.state is not None and lease.state.requests is not None
    assert lease.state.requests.remaining == 0


async def test_refusal_takes_nothing_from_any_scope(backend: Backend) -> None:
    lim = backend.limiter
    both = [key(rpm=10, tpm=1000, concurrent=5), account(rpm=1)]
    await lim.acquire(both, 100)
    for _ in range(3):
        err = await refused(lambda: lim.acquire(both, 100))
        assert err.scope.kind == "account" and err.dimension == "requests"
        assert err.retry_after == pytest.approx(60, abs=backend.slack)
    # The key's buckets saw one request, 100 tokens and one slot: the refusals took none.
    lease = await lim.acquire([key(rpm=10, tpm=1000, concurrent=2)], 100)
    assert lease.state is not None and lease.state.requests is not None and lease.state.tokens is not None
    assert lease.state.requests.remaining == 8
    assert lease.state.tokens.remaining == 800
    await refused(lambda: lim.acquire([key(concurrent=2)], 0))


async def test_tpm_charges_the_estimate_and_refuses_only_an_empty_bucket(backend: Backend) -> None:
    lim = backend.limiter
    scope = [key(tpm=1000)]
    first = await lim.acquire(scope, 600)
    assert first.state is not None and first.state.tokens is not None
    assert first.state.tokens.remaining == 400
    second = await lim.acquire(scope, 600)  # 400 left is not empty: admitted, 200 into debt
    assert second.state is not None and second.state.tokens is not None
    assert second.state.tokens.remaining == 0
    assert second.state.tokens.reset == pytest.approx(72, abs=backend.slack)  # 1200 tokens at 1000/min
    err = await refused(lambda: lim.acquire(scope, 1))
    assert err.dimension == "tokens" and err.limit == 1000
    # 200 tokens of debt plus one to have: 201 tokens at 60 ms each.
    assert err.retry_after == pytest.approx(12.06, abs=backend.slack)
    # The first request used 100 tokens, not 600: 500 come back, the bucket has 300.
    await lim.settle(first, 100)
    third = await lim.acquire(scope, 50)
    assert third.state is not None and third.state.tokens is not None
    assert third.state.tokens.remaining == pytest.approx(250, abs=1)


async def test_settle_charges_what_was_really_used(backend: Backend) -> None:
    lim = backend.limiter
    lease = await lim.acquire([key(tpm=1000)], 10)
    await lim.settle(lease, 900)
    nxt = await lim.acquire([key(tpm=1000)], 0)
    assert nxt.state is not None and nxt.state.tokens is not None
    assert nxt.state.tokens.remaining == pytest.approx(100, abs=1)
    await lim.settle(lease, 0)  # a second settlement changes nothing
    again = await lim.acquire([key(tpm=1000)], 0)
    assert again.state is not None and again.state.tokens is not None
    assert again.state.tokens.remaining == pytest.approx(100, abs=1)


async def test_concurrency_is_freed_by_settle_and_release_once(backend: Backend) -> None:
    lim = backend.limiter
    scope = [key(concurrent=2)]
    a = await lim.acquire(scope, 5)
    b = await lim.acquire(scope, 5)
    err = await refused(lambda: lim.acquire(scope, 5))
    assert (err.dimension, err.limit, err.retry_after) == ("concurrent", 2, 1.0)
    assert "concurrent requests" in err.message
    await lim.release(a)
    await lim.release(a)  # idempotent: frees one slot, not two
    c = await lim.acquire(scope, 5)
    await refused(lambda: lim.acquire(scope, 5))
    await lim.settle(b, 5)
    await lim.settle(b, 5)
    await lim.acquire(scope, 5)
    await refused(lambda: lim.acquire(scope, 5))
    assert c.concurrent and not (await lim.acquire([key(rpm=100, id="key_2")], 1)).concurrent


async def test_headers_state_shows_the_tightest_scope(backend: Backend) -> None:
    lease = await backend.limiter.acquire([key(rpm=100, tpm=50), account(rpm=5, tpm=100_000)], 20)
    assert lease.state is not None and lease.state.requests is not None and lease.state.tokens is not None
    assert (lease.state.requests.limit, lease.state.requests.remaining) == (5, 4)
    assert (lease.state.tokens.limit, lease.state.tokens.remaining) == (50, 30)
    assert lease.state.tokens.reset == pytest.approx(24, abs=backend.slack)
    only_conc = await backend.limiter.acquire([key(concurrent=3, id="key_3")], 1)
    assert only_conc.state is not None
    assert only_conc.state.requests is None and only_conc.state.tokens is None


async def test_limit_changes_apply_to_the_existing_bucket(backend: Backend) -> None:
    lim = backend.limiter
    started = time.monotonic()
    for _ in range(2):
        await lim.acquire([key(rpm=2)], 1)
    await refused(lambda: lim.acquire([key(rpm=2)], 1))
    lease = await lim.acquire([key(rpm=4)], 1)  # the operator doubled it: room at once
    assert lease.state is not None and lease.state.requests is not None
    assert lease.state.requests.remaining == 1
    # ... then cut it below the 3 in use: they drain at the new rate, one a minute.
    err = await refused(lambda: lim.acquire([key(rpm=1)], 0))
    # Redis runs on the real clock: the bucket drained for as long as the test took to get here.
    drained = 0.0 if backend.clock is not None else time.monotonic() - started
    assert 180 - drained - backend.slack <= err.retry_after <= 180 + backend.slack


async def test_memory_forgets_full_idle_buckets() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    busy = await lim.acquire([key(concurrent=1)], 1)
    await lim.acquire([key(rpm=10, id="key_2")], 1)
    assert len(lim) == 2
    clock.now += 61
    await lim.acquire([account(rpm=10)], 1)
    assert len(lim) == 2  # key_2's bucket was full again and is gone; the busy one stays
    await lim.settle(busy, 1)


async def test_redis_limits_hold_across_processes(redis_url: str) -> None:
    p = prefix()
    one, two = RedisLimiter(redis_url, prefix=p), RedisLimiter(redis_url, prefix=p)
    try:
        outcomes = []
        for i in range(10):
            lim = (one, two)[i % 2]
            try:
                await lim.acquire([key(rpm=4), account(concurrent=100)], 1)
                outcomes.append("ok")
            except LimitExceeded:
                outcomes.append("429")
        assert outcomes == ["ok"] * 4 + ["429"] * 6
        racers = await asyncio.gather(
            *((one, two)[i % 2].acquire([key(concurrent=5, id="key_race")], 1) for i in range(40)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in racers) == 5
        assert all(isinstance(r, LimitExceeded) for r in racers if isinstance(r, BaseException))
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_key_layout_and_expiry(redis_url: str) -> None:
    p = prefix()
    lim = RedisLimiter(redis_url, prefix=p)
    client = aioredis.Redis.from_url(redis_url)
    try:
        k = key(rpm=60, tpm=6000, concurrent=2)
        lease = await lim.acquire([k, account(rpm=1000)], 100)
        h = scope_key(p, k)
        assert h == p + "rl:{acct_1}:key:key_1"
        assert scope_key(p, account()) == p + "rl:{acct_1}:account"
        fields = await client.hgetall(h)  # type: ignore[misc]  # redis-py: awaitable | value
        assert set(fields) == {b"r", b"t", b"at"}
        # Both buckets are full again within a second: the hash goes away about then.
        assert 0 < await client.pttl(h) <= 2100
        assert await client.zrange(h + ":c", 0, -1) == [lease.id.encode()]
        assert 0 < await client.pttl(h + ":c") <= 60_000
        await lim.settle(lease, 100)
        assert await client.exists(h + ":c") == 0
    finally:
        await client.aclose()
        await lim.aclose()


async def test_redis_slots_of_a_dead_process_expire_and_live_ones_are_refreshed(redis_url: str) -> None:
    p = prefix()
    dead = RedisLimiter(redis_url, prefix=p, ttl=1.0)  # never started: never refreshes
    live = RedisLimiter(redis_url, prefix=p, ttl=1.0)
    await live.start()
    try:
        await dead.acquire([key(concurrent=1, id="key_dead")], 1)
        held = await live.acquire([key(concurrent=1, id="key_live")], 1)
        await asyncio.sleep(1.5)
        await live.acquire([key(concurrent=1, id="key_dead")], 1)  # the crashed one's slot is free
        await refused(lambda: live.acquire([key(concurrent=1, id="key_live")], 1))  # still held
        await live.settle(held, 1)
        assert await live.refresh() == 1  # only the key_dead lease taken above is live now
    finally:
        await dead.aclose()
        await live.aclose()


async def test_redis_down_fails_open() -> None:
    lim = RedisLimiter("redis://127.0.0.1:1/0", prefix=prefix())
    try:
        lease = await lim.acquire([key(rpm=1)], 1)
        lease2 = await lim.acquire([key(rpm=1)], 1)
        assert lease.state is None and lease2.state is None and lease.done
        await lim.settle(lease, 5)
    finally:
        await lim.aclose()


async def test_peek_shows_what_is_in_use_and_takes_nothing(backend: Backend) -> None:
    lim = backend.limiter
    # Slow buckets (a request every 10 s, a token a second), so Redis' real clock moving on
    # while the test runs changes the levels by a fraction only.
    scopes = [key(rpm=6, tpm=60, concurrent=3), account(rpm=600)]
    assert await lim.peek(scopes) == [
        ScopeUsage(requests=0.0, tokens=0.0, concurrent=0), ScopeUsage(requests=0.0, tokens=None, concurrent=None),
    ]
    a = await lim.acquire(scopes, 10)
    await lim.acquire(scopes, 5)
    await lim.settle(a, 40)  # 30 more tokens than charged; a's slot is free again
    for _ in range(2):  # peeking twice: the second sees the same, nothing was taken
        mine, acct = await lim.peek(scopes)
        assert mine is not None and acct is not None
        assert mine.requests == pytest.approx(2, abs=0.5)
        assert mine.tokens == pytest.approx(45, abs=5)
        assert mine.concurrent == 1
        assert acct.requests is not None and 0 < acct.requests <= 2 and acct.tokens is None
    before = mine.requests
    await backend.advance(1.0)
    mine, _ = await lim.peek(scopes)
    assert mine is not None and mine.requests is not None and mine.requests < before


async def test_peek_with_redis_down_knows_nothing() -> None:
    lim = RedisLimiter("redis://127.0.0.1:1/0", prefix=prefix())
    try:
        assert await lim.peek([key(rpm=1)]) == [None]
    finally:
        await lim.aclose()
