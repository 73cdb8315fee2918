"""The usage writer: batches, daily roll-ups, purge and queries."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.service import Accounts
from mesh.billing.ledger import Ledger
from mesh.billing.money import MicroCredits
from mesh.billing.usage import UsageRecord, UsageWriter, daily_usage, purge, recent_requests
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.store import Database
from mesh.store.tables import settlement_outbox, usage_records

NOON = datetime(2030, 5, 17, 12, 0, tzinfo=UTC)


def record(i: int, *, account: str = "acct_a", model: str = "m1", at: datetime = NOON) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{i}",
        account_id=account,
        key_id="key_1",
        model=model,
        status="ok",
        input_tokens=10,
        cached_tokens=2,
        output_tokens=5,
        reasoning_tokens=1,
        cost=MicroCredits(100),
        created_at=at,
    )


async def count_rows(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(usage_records))).scalar_one())


async def test_flush_writes_records_and_daily_rollups(db: Database) -> None:
    writer = UsageWriter(db)
    for i in range(5):
        writer.enqueue(record(i))
    writer.enqueue(record(5, model="m2"))
    writer.enqueue(record(6, at=NOON - timedelta(days=1)))
    writer.enqueue(record(7, account="acct_b"))
    assert await count_rows(db) == 0  # nothing touches the database before a flush
    assert await writer.flush() == 8
    assert writer.pending == 0 and await count_rows(db) == 8
    rows = await daily_usage(db, account_id="acct_a", days=7, now=NOON)
    got = {(r.day.isoformat(), r.model): (r.requests, r.input_tokens, r.output_tokens, r.cost) for r in rows}
    assert got == {
        ("2030-05-16", "m1"): (1, 10, 5, 100),
        ("2030-05-17", "m1"): (5, 50, 25, 500),
        ("2030-05-17", "m2"): (1, 10, 5, 100),
    }
    everyone = await daily_usage(db, days=1, now=NOON)
    assert {(r.account_id, r.model, r.requests) for r in everyone} == {
        ("acct_a", "m1", 5),
        ("acct_a", "m2", 1),
        ("acct_b", "m1", 1),
    }


async def test_rollups_accumulate_across_batches(db: Database) -> None:
    writer = UsageWriter(db, batch_size=3)
    for i in range(10):
        writer.enqueue(record(i))
    await writer.flush()
    for i in range(10, 12):
        writer.enqueue(record(i))
    await writer.flush()
    (row,) = await daily_usage(db, account_id="acct_a", days=1, now=NOON)
    assert (row.requests, row.cached_tokens, row.reasoning_tokens, row.cost) == (12, 24, 12, 1200)


async def test_a_batch_larger_than_one_statement_is_written_whole_and_rolled_up_once(db: Database) -> None:
    """SQLite gets many rows per statement, in chunks of 500: a batch of 1,201 (three chunks,
    the last of one row) over hundreds of days goes in whole, with its settlement-stream
    outbox rows on both databases, and writing it again adds nothing."""
    from mesh.billing.stream import outbox_row
    from mesh.billing.usage import write_batch

    start = NOON - timedelta(days=400)
    records = [record(i, account=f"acct_{i % 3}", model=f"m{i % 2}", at=start + timedelta(hours=8 * i))
               for i in range(1201)]
    await write_batch(db, records, outbox=True)
    await write_batch(db, records[:700], outbox=True)  # a retry after a lost COMMIT reply, part of it
    assert await count_rows(db) == 1201
    async with db.read() as conn:  # each record once in the settlement stream's outbox too
        assert (await conn.execute(select(func.count()).select_from(settlement_outbox))).scalar_one() == 1201
        for r in (records[0], records[777], records[1200]):  # as Core binds them, in any chunk
            row = (await conn.execute(select(settlement_outbox).where(settlement_outbox.c.request_id == r.request_id))
                   ).one()
            want = outbox_row(r)
            assert (row.payload, row.created_at, row.claimed_until, row.attempts) == (
                want["payload"], want["created_at"], None, 0)
    rows = await daily_usage(db, days=800, now=NOON)
    assert sum(r.requests for r in rows) == 1201 and sum(r.cost for r in rows) == 1201 * 100
    assert sum(r.cached_tokens for r in rows) == 1201 * 2


async def test_background_task_flushes_on_interval_and_batch_size(db: Database) -> None:
    writer = UsageWriter(db, flush_interval=3600, batch_size=4)
    await writer.start()
    try:
        for i in range(4):
            writer.enqueue(record(i))  # a full batch wakes the writer at once
        for _ in range(200):
            if await count_rows(db) == 4:
                break
            await asyncio.sleep(0.01)
        assert await count_rows(db) == 4
        writer.enqueue(record(9))
    finally:
        await writer.aclose()  # flushes the rest
    assert await count_rows(db) == 5


async def test_buffer_is_bounded(db: Database) -> None:
    writer = UsageWriter(db, max_pending=3)
    for i in range(5):
        writer.enqueue(record(i))
    assert writer.pending == 3 and writer.dropped == 2


async def test_purge_keeps_rollups(db: Database) -> None:
    writer = UsageWriter(db)
    writer.enqueue(record(1, at=NOON - timedelta(days=100)))
    writer.enqueue(record(2, at=NOON))
    await writer.flush()
    assert await purge(db, 90, now=NOON) == 1
    assert await count_rows(db) == 1
    rows = await daily_usage(db, account_id="acct_a", days=365, now=NOON)
    assert len(rows) == 2


async def test_settle_feeds_writer_and_recent_requests(db: Database) -> None:
    accounts = Accounts(db)
    account = await accounts.create("a")
    key = await accounts.create_key(account.id)
    writer = UsageWriter(db)
    book = Ledger(db, writer)
    await book.grant(account.id, MicroCredits(1_000_000))
    principal = await KeyAuthenticator(db).authenticate(key.key)
    pricing = Pricing(input=Decimal("1"), output=Decimal("1"))
    for i in range(3):
        adm = await book.admit(principal, pricing, f"req_{i}", 10, 10)
        await book.settle(
            adm,
            Usage(input_tokens=10, output_tokens=i),
            status="ok",
            model="m",
            pricing=pricing,
            replica="r",
            protocol="chat",
            ttft_ms=5,
            duration_ms=9,
        )
    await writer.aclose()
    recent = await recent_requests(db, account.id)
    assert [r.request_id for r in recent] == ["req_2", "req_1", "req_0"]
    assert recent[0].cost == 12 and recent[0].replica == "r" and recent[0].ttft_ms == 5
    (today,) = await daily_usage(db, account_id=account.id)
    assert today.requests == 3 and today.cost == 10 + 11 + 12


async def test_every_field_reads_back_as_written_and_a_retry_adds_nothing(db: Database) -> None:
    # The writer binds plain SQL itself (not through Core): what Core reads back must be
    # exactly the record, on both databases, attribution and an offset timestamp included.
    from datetime import timezone

    from mesh.billing.usage import generation, write_batch

    full = UsageRecord(
        request_id="req_full", account_id="acct_a", key_id=None, model="m1", status="error",
        input_tokens=7, cached_tokens=3, output_tokens=9, reasoning_tokens=4, cost=MicroCredits(12345),
        replica="r1", protocol="anthropic.messages", ttft_ms=12, duration_ms=340,
        created_at=datetime(2030, 5, 17, 23, 30, 1, 123456, tzinfo=timezone(timedelta(hours=-2))),
        end_user="user-7", tags=("a", "b"), metadata={"k": "v", "é": "ü"},
    )
    bare = record(1)  # no attribution: tags () and metadata None
    await write_batch(db, [full, bare])
    await write_batch(db, [full, bare])  # a retry after a lost COMMIT reply: skipped
    assert await count_rows(db) == 2
    got = await generation(db, "acct_a", "req_full")
    assert got == replace(full, created_at=full.created_at.astimezone(UTC))
    assert await generation(db, "acct_a", "req_1") == bare
    rows = await daily_usage(db, account_id="acct_a", days=2, now=datetime(2030, 5, 18, 12, tzinfo=UTC))
    # 23:30 at UTC-2 is 01:30 the next day in UTC: the roll-up counts it on that day.
    assert {(r.day.isoformat(), r.requests, r.cost) for r in rows} == {("2030-05-17", 1, 100), ("2030-05-18", 1, 12345)}


async def test_a_record_the_database_refuses_does_not_block_the_others(db: Database) -> None:
    writer = UsageWriter(db)
    writer.enqueue(record(1))
    writer.enqueue(replace(record(2), metadata={"unstorable": {1, 2}}))  # no JSON for a set
    writer.enqueue(record(3))
    assert await writer.flush() == 2  # the two good ones, in spite of the bad one between them
    assert writer.pending == 0 and writer.failed_records == 1
    assert await count_rows(db) == 2
    writer.enqueue(record(4))  # and the queue moves on
    assert await writer.flush() == 1 and await count_rows(db) == 3


def test_sqlite_timestamps_are_the_text_strftime_made() -> None:
    # The writer formats created_at without strftime; the text SQLAlchemy reads back must
    # not change (whole seconds keep their .000000, early years their padding).
    from datetime import timezone

    from mesh.billing.usage import _row
    from mesh.store.sqlite_rows import DATETIME_FORMAT

    for at in (NOON, NOON.replace(microsecond=7), datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),
               datetime(2030, 5, 17, 23, 30, 0, 999999, tzinfo=timezone(timedelta(hours=-3)))):
        row = _row(record(1, at=at), False)
        assert row[14] == at.astimezone(UTC).replace(tzinfo=None).strftime(DATETIME_FORMAT)
        assert _row(record(1, at=at), True)[14] == at
