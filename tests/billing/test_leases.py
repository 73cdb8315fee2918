"""Credit leases on both databases: in-memory admission and settlement against held credit,
batched charges, and the same invariants as the per-request ledger."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.test_ledger import PRICING, check_invariants, setup
from mesh.billing.lease_books import _Hold, _Pending
from mesh.billing.leases import LEASE_PREFIX, LEASE_REQUESTS, LeaseAdmission, LeasedLedger
from mesh.billing.ledger import Admission, Ledger
from mesh.billing.pricing import hold_cost
from mesh.billing.settlement import Captured
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import DatabaseUnavailable, InsufficientCredits
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys, holds, ledger, usage_records

T = TypeVar("T")

USAGE = Usage(input_tokens=10, output_tokens=5)  # 10 * 1 + 5 * 2 = 20 micro-credits


async def cycle(leased: LeasedLedger, principal: object, rid: str) -> int:
    try:
        adm = await leased.admit(principal, PRICING, rid, 10, 10)  # type: ignore[arg-type]
    except Exception as err:
        return -getattr(err, "status", 1)
    return int(await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING))


async def test_leases_admit_in_memory_and_charge_exactly(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    leased = LeasedLedger(book, db, writer, flush_interval=3600)
    first = await leased.admit(p, PRICING, "r0", 10, 10)
    assert isinstance(first, LeaseAdmission)
    balance, held = await book.balance(p.account_id)
    assert held > first.held  # the lease holds a block, not just this request
    async with db.read() as conn:
        queries_before = (await conn.execute(select(func.count()).select_from(holds))).scalar_one()
    charged = [await leased.settle(first, USAGE, status="ok", model="m", pricing=PRICING)]
    for i in range(1, 20):
        adm = await leased.admit(p, PRICING, f"r{i}", 10, 10)
        charged.append(await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING))
    async with db.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(holds))).scalar_one() == queries_before
    assert charged == [20] * 20
    assert await leased.flush() == 20
    await leased.aclose()  # releases the idle lease
    balance, held = await check_invariants(db, book, p.account_id)
    assert (balance, held) == (1_000_000 - 400, 0)
    async with db.read() as conn:
        rows = (await conn.execute(select(ledger.c.idempotency_key).where(ledger.c.kind == "usage"))).all()
        key = (await conn.execute(select(api_keys.c.spent, api_keys.c.held).where(api_keys.c.id == p.key_id))).one()
    assert sorted(r[0] for r in rows) == sorted(f"usage:r{i}" for i in range(20))
    assert (key.spent, key.held) == (400, 0)
    await writer.flush()


async def test_lease_settle_twice_charges_once(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    leased = LeasedLedger(book, db, writer, flush_interval=3600)
    adm = await leased.admit(p, PRICING, "dup", 10, 10)
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 20
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 0
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)


async def test_short_balance_falls_back_to_the_exact_hold(db: Database) -> None:
    book, p, writer = await setup(db, 100)  # far less than a lease of 32 holds
    leased = LeasedLedger(book, db, writer, flush_interval=3600)
    adm = await leased.admit(p, PRICING, "short", 10, 100)
    assert not isinstance(adm, LeaseAdmission) and isinstance(adm, Admission)
    assert adm.max_output_tokens < 100  # lowered to what 100 micro-credits pay for
    await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING)
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (80, 0)


async def test_concurrent_requests_over_two_processes_never_overspend(db: Database) -> None:
    # Enough for a lease or two, not for every request: leases, exact holds and 402s mix.
    start = 3_000
    book, p, writer = await setup(db, start)
    a = LeasedLedger(book, db, writer, flush_interval=0.01)
    b = LeasedLedger(book, db, writer, flush_interval=0.01)
    outcomes = await asyncio.gather(*(cycle(a if i % 2 else b, p, f"c{i}") for i in range(300)))
    await a.aclose()
    await b.aclose()
    paid = [o for o in outcomes if o > 0]
    assert all(o == 20 or o == -402 for o in outcomes), set(outcomes)
    assert 0 < len(paid) <= start // 20
    balance, held = await check_invariants(db, book, p.account_id)
    assert held == 0 and balance == start - sum(paid) >= 0
    await writer.flush()


async def test_a_dead_processes_lease_is_released_by_another(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    dead = LeasedLedger(book, db, writer, flush_interval=3600)
    await dead.admit(p, PRICING, "orphan", 10, 10)  # leased, never settled, never closed
    _, held = await book.balance(p.account_id)
    assert held > 0
    async with db.write() as conn:  # as if its last touch was long ago
        long_ago = utcnow() - timedelta(hours=1)
        await conn.execute(
            update(holds).where(holds.c.request_id.startswith(LEASE_PREFIX)).values(created_at=long_ago)
        )
    alive = LeasedLedger(book, db, writer, flush_interval=3600, stale_after=60)
    await alive.flush()
    assert await check_invariants(db, book, p.account_id) == (1_000_000, 0)
    await alive.aclose()
    if dead._task is not None:
        dead._task.cancel()


async def test_billing_is_ready_again_only_after_a_flush_wrote_the_whole_backlog(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A flush that spans the database's recovery writes some holds and not others: readiness
    # (and so /health/ready) must not come back while the backlog is still queued.
    book, p, writer = await setup(db, 100)  # too little for a lease: exact holds
    leased = LeasedLedger(book, db, writer, flush_interval=3600)
    capture = leased._capture
    unreachable: set[str] = {"*"}

    async def faulty(hold: _Hold, batch: list[_Pending], *, close: bool) -> Captured:
        if "*" in unreachable or hold.id in unreachable:
            raise DatabaseUnavailable()
        return await capture(hold, batch, close=close)

    monkeypatch.setattr(leased, "_capture", faulty)
    first = await leased.admit(p, PRICING, "first", 10, 1)
    second = await leased.admit(p, PRICING, "second", 10, 1)
    assert first.hold_id and second.hold_id and not isinstance(first, LeaseAdmission)
    for adm in (first, second):
        await leased.settle(adm, Usage(input_tokens=10, output_tokens=1), status="ok", model="m", pricing=PRICING)
    assert not leased.ready and leased.queued == 2
    unreachable.clear()
    unreachable.add(first.hold_id)  # back, but the first hold's write still fails
    await leased.flush()
    assert leased.queued == 1 and not leased.ready
    # The held-up hold is written while another loses its connection in the same pass (an
    # admission refused with a 503 leaves an orphan to release, first tried in this pass):
    # the outage's backlog is in, and the stray failure is the next pass's to retry.
    async def refused(*args: object, **kwargs: object) -> Admission:
        raise DatabaseUnavailable()

    real_admit = book.admit
    monkeypatch.setattr(book, "admit", refused)
    with pytest.raises(DatabaseUnavailable):
        await leased.admit(p, PRICING, "orphan", 10, 1)
    monkeypatch.setattr(book, "admit", real_admit)
    unreachable.clear()
    unreachable.add("orphan")
    await leased.flush()
    assert leased.queued == 0 and leased.ready
    assert [h.id for h in leased._closing] == ["orphan"]  # still to release
    unreachable.clear()
    await leased.flush()
    assert leased.ready and not leased._closing
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (100 - 2 * 12, 0)
    await writer.flush()


class _LosesOneCommitReply(Database):
    """The same database, except that the next write commits and then reports the
    connection lost, as when a COMMIT's reply never gets back."""

    def __init__(self, db: Database) -> None:
        self.__dict__.update(db.__dict__)
        self.armed = True

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with super().write() as conn:
            yield conn
        if self.armed:
            self.armed = False
            raise DatabaseUnavailable(connection_lost=True)  # as Database.write reports it

    async def run_write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        result = await super().run_write(fn, *args, **kwargs)  # PostgreSQL's goes through write()
        if self.armed:
            self.armed = False
            raise DatabaseUnavailable(connection_lost=True)
        return result


