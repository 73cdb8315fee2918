"""The Redis limiter through a proxy of our own that stops answering (never the shared
Redis itself): slots of requests that ended during the stall are free once it answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from mesh.limits import Lease, LimitExceeded, RateLimits, RedisLimiter, Scope
from mesh.limits.redis_limiter import RETRY_INTERVAL
from support.redis import unique_prefix
from support.stallproxy import StallProxy


@pytest.fixture
def proxy(redis_url: str) -> Iterator[StallProxy]:
    with StallProxy("127.0.0.1", 6379) as p:
        yield p


def one_slot() -> list[Scope]:
    return [Scope("key", "key_stall", "acct_stall", RateLimits(concurrent=1))]


async def free_again(limiter: RedisLimiter, scopes: list[Scope], what: str) -> Lease:
    """The slot, taken again once the retries gave it back (``what`` if they never do)."""
    deadline = time.monotonic() + 4 * RETRY_INTERVAL + 2
    while True:
        try:
            return await limiter.acquire(scopes, 0)
        except LimitExceeded:
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)


async def test_a_slot_released_during_a_redis_stall_is_free_as_soon_as_redis_answers(proxy: StallProxy) -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{proxy.port}/0", prefix=unique_prefix(), ttl=60)
    await limiter.start()
    try:
        scopes = one_slot()
        lease = await limiter.acquire(scopes, 0)
        with pytest.raises(LimitExceeded):
            await limiter.acquire(scopes, 0)  # the one slot is taken
        proxy.stall()
        await limiter.settle(lease, 0)  # the request ends while Redis does not answer: lost
        proxy.resume()
        # Without a retry the slot would stay taken until its 60 s deadline.
        again = await free_again(limiter, scopes, "the slot was not given back after the stall")
        await limiter.settle(again, 0)
    finally:
        await limiter.aclose()


async def test_an_admission_whose_answer_was_lost_frees_the_slot_it_may_have_taken(proxy: StallProxy) -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{proxy.port}/0", prefix=unique_prefix(), ttl=60)
    await limiter.start()
    try:
        scopes = one_slot()
        await limiter.settle(await limiter.acquire(scopes, 0), 0)  # connected, script loaded
        proxy.lose_replies()  # Redis takes the slot; the gateway never hears it did
        failed_open = await limiter.acquire(scopes, 0)  # fails open: unlimited, nothing to settle
        assert failed_open.done and failed_open.state is None
        proxy.resume()
        lease = await free_again(limiter, scopes, "the slot taken by the lost admission was never freed")
        assert lease.state is not None  # a real slot, counted on Redis
        await limiter.settle(lease, 0)
    finally:
        await limiter.aclose()


async def test_a_settlement_cut_short_by_cancellation_still_frees_the_slot(proxy: StallProxy) -> None:
    """A request whose give-back is cancelled while Redis has not answered (a second
    cancellation, a shutdown): the lease is no longer refreshed, and its slot must not wait
    for its 60 s deadline."""
    limiter = RedisLimiter(f"redis://127.0.0.1:{proxy.port}/0", prefix=unique_prefix(), ttl=60)
    await limiter.start()
    try:
        scopes = one_slot()
        lease = await limiter.acquire(scopes, 0)
        proxy.stall()
        settling = asyncio.ensure_future(limiter.settle(lease, 0))
        await asyncio.sleep(0.2)  # sent, swallowed by the stalled proxy
        assert not settling.done()
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        proxy.resume()
        lease = await free_again(limiter, scopes, "the slot of a cancelled settlement was not given back")
        assert lease.state is not None
        await limiter.settle(lease, 0)
    finally:
        await limiter.aclose()


async def test_an_admission_cancelled_after_redis_took_the_slot_frees_it(proxy: StallProxy) -> None:
    """The client hangs up while the admission script's answer is on its way: Redis took a
    slot the request will never use or settle."""
    limiter = RedisLimiter(f"redis://127.0.0.1:{proxy.port}/0", prefix=unique_prefix(), ttl=60)
    await limiter.start()
    try:
        scopes = one_slot()
        await limiter.settle(await limiter.acquire(scopes, 0), 0)  # connected, script loaded
        proxy.lose_replies()  # Redis runs the script and takes the slot; the answer is lost
        admitting = asyncio.ensure_future(limiter.acquire(scopes, 0))
        await asyncio.sleep(0.3)
        assert not admitting.done()
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        proxy.resume()
        lease = await free_again(limiter, scopes, "the slot taken by a cancelled admission was never freed")
        assert lease.state is not None
        await limiter.settle(lease, 0)
    finally:
        await limiter.aclose()
