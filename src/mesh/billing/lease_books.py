"""The in-memory books of :class:`mesh.billing.leases.LeasedLedger`: each admitted request
until it settles, each hold (a lease or an exact hold) with the charges queued on it. The
database's rows are the truth; these are what the process believes between its writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.billing.ledger import Admission
from mesh.billing.money import MicroCredits
from mesh.billing.settlement import Settlement
from mesh.billing.usage import UsageRecord
from mesh.canonical import Usage
from mesh.config import Pricing


@dataclass(eq=False)
class _Open:
    """One admitted request until it settles."""

    admission: Admission
    pricing: Pricing
    hold: _Hold | None  # None: nothing held (a free model)
    reserved: int  # the part of a lease this request still reserves
    usage: Usage | None = None  # latest cumulative usage reported while streaming
    checkpointed: int = 0  # what checkpoints have queued so far
    checkpoints: int = 0
    last_checkpoint: float = 0.0  # set from the ledger's clock at admission
    charged: int = 0  # written to the ledger so far
    # Set at settlement: the usage record, made with its cost once the charge is written (one
    # construction, where a record and then a copy with the cost took 7 us of each request).
    record: Callable[[MicroCredits], UsageRecord] | None = None


@dataclass(eq=False)
class _Pending:
    settlement: Settlement
    from_hold: int  # the part the hold is expected to cover (in-memory accounting only)
    request: _Open
    final: bool


@dataclass(eq=False)
class _Hold:
    """A lease, or an exact hold with queued charges. ``held`` is what its row held at the
    last write we know of; the database's row is the truth and each write resyncs it."""

    id: str
    account_id: str
    key_id: str | None
    held: int = 0
    charged: int = 0  # queued charges expected to come out of the hold
    reserved: int = 0  # the part admitted requests are reserving (leases)
    users: int = 0  # requests admitted on it and not settled yet (leases)
    pending: list[_Pending] = field(default_factory=list)
    closing: bool = False  # release what is left once the pending charges are written
    closed: bool = False
    unsure: bool = False  # a grow's outcome is unknown (its caller was cancelled): read the row first
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = 0.0  # times from the ledger's clock
    touched: float = 0.0

    @property
    def free(self) -> int:
        return self.held - self.charged - self.reserved