class _Lost(Exception):
    """Raised inside a transaction to roll it back, standing for a connection lost before COMMIT."""


async def test_a_lease_whose_grow_reply_was_lost_still_admits_and_releases_all(db: Database) -> None:
    # A lost reply on one connection is not an outage: the request is admitted (on a second
    # grow), not refused with a 503, and closing the lease gives back all that its row holds.
    book, p, writer = await setup(db, 1_000_000)
    lossy = _LosesOneCommitReply(db)
    leased = LeasedLedger(book, lossy, writer, flush_interval=3600)
    adm = await leased.admit(p, PRICING, "lost", 10, 10)
    assert isinstance(adm, LeaseAdmission) and not lossy.armed
    _, held = await book.balance(p.account_id)
    # The first grow committed: one block is held, not a second one on top.
    assert held == hold_cost(PRICING, 10, 10) * LEASE_REQUESTS == leased._leases[p.key_id or ""].held
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 20
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)
    await writer.flush()


class _RollsBackThenDown(Database):
    """The same database, except that the next write loses its connection before COMMIT
    (rolled back), and the one after finds no connection at all."""

    def __init__(self, db: Database) -> None:
        self.__dict__.update(db.__dict__)
        self.faults = ["rolled back", "down"]

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        fault = self.faults.pop(0) if self.faults else None
        if fault == "down":
            raise DatabaseUnavailable()
        async with super().write() as conn:
            yield conn
            if fault == "rolled back":
                raise DatabaseUnavailable(connection_lost=True)

    async def run_write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if not self.is_sqlite:
            return await super().run_write(fn, *args, **kwargs)  # through write(), above
        fault = self.faults.pop(0) if self.faults else None
        if fault == "down":
            raise DatabaseUnavailable()
        if fault != "rolled back":
            return await super().run_write(fn, *args, **kwargs)

        def then_lost(conn: Connection) -> T:
            fn(conn, *args, **kwargs)
            raise _Lost

        try:
            return await super().run_write(then_lost)
        except _Lost:
            raise DatabaseUnavailable(connection_lost=True) from None


