"""A replica: one engine instance of one model, with its load and health bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.engines.base import Engine
from mesh.routing.breaker import CircuitBreaker


@dataclass(eq=False)
class Replica:
    """Mutable per-process state around an :class:`Engine`.

    ``in_flight`` counts requests this gateway process has open on the replica;
    ``capacity`` is the most it may have (None: unbounded). ``reported_load`` is what the
    engine itself last said (a worker heartbeat), in [0, 1], or None.
    """

    engine: Engine
    capacity: int | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    reported_load: float | None = None
    up: bool = True  # False while the replica's worker reports its engine unhealthy
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def healthy(self) -> bool:
        return self.up and self.breaker.available

    @property
    def has_room(self) -> bool:
        return self.capacity is None or self.in_flight < self.capacity

    @property
    def free_slots(self) -> float:
        return float("inf") if self.capacity is None else max(0, self.capacity - self.in_flight)

    @property
    def load(self) -> float:
        """Fraction of capacity in use, in [0, 1]; unbounded replicas use a soft scale."""
        own = min(1.0, self.in_flight / self.capacity) if self.capacity else self.in_flight / (self.in_flight + 8)
        return max(own, self.reported_load or 0.0)
