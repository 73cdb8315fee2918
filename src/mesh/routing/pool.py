"""A model's replicas, its wait queue, and the slot accounting between them.

A request holds a *slot* from :meth:`ModelPool.acquire` until :meth:`ModelPool.release`.
Slots exist while some healthy replica has room; otherwise requests wait in the pool's
:class:`FairQueue`. A freed slot goes to the next waiter before any newcomer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.config import ModelConfig
from mesh.routing.queue import DEFAULT_QUEUE_TIMEOUT, FairQueue
from mesh.routing.replica import Replica


@dataclass(eq=False)
class ModelPool:
    model: ModelConfig
    replicas: list[Replica]
    queue: FairQueue = field(default_factory=FairQueue)
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    reserved: int = 0  # slots granted to waiters that have not picked a replica yet

    def __post_init__(self) -> None:
        self.queue.on_abandon = self._abandoned

    def _abandoned(self) -> None:
        self.reserved -= 1
        self.release()

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def free_slots(self) -> float:
        free = 0.0
        for r in self.replicas:
            if r.healthy:
                free += r.free_slots
        return free - self.reserved

    async def acquire(self, account: str) -> None:
        """Wait for a slot (immediately if one is free and nobody waits)."""
        if not len(self.queue) and self.free_slots() > 0:
            return
        if not self.healthy():
            return  # nothing healthy: let the router fail over or report unavailability now
        await self.queue.wait(account, self.queue_timeout)
        # We were granted a reserved slot; it turns into a replica's in_flight when picked.
        self.reserved -= 1

    def release(self) -> None:
        """A request finished or a slot went unused: hand free slots to waiters."""
        while len(self.queue) and self.free_slots() > 0:
            self.reserved += 1
            if not self.queue.grant_next():
                self.reserved -= 1
                return

    def add(self, replica: Replica) -> None:
        self.replicas.append(replica)
        self.release()

    def remove(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