async def test_a_grow_that_never_committed_leaves_the_lease_holding_nothing(db: Database) -> None:
    # The lease must not believe in credit its row never got: requests admitted against it
    # would have nothing held in the database.
    book, p, writer = await setup(db, 1_000_000)
    faulty = _RollsBackThenDown(db)
    leased = LeasedLedger(book, faulty, writer, flush_interval=3600)
    with pytest.raises(DatabaseUnavailable):
        await leased.admit(p, PRICING, "refused", 10, 10)
    lease = leased._leases.get(p.key_id or "")
    assert lease is None or lease.held == 0
    assert await book.balance(p.account_id) == (1_000_000, 0)
    adm = await leased.admit(p, PRICING, "after", 10, 10)  # the database answers again
    assert isinstance(adm, LeaseAdmission)
    assert (await book.balance(p.account_id))[1] == hold_cost(PRICING, 10, 10) * LEASE_REQUESTS
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 20
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)
    await writer.flush()


# -- a caller cancelled while its hold or grow is written ------------------------------------------


@asynccontextmanager
async def _writes_blocked(db: Database, account_id: str) -> AsyncIterator[None]:
    """Another writer holds the account meanwhile: another gateway process's transaction on
    SQLite, another connection's row lock on PostgreSQL."""
    if db.is_sqlite:
        assert db.url.database is not None
        other = sqlite3.connect(db.url.database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("COMMIT")
            other.close()
    else:
        async with db.engine.connect() as conn:
            await conn.begin()
            await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id).with_for_update())
            try:
                yield
            finally:
                await conn.rollback()


async def _cancelled_while_blocked(db: Database, account_id: str, write: Coroutine[Any, Any, Any]) -> None:
    async with _writes_blocked(db, account_id):
        task = asyncio.ensure_future(write)
        await asyncio.sleep(0.3)  # waiting for the other writer
        assert not task.done()
        task.cancel()  # the client hung up, a deadline passed, the gateway stops
        await asyncio.sleep(0.1)
    with pytest.raises(asyncio.CancelledError):
        await task
    await db.run_write(lambda conn: None)  # SQLite: after the cancelled caller's thread is done


