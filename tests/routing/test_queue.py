"""The fair wait queue: round-robin across accounts, deadlines, a bounded size."""

from __future__ import annotations

import asyncio

import pytest

from mesh.errors import EngineOverloaded
from mesh.routing.queue import FairQueue


async def test_queue_grants_round_robin_across_accounts() -> None:
    q = FairQueue()
    order: list[str] = []

    async def waiter(account: str, tag: str) -> None:
        await q.wait(account, 5)
        order.append(tag)

    tasks = [asyncio.create_task(waiter("heavy", f"h{i}")) for i in range(4)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(waiter("light", "l0")))
    await asyncio.sleep(0)
    assert len(q) == 5
    for _ in range(5):
        assert q.grant_next()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    # The light account's single request is served second, not after the heavy flood.
    assert order == ["h0", "l0", "h1", "h2", "h3"]
    assert not q.grant_next() and len(q) == 0


async def test_queue_deadline_and_size_limit_raise_overloaded() -> None:
    q = FairQueue(max_waiting=1)
    first = asyncio.create_task(q.wait("a", 0.05))
    await asyncio.sleep(0)
    with pytest.raises(EngineOverloaded) as full:
        await q.wait("b", 1)
    assert full.value.retry_after is not None
    with pytest.raises(EngineOverloaded):
        await first
    assert len(q) == 0


async def test_queue_cancelled_after_grant_gives_the_slot_back() -> None:
    abandoned: list[bool] = []
    q = FairQueue(on_abandon=lambda: abandoned.append(True))
    task = asyncio.create_task(q.wait("a", 5))
    await asyncio.sleep(0)
    q.grant_next()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert abandoned == [True] or task.cancelled()
