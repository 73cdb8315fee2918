"""Waiting for a free slot when every replica is full, fairly across accounts.

Each account has its own FIFO; slots are granted round-robin over the accounts that are
waiting, so one customer's flood queues behind itself, not in front of everyone else.
A waiter gives up at its deadline (:class:`EngineOverloaded`, 503/529 with retry-after);
a full queue refuses at once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable

from mesh.errors import EngineOverloaded

DEFAULT_QUEUE_TIMEOUT = 30.0
DEFAULT_MAX_QUEUE = 1000


class FairQueue:
    def __init__(self, max_waiting: int = DEFAULT_MAX_QUEUE, on_abandon: Callable[[], None] | None = None) -> None:
        """``on_abandon`` runs when a waiter is cancelled after being granted a slot."""
        self.max_waiting = max_waiting
        self.on_abandon = on_abandon
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    async def wait(self, account: str, deadline_s: float) -> None:
        """Wait until :meth:`grant_next` picks this waiter. Raises EngineOverloaded on timeout."""
        if self._count >= self.max_waiting:
            raise EngineOverloaded("The model is at capacity and its queue is full; retry shortly.", retry_after=2)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(account, deque()).append(fut)
        self._count += 1
        try:
            async with asyncio.timeout(deadline_s):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # granted just as the deadline passed
                return
            self._remove(account, fut)
            raise EngineOverloaded(
                f"The model is at capacity; no slot freed within {deadline_s:g} s. Retry shortly.", retry_after=2
            ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                if self.on_abandon is not None:
                    self.on_abandon()  # granted, but our caller is gone: give the slot back
            else:
                self._remove(account, fut)
            raise

    def grant_next(self) -> bool:
        """Wake the next waiter, round-robin across accounts. False if nobody waits."""
        while self._waiting:
            account, waiters = next(iter(self._waiting.items()))
            fut = waiters.popleft()
            self._count -= 1
            if waiters:
                self._waiting.move_to_end(account)
            else:
                del self._waiting[account]
            if not fut.done():
                fut.set_result(None)
                return True
            # A waiter that timed out or was cancelled: not counted here any more.
        return False

    def _remove(self, account: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiting.get(account)
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            self._count -= 1
            if not waiters:
                del self._waiting[account]
