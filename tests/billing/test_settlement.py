"""The settlement core and the lease queue over it, on SQLite and PostgreSQL, with a fake
clock: used-up leases close, one bad row never blocks the others, re-runs after a lost
COMMIT reply change nothing, charges beyond a hold, output caps, checkpoints, outages."""

from __future__ import annotations

from datetime import UTC, timedelta
from decimal import Decimal

from sqlalchemy import func, select, text

from billing.test_ledger import PRICING, check_invariants, setup
from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.principal import Principal
from mesh.accounts.service import Accounts
from mesh.billing import settlement
from mesh.billing.leases import LEASE_PREFIX, LeaseAdmission, LeasedLedger
from mesh.billing.ledger import Ledger
from mesh.billing.money import MicroCredits
from mesh.billing.settlement import Settlement
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import DatabaseUnavailable, InsufficientCredits
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys, holds, ledger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leased(book: object, db: Database, writer: object, clock: FakeClock, **kw: float) -> LeasedLedger:
    return LeasedLedger(book, db, writer, flush_interval=3600, clock=clock, **kw)  # type: ignore[arg-type]


async def another(db: Database, book: Ledger, balance: int) -> Principal:
    accounts = Accounts(db)
    account = await accounts.create("b")
    created = await accounts.create_key(account.id)
    await book.grant(account.id, MicroCredits(balance), idempotency_key="seed-b")
    return await KeyAuthenticator(db).authenticate(created.key)


async def hold_rows(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        return {r.request_id: r.amount for r in await conn.execute(select(holds.c.request_id, holds.c.amount))}


async def assert_held_is_its_rows(db: Database) -> None:
    """Every account's and key's ``held`` is the sum of its hold rows: no credit held
    without a row behind it, where no cleanup could find it."""
    async with db.read() as conn:
        per_account = dict((await conn.execute(
            select(holds.c.account_id, func.sum(holds.c.amount)).group_by(holds.c.account_id))).all())
        per_key = dict((await conn.execute(
            select(holds.c.key_id, func.sum(holds.c.amount)).group_by(holds.c.key_id))).all())
        for account_id, held in (await conn.execute(select(accounts.c.id, accounts.c.held))).all():
            assert held == per_account.get(account_id, 0), account_id
        for key_id, held in (await conn.execute(select(api_keys.c.id, api_keys.c.held))).all():
            assert held == per_key.get(key_id, 0), key_id


async def usage_keys(db: Database) -> list[str]:
    async with db.read() as conn:
        q = select(ledger.c.idempotency_key).where(ledger.c.kind == "usage").order_by(ledger.c.idempotency_key)
        return [r[0] for r in await conn.execute(q)]


async def test_a_lease_whose_charges_use_it_up_is_closed_and_others_are_still_charged(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    q = await another(db, book, 1_000_000)
    clock = FakeClock()
    ledger_ = leased(book, db, writer, clock)
    first = await ledger_.admit(p, PRICING, "a0", 10, 10)
    assert isinstance(first, LeaseAdmission)
    lease_amount = (await hold_rows(db))[first.lease_id]
    # A usage that costs exactly the whole lease (output capped by nothing: n and max_tokens large).
    whole = Usage(input_tokens=lease_amount)
    big = await ledger_.admit(p, PRICING, "a1", 10, 10, choices=16)
    await ledger_.settle(first, Usage(), status="ok", model="m", pricing=PRICING)
    assert await ledger_.settle(big, whole, status="ok", model="m", pricing=PRICING) == lease_amount
    other = await ledger_.admit(q, PRICING, "b0", 10, 10)
    await ledger_.settle(other, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING)
    assert await ledger_.flush() == 3
    rows = await hold_rows(db)
    assert first.lease_id not in rows  # deleted, not updated to zero
    assert await usage_keys(db) == ["usage:a1", "usage:b0"]
    await assert_held_is_its_rows(db)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - lease_amount, 0)
    # The key's next request opens a new lease, and is charged too.
    again = await ledger_.admit(p, PRICING, "a2", 10, 10)
    assert isinstance(again, LeaseAdmission) and again.lease_id != first.lease_id
    await ledger_.settle(again, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING)
    await ledger_.flush(release_all=True)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - lease_amount - 20, 0)
    assert await check_invariants(db, book, q.account_id) == (1_000_000 - 20, 0)
    assert ledger_.failed_rows == 0


async def test_one_bad_row_is_dropped_and_counted_and_never_blocks_the_rest(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    clock = FakeClock()
    ledger_ = leased(book, db, writer, clock)
    async with db.write() as conn:  # a row the database refuses, whatever the reason
        if db.is_sqlite:
            await conn.execute(text(
                "CREATE TRIGGER poison BEFORE INSERT ON ledger WHEN NEW.request_id = 'bad' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
            ))
        else:
            await conn.execute(text(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                "IF NEW.request_id = 'bad' THEN RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW; END $$ "
                "LANGUAGE plpgsql"
            ))
            await conn.execute(
                text("CREATE TRIGGER poison BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION poison()")
            )
    for rid in ("ok1", "bad", "ok2"):
        adm = await ledger_.admit(p, PRICING, rid, 10, 10)
        await ledger_.settle(adm, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING)
    await ledger_.flush()
    assert await usage_keys(db) == ["usage:ok1", "usage:ok2"]
    assert ledger_.failed_rows == 1 and ledger_.queued == 0  # dropped, not retried forever
    await ledger_.flush(release_all=True)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 40, 0)