async def test_an_exact_hold_whose_caller_was_cancelled_holds_nothing(db: Database) -> None:
    # No Admission came back, so nothing would ever settle or release the hold: on SQLite
    # the writer thread must roll it back as PostgreSQL does, not commit it for nobody.
    book, p, _ = await setup(db, 1_000_000)
    await _cancelled_while_blocked(db, p.account_id, book.admit(p, PRICING, "r1", 10, 10))
    assert await book.balance(p.account_id) == (1_000_000, 0)
    async with db.read() as conn:
        assert (await conn.execute(select(holds.c.request_id))).all() == []


async def test_a_lease_whose_grow_was_cancelled_still_admits_the_next_request(db: Database) -> None:
    # The balance pays for one block: a grow committed for a cancelled caller, with the lease
    # believing it holds nothing, would grow a second block, fail, and refuse with a 402.
    need = hold_cost(PRICING, 10, 10)
    book, p, writer = await setup(db, need * LEASE_REQUESTS)
    leased = LeasedLedger(book, db, writer, flush_interval=3600)
    await _cancelled_while_blocked(db, p.account_id, leased.admit(p, PRICING, "a0", 10, 10))
    adm = await leased.admit(p, PRICING, "a1", 10, 10)
    assert isinstance(adm, LeaseAdmission) and adm.max_output_tokens == 10
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 20
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (need * LEASE_REQUESTS - 20, 0)
    await writer.flush()


class _CommitsThenCancelled(Database):
    """The same database, except that the next run_write (once armed) commits and then its
    caller is cancelled, as when the cancellation comes while the transaction commits; or,
    with ``lost``, hears the connection lost, as when the COMMIT's reply never gets back."""

    def __init__(self, db: Database, *, armed: bool = True, lost: bool = False) -> None:
        self.__dict__.update(db.__dict__)
        self.armed = armed
        self.lost = lost

    async def run_write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        result = await super().run_write(fn, *args, **kwargs)
        if self.armed:
            self.armed = False
            if self.lost:
                raise DatabaseUnavailable(connection_lost=True)
            raise asyncio.CancelledError
        return result


async def test_an_exact_hold_committed_for_a_cancelled_caller_is_released(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    late = _CommitsThenCancelled(db)
    leased = LeasedLedger(Ledger(late, writer), late, writer, flush_interval=3600, leases=False)
    with pytest.raises(asyncio.CancelledError):
        await leased.admit(p, PRICING, "r1", 10, 10)
    assert (await book.balance(p.account_id))[1] == hold_cost(PRICING, 10, 10)  # committed for nobody
    await leased.flush()
    assert await check_invariants(db, book, p.account_id) == (1_000_000, 0)
    await leased.aclose()
    await writer.flush()


async def test_a_lease_grow_committed_for_a_cancelled_caller_is_read_back_not_grown_again(db: Database) -> None:
    need = hold_cost(PRICING, 10, 10)
    book, p, writer = await setup(db, need * LEASE_REQUESTS)  # one block: a second grow is refused
    late = _CommitsThenCancelled(db)
    leased = LeasedLedger(book, late, writer, flush_interval=3600)
    with pytest.raises(asyncio.CancelledError):
        await leased.admit(p, PRICING, "a0", 10, 10)
    adm = await leased.admit(p, PRICING, "a1", 10, 10)
    assert isinstance(adm, LeaseAdmission) and adm.max_output_tokens == 10
    assert leased._leases[p.key_id or ""].held == need * LEASE_REQUESTS
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 20
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (need * LEASE_REQUESTS - 20, 0)
    await writer.flush()


# -- settles, reholds and grows whose outcome a cancellation or a lost reply hid --------------------


FREE = Pricing(input=Decimal("0"), output=Decimal("0"))


async def test_an_exact_settle_whose_caller_was_cancelled_is_still_charged(db: Database) -> None:
    # The client hangs up (or Starlette cancels the response task) while the settle of an
    # exact hold waits for the database: the pipeline marked ctx.settled before awaiting, so
    # nothing settles it again. The charge must still be written (and the hold released),
    # as LeasedLedger.admit does for an exact hold whose caller was cancelled.
    book, p, writer = await setup(db, 1_000_000)
    leased = LeasedLedger(book, db, writer, flush_interval=3600, leases=False)
    adm = await leased.admit(p, PRICING, "r1", 10, 10)
    await _cancelled_while_blocked(
        db, p.account_id, leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING)
    )
    await leased.flush()
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)
    await writer.flush()


