"""A replica: one engine instance of one model, with its load and health bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.engines.base import Engine


@dataclass(eq=False)
class Replica:
    """Mutable per-process state around an :class:`Engine`.

    ``in_flight`` counts requests this gateway process has open on the replica;
    ``capacity`` is the most it may have (None: unbounded).
    """

    engine: Engine
    capacity: int | None = None
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    healthy: bool = True
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def has_room(self) -> bool:
        return self.capacity is None or self.in_flight < self.capacity

    @property
    def load(self) -> float:
        """Fraction of capacity in use, in [0, 1]; unbounded replicas use a soft scale."""
        if self.capacity:
            return min(1.0, self.in_flight / self.capacity)
        return self.in_flight / (self.in_flight + 8)