async def test_capture_run_again_after_its_commit_changes_nothing(db: Database) -> None:
    book, p, _ = await setup(db, 10_000)
    adm = await book.admit(p, PRICING, "r1", 10, 100)  # holds 210
    batch = [Settlement("usage:r1:1", "r1", 50), Settlement("usage:r1", "r1", 70)]
    first = await book.capture(adm, batch, close=True)
    assert dict(first.charged) == {"usage:r1:1": 50, "usage:r1": 70} and first.written == {"usage:r1:1", "usage:r1"}
    again = await book.capture(adm, batch, close=True)  # as if the first reply had been lost
    assert dict(again.charged) == dict(first.charged) and again.written == frozenset()
    assert await check_invariants(db, book, p.account_id) == (10_000 - 120, 0)


async def test_a_captures_ledger_rows_are_written_column_by_column(db: Database) -> None:
    # Every column of the rows a capture inserts, in the batch's order: amounts, running
    # balances, the key, the shortfall memo of the charge the balance could not cover, and
    # one created_at for the batch that reads back as the aware UTC time it was written at.
    book, p, _ = await setup(db, 1_000)
    adm = await book.admit(p, PRICING, "r1", 10, 100)  # holds 210
    before = utcnow()
    batch = [Settlement("usage:r1:1", "r1", 150), Settlement("usage:r1:2", "r1", 600),
             Settlement("usage:r1", "r1", 900)]
    done = await book.capture(adm, batch, close=True)
    assert dict(done.charged) == {"usage:r1:1": 150, "usage:r1:2": 600, "usage:r1": 250}
    async with db.read() as conn:
        rows = (await conn.execute(
            select(ledger).where(ledger.c.kind == "usage").order_by(ledger.c.id))).mappings().all()
    assert [(r["idempotency_key"], r["amount"], r["balance_after"], r["reversed_after"], r["request_id"],
             r["key_id"], r["account_id"], r["memo"]) for r in rows] == [
        ("usage:r1:1", -150, 850, 0, "r1", p.key_id, p.account_id, None),
        ("usage:r1:2", -600, 250, 0, "r1", p.key_id, p.account_id, None),
        ("usage:r1", -250, 0, 0, "r1", p.key_id, p.account_id, "shortfall: cost 0.000900, charged 0.000250"),
    ]
    stamps = {r["created_at"] for r in rows}
    assert len(stamps) == 1
    (at,) = stamps
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite reads back naive UTC
    assert before <= at <= utcnow()
    assert await check_invariants(db, book, p.account_id) == (0, 0)


async def test_a_lost_reply_on_a_lease_flush_is_rewritten_once(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    clock = FakeClock()
    ledger_ = leased(book, db, writer, clock)
    adm = await ledger_.admit(p, PRICING, "r1", 10, 10)
    await ledger_.settle(adm, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING)
    lease = ledger_._leases[p.key_id]
    pending = list(lease.pending)
    held_before = lease.held
    await ledger_.flush()
    # The COMMIT went through but the gateway never heard: it still has the charge and the
    # old amount. The next flush must write nothing twice and learn the lease's real amount.
    lease.pending[:0] = pending
    lease.held = held_before
    await ledger_.flush()
    assert await usage_keys(db) == ["usage:r1"]
    assert lease.held == held_before - 20
    await assert_held_is_its_rows(db)
    await ledger_.flush(release_all=True)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)


async def test_a_lease_grown_without_hearing_back_is_released_in_full(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    ledger_ = leased(book, db, writer, FakeClock())
    adm = await ledger_.admit(p, PRICING, "r1", 10, 10)
    assert isinstance(adm, LeaseAdmission)
    async with db.write() as conn:  # a grow that committed while the gateway saw an error
        await conn.run_sync(settlement.hold, hold_id=adm.lease_id, account_id=p.account_id, key_id=p.key_id,
                            amount=60_480, grow=True)
    await assert_held_is_its_rows(db)
    await ledger_.settle(adm, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING)
    await ledger_.flush(release_all=True)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)
    assert await hold_rows(db) == {}


async def test_cost_beyond_the_hold_is_charged_from_the_balance_and_output_is_capped(db: Database) -> None:
    book, p, _ = await setup(db, 10_000)
    adm = await book.admit(p, PRICING, "r1", 10, 10, choices=2)  # 10 + 2 * 10 * 2 = 50 held
    assert adm.held == 50 and adm.output_limit == 20
    # The prompt was longer than estimated (charged in full: the balance allows it), and the
    # engine claims 500 output tokens of a request that could produce 20 (capped).
    charged = await book.settle(adm, Usage(input_tokens=300, output_tokens=500), status="ok", model="m",
                                pricing=PRICING)
    assert charged == 300 + 20 * 2
    assert (await book.entries(p.account_id))[0][0].memo is None  # no shortfall
    assert await check_invariants(db, book, p.account_id) == (10_000 - 340, 0)