async def test_an_exact_settle_committed_for_a_cancelled_caller_still_writes_its_usage_record(
    db: Database,
) -> None:
    # The settle's transaction commits as the cancellation comes: the charge is in the ledger,
    # but the usage record (enqueued only when the flusher applies the capture) is never written.
    book, p, writer = await setup(db, 1_000_000)
    late = _CommitsThenCancelled(db, armed=False)
    leased = LeasedLedger(Ledger(late, writer), late, writer, flush_interval=3600, leases=False)
    adm = await leased.admit(p, PRICING, "r1", 10, 10)
    late.armed = True
    with pytest.raises(asyncio.CancelledError):
        await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING)
    await leased.flush()
    await leased.aclose()
    await writer.flush()
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)
    async with db.read() as conn:
        rows = (await conn.execute(select(usage_records.c.request_id, usage_records.c.cost))).all()
    assert [(r.request_id, r.cost) for r in rows] == [("r1", 20)]


@pytest.mark.parametrize("lost", ["cancelled", "reply_lost"])
async def test_a_rehold_of_a_free_admission_with_an_unknown_outcome_leaves_no_hold(db: Database, lost: str) -> None:
    # A free model's admission (nothing held, no hold row) is served by a priced fallback:
    # rehold creates the row <request id>. Its caller cancelled as it commits (or its COMMIT
    # reply lost), the pipeline settles the request with no usage: nothing releases the row,
    # which holds the customer's credit until the 2-hour stale sweep.
    book, p, writer = await setup(db, 1_000_000)

    late = _CommitsThenCancelled(db, armed=False, lost=lost == "reply_lost")
    leased = LeasedLedger(Ledger(late, writer), late, writer, flush_interval=3600)
    adm = await leased.admit(p, FREE, "r1", 10, 10)
    assert adm.held == 0 and adm.hold_id is None
    late.armed = True
    with pytest.raises((asyncio.CancelledError, DatabaseUnavailable)):
        await leased.rehold(adm, PRICING)
    await leased.settle(adm, None, status="cancelled", model="m", pricing=PRICING)  # _settle_now after a failed rehold
    await leased.flush()
    await leased.aclose()
    async with db.read() as conn:
        left = (await conn.execute(select(holds.c.request_id, holds.c.amount))).all()
    assert left == []
    assert await check_invariants(db, book, p.account_id) == (1_000_000, 0)
    await writer.flush()


async def test_a_grow_whose_reply_was_lost_and_whose_read_back_was_cancelled_is_not_grown_again(
    db: Database,
) -> None:
    # _grow: the grow commits, its reply is lost (connection_lost), and the caller is cancelled
    # while it reads the row back. The CancelledError comes from the except-clause, not the try
    # body: the lease is not marked unsure, believes it holds nothing, grows a second block the
    # balance cannot cover, and the next request gets a 402 with the credit in its own lease.
    need = hold_cost(PRICING, 10, 10)
    book, p, writer = await setup(db, need * LEASE_REQUESTS)  # one block: a second grow is refused

    class LostThenCancelledRead(Database):
        def __init__(self, db: Database) -> None:
            self.__dict__.update(db.__dict__)
            self.armed = True
            self.cancel_read = False

        async def run_write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
            result = await super().run_write(fn, *args, **kwargs)
            if self.armed:
                self.armed = False
                self.cancel_read = True
                raise DatabaseUnavailable(connection_lost=True)
            return result

        @asynccontextmanager
        async def read(self) -> AsyncIterator[AsyncConnection]:
            if self.cancel_read:
                self.cancel_read = False
                raise asyncio.CancelledError  # the client hung up while the row was read back
            async with Database.read(self) as conn:
                yield conn

    late = LostThenCancelledRead(db)
    leased = LeasedLedger(book, late, writer, flush_interval=3600)
    with pytest.raises(asyncio.CancelledError):
        await leased.admit(p, PRICING, "a0", 10, 10)
    adm = await leased.admit(p, PRICING, "a1", 10, 10)  # observed: InsufficientCredits (402)
    assert isinstance(adm, LeaseAdmission) and adm.max_output_tokens == 10
    assert await leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING) == 20
    await leased.aclose()
    assert await check_invariants(db, book, p.account_id) == (need * LEASE_REQUESTS - 20, 0)
    await writer.flush()


