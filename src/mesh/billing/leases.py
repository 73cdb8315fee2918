"""Credit leases: the request path's billing without a database round trip per request.

Measured first (bench/, py-spy): holding and settling credit in the database was three
quarters of a request's CPU. So each gateway process *leases* a block of an API key's
credit — an ordinary hold row (``lease:<process>:<key>``) that raises the account's and
the key's ``held`` exactly as a request's hold does — and then admits requests against it
in memory. Settlement charges the lease in memory; a flusher writes the charges every
``flush_interval`` seconds in one transaction (balance, held, one ledger row per request
with its ``usage:<request id>`` idempotency key, the key's spend), then hands the usage
records to the usage writer. An idle lease goes back to the account.

What stays true: a balance can never go below zero (every charge is covered by held
credit; leases are conditional updates like holds), the ledger sums to the balance (each
flush changes both in one transaction), a request is charged once. What it costs: if a
process dies, the charges of its last ``flush_interval`` are not recorded (the customer is
never overcharged; the operator loses at most that slice of revenue) and its leases are
released by any other process after ``stale_after`` seconds.

When a lease cannot be had (the balance is short, or a spend limit is near), admission
falls back to the exact per-request hold of :class:`mesh.billing.ledger.Ledger`, which
also lowers ``max_tokens`` to what the balance can pay for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, update

from mesh.accounts.principal import Principal
from mesh.billing.ledger import HOLD_ACCOUNT, HOLD_KEY, INSERT_HOLD, Admission, FastPathAbandoned, Ledger
from mesh.billing.money import MicroCredits, format_credits
from mesh.billing.pricing import cost, hold_cost
from mesh.billing.usage import UsageRecord, UsageWriter
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys, holds, ledger

log = logging.getLogger("mesh.billing.leases")

LEASE_PREFIX = "lease:"
# A lease covers this many holds of the request that asked for it.
LEASE_REQUESTS = 32

_SPEND = (
    update(accounts)
    .where(accounts.c.id == bindparam("a"))
    .values(balance=accounts.c.balance - bindparam("t"), held=accounts.c.held - bindparam("t"))
    .returning(accounts.c.balance)
)
_SPEND_KEY = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("k"))
    .values(held=api_keys.c.held - bindparam("t"), spent=api_keys.c.spent + bindparam("s"))
)
_SHRINK_LEASE = (
    update(holds)
    .where(holds.c.request_id == bindparam("r"))
    .values(amount=holds.c.amount - bindparam("t"), created_at=bindparam("now"))
)
_RELEASE_ACCOUNT = (
    update(accounts).where(accounts.c.id == bindparam("a")).values(held=accounts.c.held - bindparam("t"))
)
_RELEASE_KEY = update(api_keys).where(api_keys.c.id == bindparam("k")).values(held=api_keys.c.held - bindparam("t"))


@dataclass(eq=False)
class _Lease:
    id: str
    account_id: str
    key_id: str
    amount: int = 0  # credit this lease holds in the database, minus charges already taken
    reserved: int = 0  # the part admitted requests are holding
    pending: list[tuple[Admission, int, int, UsageRecord]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)

    @property
    def free(self) -> int:
        return self.amount - self.reserved


@dataclass(frozen=True, slots=True)
class LeaseAdmission(Admission):
    """An admission held by a lease, not by its own hold row."""

    lease_id: str = ""


class LeasedLedger:
    """The :class:`Ledger` interface the pipeline uses (``admit``/``settle``), served from leases."""

    def __init__(
        self,
        ledger: Ledger,
        db: Database,
        usage: UsageWriter | None,
        *,
        flush_interval: float = 0.1,
        idle_after: float = 2.0,
        stale_after: float = 60.0,
    ) -> None:
        self.ledger = ledger
        self.db = db
        self.usage = usage
        self.flush_interval = flush_interval
        self.idle_after = idle_after
        self.stale_after = stale_after
        self.process = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._leases: dict[str, _Lease] = {}
        self._open: dict[str, _Lease] = {}  # admitted request id -> the lease holding it
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._last_sweep = 0.0
        self._serial = 0

    # -- the request path ---------------------------------------------------------------------
    async def admit(
        self, principal: Principal, pricing: Pricing, request_id: str, prompt_tokens_estimate: int,
        max_output_tokens: int,
    ) -> Admission:
        need = hold_cost(pricing, prompt_tokens_estimate, max(1, max_output_tokens))
        if need == 0 or principal.key_id is None:
            return await self.ledger.admit(principal, pricing, request_id, prompt_tokens_estimate, max_output_tokens)
        lease = self._leases.get(principal.key_id)
        if lease is None:
            self._serial += 1  # each lease its own hold row, so a new one never meets a closing one
            lease = self._leases[principal.key_id] = _Lease(
                f"{LEASE_PREFIX}{self.process}:{self._serial}", principal.account_id, principal.key_id
            )
        if lease.free < need:
            async with lease.lock:
                if lease.free < need and not await self._grow(lease, need * LEASE_REQUESTS - lease.free):
                    # Not enough for a lease: the exact per-request hold decides (and may lower
                    # max_tokens or refuse with 402).
                    return await self.ledger.admit(
                        principal, pricing, request_id, prompt_tokens_estimate, max_output_tokens
                    )
        lease.reserved += need
        lease.last_used = time.monotonic()
        admission = LeaseAdmission(
            request_id, principal.account_id, principal.key_id, MicroCredits(need), max_output_tokens, lease.id
        )
        self._open[request_id] = lease
        return admission

    async def _grow(self, lease: _Lease, amount: int) -> bool:
        """Hold ``amount`` more for the lease (all of it or nothing)."""
        params = {"a": lease.account_id, "k": lease.key_id, "h": amount}
        try:
            async with self.db.write() as conn:
                if (await conn.execute(HOLD_ACCOUNT, params)).rowcount != 1:
                    return False
                if (await conn.execute(HOLD_KEY, params)).rowcount != 1:
                    raise FastPathAbandoned  # roll back the account's part
                grown = await conn.execute(
                    update(holds)
                    .where(holds.c.request_id == lease.id)
                    .values(amount=holds.c.amount + amount, created_at=utcnow())
                )
                if grown.rowcount != 1:
                    await conn.execute(
                        INSERT_HOLD,
                        {"r": lease.id, "a": lease.account_id, "k": lease.key_id, "h": amount, "t": utcnow()},
                    )
        except FastPathAbandoned:
            return False
        lease.amount += amount
        lease.touched = time.monotonic()
        self.start()
        return True

    async def settle(
        self,
        admission: Any,
        usage: Usage | None,
        *,
        status: str,
        model: str,
        pricing: Pricing,
        replica: str | None = None,
        protocol: str | None = None,
        ttft_ms: int | None = None,
        duration_ms: int | None = None,
    ) -> MicroCredits:
        if not isinstance(admission, LeaseAdmission):
            return await self.ledger.settle(
                admission, usage, status=status, model=model, pricing=pricing, replica=replica,
                protocol=protocol, ttft_ms=ttft_ms, duration_ms=duration_ms,
            )
        lease = self._open.pop(admission.request_id, None)
        if lease is None:
            return MicroCredits(0)  # settled before: a request is charged once
        usage = usage or Usage()
        due = 0 if usage.input_tokens == 0 and usage.output_tokens == 0 else cost(pricing, usage)
        lease.reserved -= admission.held
        charge = max(0, min(due, lease.free))  # never more than the lease holds
        lease.amount -= charge
        lease.last_used = time.monotonic()
        record = UsageRecord(
            request_id=admission.request_id, account_id=admission.account_id, key_id=admission.key_id,
            model=model, status=status, input_tokens=usage.input_tokens, cached_tokens=usage.cached_tokens,
            output_tokens=usage.output_tokens, reasoning_tokens=usage.reasoning_tokens,
            cost=MicroCredits(charge), replica=replica, protocol=protocol, ttft_ms=ttft_ms, duration_ms=duration_ms,
        )
        lease.pending.append((admission, charge, due, record))
        return MicroCredits(charge)

    # -- the flusher ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mesh-credit-leases")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("flushing credit leases failed; will retry")

    async def flush(self, *, release_all: bool = False) -> int:
        """Write pending charges; release idle leases (all, with ``release_all``). Returns the
        number of charges written."""
        async with self._flush_lock:
            now = time.monotonic()
            work = [lease for lease in self._leases.values() if lease.pending]
            idle = [
                lease for lease in self._leases.values()
                if lease.reserved == 0 and (release_all or now - lease.last_used > self.idle_after)
            ]
            for lease in idle:
                # Closed before any await: new requests open a fresh lease, never this one.
                del self._leases[lease.key_id]
                if lease.pending and lease not in work:
                    work.append(lease)
            stale_touch = [
                lease for lease in self._leases.values() if lease.amount and now - lease.touched > self.stale_after / 4
            ]
            if not work and not idle and not stale_touch:
                return await self._sweep(now)
            batches = [(lease, lease.pending) for lease in work]
            for lease in work:
                lease.pending = []
            try:
                async with self.db.write() as conn:
                    for lease, charges in batches:
                        await self._write(conn, lease, charges)
                    for lease in idle:
                        await self._release(conn, lease)
                    for lease in stale_touch:
                        if lease not in idle:
                            await conn.execute(_SHRINK_LEASE, {"r": lease.id, "t": 0, "now": utcnow()})
                            lease.touched = now
            except BaseException:
                for lease, charges in batches:  # keep them for the next attempt
                    lease.pending[:0] = charges
                for lease in idle:  # and the leases, still open
                    self._leases.setdefault(lease.key_id, lease)
                raise
            written = sum(len(charges) for _, charges in batches)
            if self.usage is not None:
                for _, charges in batches:
                    for _, _, _, record in charges:
                        self.usage.enqueue(record)
            await self._sweep(now)
            return written

    async def _write(
        self, conn: Any, lease: _Lease, charges: list[tuple[Admission, int, int, UsageRecord]]
    ) -> None:
        total = sum(charge for _, charge, _, _ in charges)
        if total:
            balance = int((await conn.execute(_SPEND, {"a": lease.account_id, "t": total})).scalar_one())
            await conn.execute(_SHRINK_LEASE, {"r": lease.id, "t": total, "now": utcnow()})
            await conn.execute(_SPEND_KEY, {"k": lease.key_id, "t": total, "s": total})
            lease.touched = time.monotonic()
            after = balance + total
            rows = []
            now = utcnow()
            for admission, charge, due, _ in charges:
                if not charge:
                    continue
                after -= charge
                memo = None if charge == due else (
                    f"shortfall: cost {format_credits(due)}, charged {format_credits(charge)}"
                )
                rows.append({
                    "account_id": lease.account_id, "kind": "usage", "amount": -charge, "balance_after": after,
                    "idempotency_key": f"usage:{admission.request_id}", "request_id": admission.request_id,
                    "key_id": lease.key_id, "memo": memo, "created_at": now,
                })
            await conn.execute(insert(ledger), rows)  # one executemany for the whole batch

    async def _release(self, conn: Any, lease: _Lease) -> None:
        """Give an idle lease's credit back to the account (its charges were just written)."""
        if lease.amount:
            await conn.execute(_RELEASE_ACCOUNT, {"a": lease.account_id, "t": lease.amount})
            await conn.execute(_RELEASE_KEY, {"k": lease.key_id, "t": lease.amount})
        await conn.execute(delete(holds).where(holds.c.request_id == lease.id))
        lease.amount = 0

    async def _sweep(self, now: float) -> int:
        """Every so often, release leases of processes that died (not touched for a while)."""
        if now - self._last_sweep < self.stale_after / 2:
            return 0
        self._last_sweep = now
        released = await self.ledger.release_stale_holds(timedelta(seconds=self.stale_after), prefix=LEASE_PREFIX)
        if released:
            log.warning("released %d credit leases left by stopped gateway processes", released)
        return 0

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush(release_all=True)