async def test_n_choices_are_held_and_lowered_together(db: Database) -> None:
    book, p, _ = await setup(db, 1_000)
    adm = await book.admit(p, PRICING, "r1", 100, 1_000, choices=16)
    assert adm.max_output_tokens == (1_000 - 100) // 2 // 16 and adm.held <= 1_000
    try:
        await book.admit(p, PRICING, "r2", 1, 1, choices=16)
        raise AssertionError("16 choices cannot fit in what is left")
    except InsufficientCredits:
        pass


async def test_rehold_for_a_dearer_fallback_holds_the_difference_or_refuses(db: Database) -> None:
    book, p, writer = await setup(db, 1_000)
    ledger_ = leased(book, db, writer, FakeClock(), leases=False)
    free = await ledger_.admit(p, Pricing(), "r1", 10, 10)
    assert free.held == 0
    paid = await ledger_.rehold(free, PRICING)
    assert paid.held == 30 and (await hold_rows(db)) == {"r1": 30}
    assert await ledger_.settle(paid, Usage(input_tokens=10, output_tokens=10), status="ok", model="m",
                                pricing=PRICING) == 30
    dear = Pricing(input=Decimal("1000"), output=Decimal("1000"))
    cheap = await ledger_.admit(p, Pricing(), "r2", 10, 10)
    try:
        await ledger_.rehold(cheap, dear)
        raise AssertionError("a fallback the balance cannot cover must be refused")
    except InsufficientCredits:
        pass
    await ledger_.settle(cheap, None, status="error", model="m", pricing=dear)
    assert await check_invariants(db, book, p.account_id) == (1_000 - 30, 0)


async def test_long_streams_checkpoint_their_usage_on_the_clock(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    clock = FakeClock()
    ledger_ = leased(book, db, writer, clock, checkpoint_interval=2.0)
    adm = await ledger_.admit(p, PRICING, "s1", 10, 1_000)
    ledger_.checkpoint(adm, Usage(input_tokens=10, output_tokens=100))
    await ledger_.flush()
    assert await usage_keys(db) == []  # not yet: the interval has not passed
    clock.now += 2.5
    await ledger_.flush()
    assert await usage_keys(db) == ["usage:s1:1"]
    ledger_.checkpoint(adm, Usage(input_tokens=10, output_tokens=300))
    clock.now += 2.5
    await ledger_.flush()
    assert await usage_keys(db) == ["usage:s1:1", "usage:s1:2"]
    # The end charges the rest: the sum is the whole cost, once.
    await ledger_.settle(adm, Usage(input_tokens=10, output_tokens=400), status="ok", model="m", pricing=PRICING)
    await ledger_.flush(release_all=True)
    async with db.read() as conn:
        total = (await conn.execute(select(func.sum(ledger.c.amount)).where(ledger.c.request_id == "s1"))).scalar()
    assert total == -(10 + 400 * 2)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 810, 0)
    await writer.flush()
    assert writer.pending == 0


async def test_an_exact_settlement_during_an_outage_is_written_when_the_database_returns(db: Database) -> None:
    book, p, writer = await setup(db, 1_000)
    ledger_ = leased(book, db, writer, FakeClock(), leases=False)
    adm = await ledger_.admit(p, PRICING, "r1", 10, 10)
    real_write, real_run_write = db.write, db.run_write

    def unreachable() -> object:
        raise DatabaseUnavailable()

    async def run_unreachable(*args: object, **kwargs: object) -> object:
        raise DatabaseUnavailable()

    db.write = unreachable  # type: ignore[method-assign]
    db.run_write = run_unreachable  # type: ignore[method-assign]
    try:
        assert await ledger_.settle(adm, Usage(input_tokens=10, output_tokens=5), status="ok", model="m",
                                    pricing=PRICING) == 20
        assert not ledger_.ready and ledger_.queued == 1
        await ledger_.flush()
        assert ledger_.queued == 1  # still down: kept
        await assert_held_is_its_rows(db)
    finally:
        db.write, db.run_write = real_write, real_run_write  # type: ignore[method-assign]
    await ledger_.flush()
    assert ledger_.ready and ledger_.queued == 0
    assert await check_invariants(db, book, p.account_id) == (1_000 - 20, 0)
    assert await hold_rows(db) == {}


async def test_stale_leases_are_swept_by_row_and_a_live_one_is_kept(db: Database) -> None:
    book, p, writer = await setup(db, 1_000_000)
    clock = FakeClock()
    live = leased(book, db, writer, clock)
    adm = await live.admit(p, PRICING, "r1", 10, 10)
    assert [k for k in await hold_rows(db) if k.startswith(LEASE_PREFIX)]
    assert await book.release_stale_holds(timedelta(seconds=60), prefix=LEASE_PREFIX) == 0
    await live.settle(adm, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING)
    await live.flush(release_all=True)
    assert await check_invariants(db, book, p.account_id) == (1_000_000 - 20, 0)