class _Gated(Database):
    """The same database, except that a capture of a checkpoint waits for ``gate`` (the
    flusher is writing the exact hold's checkpoint while the request settles)."""

    def __init__(self, db: Database) -> None:
        self.__dict__.update(db.__dict__)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.writes = 0

    async def run_write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        self.writes += 1
        if any(s.key.count(":") == 2 for s in kwargs.get("settlements", ())):  # usage:<rid>:<n>
            self.entered.set()
            await self.gate.wait()
        return await super().run_write(fn, *args, **kwargs)


async def test_an_exact_settle_cancelled_while_the_flusher_writes_its_checkpoint_is_still_charged(
    db: Database,
) -> None:
    # A stream on an exact hold (no lease: leases off, a short balance, an end user's cap) has
    # a checkpoint being written by the flusher when the request settles; the client hangs up
    # while the settle waits for the hold's lock. The settle hands the hold to _closing, but the
    # flusher's _write sees hold.closing (set by the settle after it read close=False), marks
    # the hold closed, and the same flush drops it from _closing: the final charge is never
    # written, its hold row stays, and no usage record is written.
    book, p, writer = await setup(db, 1_000_000)
    gated = _Gated(db)
    leased = LeasedLedger(Ledger(gated, writer), gated, writer, flush_interval=3600, leases=False,
                          checkpoint_interval=0)
    adm = await leased.admit(p, PRICING, "r1", 10, 10)
    leased.checkpoint(adm, Usage(input_tokens=10, output_tokens=2))  # 14 so far
    flushing = asyncio.ensure_future(leased.flush())
    await asyncio.wait_for(gated.entered.wait(), 5)
    settling = asyncio.ensure_future(leased.settle(adm, USAGE, status="ok", model="m", pricing=PRICING))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not settling.done()  # waiting for the hold's lock
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    gated.gate.set()
    await flushing
    await leased.flush()
    await leased.aclose()
    await writer.flush()
    async with db.read() as conn:
        left = (await conn.execute(select(holds.c.request_id, holds.c.amount))).all()
        rows = (await conn.execute(select(usage_records.c.request_id, usage_records.c.cost))).all()
    assert [tuple(r) for r in left] == []  # observed: [("r1", 16)]
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)  # observed: (999_986, 16)
    assert [(r.request_id, r.cost) for r in rows] == [("r1", 20)]  # observed: []


async def test_a_free_admission_whose_rehold_was_refused_settles_without_writing(db: Database) -> None:
    # A free model's admission (nothing held) is routed to a priced fallback the balance cannot
    # cover: rehold raises InsufficientCredits (the hold was refused, nothing committed) and the
    # pipeline settles it with status error and no usage. Nothing is due and nothing is held,
    # yet settle now takes the exact-hold path (open_.hold was set before the rehold) and writes
    # a capture transaction (locking the account row on PostgreSQL) for a free request.
    book, p, writer = await setup(db, 5)  # less than the fallback's hold
    gated = _Gated(db)
    leased = LeasedLedger(Ledger(gated, writer), gated, writer, flush_interval=3600)
    adm = await leased.admit(p, FREE, "r1", 10, 10)
    assert adm.held == 0 and adm.hold_id is None
    with pytest.raises(InsufficientCredits):
        await leased.rehold(adm, PRICING)
    before = gated.writes
    assert await leased.settle(adm, None, status="error", model="m", pricing=PRICING) == 0
    assert gated.writes == before  # observed: one run_write (a no-op capture with close)
    await leased.aclose()
    await writer.flush()
    assert await check_invariants(db, book, p.account_id) == (5, 0)
    async with db.read() as conn:
        rows = (await conn.execute(select(usage_records.c.request_id, usage_records.c.cost))).all()
    assert [(r.request_id, r.cost) for r in rows] == [("r1", 0)]
