"""Usage records: written in batches off the request path, rolled up per day and model.

The ledger is the source of truth for money; these rows are the per-request detail and
the daily summary that dashboards and ``GET /v1/usage`` read. :class:`UsageWriter` owns a
buffer and one background task that inserts the raw rows and upserts ``usage_daily``
(``INSERT … ON CONFLICT DO UPDATE``) in one transaction every ``flush_interval`` seconds,
or sooner once ``batch_size`` records wait. A failed flush keeps its records for the next
try; past ``max_pending`` new records are dropped (and counted) rather than eat memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import chain
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError

from mesh.billing.money import MicroCredits
from mesh.billing.stream import outbox_row
from mesh.store import Database, sqlite_rows, utcnow
from mesh.store.tables import settlement_outbox, usage_daily, usage_records
from mesh.store.types import as_utc

DEFAULT_FLUSH_INTERVAL = 0.5
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_PENDING = 100_000
ZERO = MicroCredits(0)
_SUMS = ("requests", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost")

log = logging.getLogger(__name__)
# What a database answers for a record it will never take (not an outage): dropped, not retried.
_REFUSED = (DataError, IntegrityError, ValueError, TypeError)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One finished request. ``cost`` is what the ledger charged, in micro-credits."""

    request_id: str
    account_id: str
    key_id: str | None
    model: str
    status: str
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost: MicroCredits = ZERO
    replica: str | None = None
    protocol: str | None = None
    ttft_ms: int | None = None
    duration_ms: int | None = None
    created_at: datetime = field(default_factory=utcnow)
    end_user: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] | None = None
    finish_reason: str | None = None  # stop, length, tool_calls, content_filter, error; None: none came


@dataclass(frozen=True, slots=True)
class DailyUsage:
    """One account's (or, with ``account_id=None``, everyone's) use of a model on a UTC day."""

    account_id: str | None
    day: date
    model: str
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost: MicroCredits


class UsageWriter:
    """Batches usage records into the database. Owns one background task between
    :meth:`start` and :meth:`aclose`; :meth:`flush` writes everything pending now."""

    def __init__(
        self,
        db: Database,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        outbox: bool = False,
    ) -> None:
        self.db = db
        self.outbox = outbox  # also queue each record for the settlement webhook stream
        self._interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._buffer: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.failed_records = 0  # refused by the database (a bug or bad data), logged and dropped

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def enqueue(self, record: UsageRecord) -> None:
        """Queue a record for the next batch. Never blocks and never touches the database."""
        if len(self._buffer) >= self._max_pending:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("usage buffer full (%d records): %d records dropped", self._max_pending, self.dropped)
            return
        self._buffer.append(record)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    async def start(self) -> None:
        """Start the background flusher (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mesh-usage-writer")

    async def flush(self) -> int:
        """Write every pending record now; returns how many. Raises if the database fails
        (the records stay queued)."""
        written = 0
        async with self._flush_lock:
            while self._buffer:
                batch = self._buffer[: self._batch_size]
                del self._buffer[: len(batch)]
                try:
                    await write_batch(self.db, batch, outbox=self.outbox)
                except _REFUSED:
                    # One record the database refuses (bad data, a constraint) must not block
                    # every later one, as the lease flusher isolates a bad charge: write them
                    # one by one and drop only those refused. Anything else (an outage, a
                    # lock, a deadlock) keeps them all queued. A record already written is
                    # skipped, not doubled.
                    log.exception("writing %d usage records failed; isolating the bad one", len(batch))
                    written += await self._one_by_one(batch)
                    continue
                except BaseException:
                    self._buffer[:0] = batch
                    raise
                written += len(batch)
        return written

    async def _one_by_one(self, batch: list[UsageRecord]) -> int:
        written = 0
        for i, record in enumerate(batch):
            try:
                await write_batch(self.db, [record], outbox=self.outbox)
            except _REFUSED:
                self.failed_records += 1
                log.exception("dropping the usage record of %s: the database refuses it", record.request_id)
            except BaseException:
                self._buffer[:0] = batch[i:]
                raise
            else:
                written += 1
        return written

    async def aclose(self) -> None:
        """Stop the background task and flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("could not write %d usage records; will retry", len(self._buffer))


def _day(ts: datetime) -> date:
    return (ts if ts.tzinfo is UTC else ts.astimezone(UTC)).date()


async def write_batch(db: Database, records: Sequence[UsageRecord], *, outbox: bool = False) -> None:
    """Insert ``records`` and add them to the daily roll-up, in one transaction. Records of
    requests already written are skipped, so a retry after a lost COMMIT reply adds nothing.

    Plain SQL in the driver's own parameter style, executed many at a time: building these
    statements through SQLAlchemy Core cost about 0.1 ms of CPU per request (bench/). The
    values are the ones Core would bind (see :func:`_row`). With ``outbox``, each record also
    goes to the settlement stream's outbox in the same transaction. The transaction is one
    :meth:`Database.run_write` (on SQLite, one hand-over to its writer thread)."""
    if records:
        await db.run_write(_write_batch, list(records), outbox)


def _write_batch(conn: Connection, records: list[UsageRecord], outbox: bool) -> None:
    pg = conn.dialect.name == "postgresql"
    ids = [r.request_id for r in records]
    if pg:
        found = conn.exec_driver_sql(_SEEN_PG, (ids,))
    else:
        marks = ",".join("?" * len(ids))
        found = conn.exec_driver_sql(f"SELECT request_id FROM usage_records WHERE request_id IN ({marks})",
                                     tuple(ids))
    seen = {row[0] for row in found.fetchall()}
    records = [r for r in records if r.request_id not in seen]
    if not records:
        return
    if pg:
        conn.exec_driver_sql(_INSERT_PG, [_row(r, pg) for r in records])
        conn.exec_driver_sql(_UPSERT_DAILY_PG, _daily(records, pg))
    else:  # many rows per statement, not an executemany (mesh.store.sqlite_rows)
        _many_rows(conn, _INSERT_SQLITE, [_row(r, pg) for r in records])
        _many_rows(conn, _UPSERT_DAILY_SQLITE, _daily(records, pg))
    if outbox:
        rows = [outbox_row(r) for r in records]
        if pg:
            conn.execute(insert(settlement_outbox), rows)
        else:  # as above: one statement per chunk, not a step (and a GIL hand-over) per row
            for chunk in sqlite_rows.chunks(rows):
                conn.execute(insert(settlement_outbox).values(list(chunk)))


_COLUMNS = (
    "request_id", "account_id", "key_id", "model", "replica", "protocol", "input_tokens", "cached_tokens",
    "output_tokens", "reasoning_tokens", "cost", "status", "ttft_ms", "duration_ms", "created_at", "end_user",
    "tags", "meta", "finish_reason",
)
_SEEN_PG = "SELECT request_id FROM usage_records WHERE request_id = ANY($1::text[])"
_INSERT_PG = (
    f"INSERT INTO usage_records ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_COLUMNS) + 1))})"
)
_INSERT_SQLITE = f"INSERT INTO usage_records ({', '.join(_COLUMNS)}) VALUES {{rows}}"
_DAILY = ("account_id", "day", "model", *_SUMS)
_UPDATE = ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in _SUMS)
_UPSERT_DAILY_PG = (
    f"INSERT INTO usage_daily ({', '.join(_DAILY)}) VALUES ({', '.join(f'${i}' for i in range(1, len(_DAILY) + 1))}) "
    f"ON CONFLICT (account_id, day, model) DO UPDATE SET {_UPDATE}"
)
_UPSERT_DAILY_SQLITE = (
    f"INSERT INTO usage_daily ({', '.join(_DAILY)}) VALUES {{rows}} "
    f"ON CONFLICT (account_id, day, model) DO UPDATE SET {_UPDATE}"
)


def _many_rows(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """``sql`` (with ``{rows}`` where its VALUES go) for ``rows``, a statement per chunk."""
    for chunk in sqlite_rows.chunks(rows):
        conn.exec_driver_sql(sql.format(rows=sqlite_rows.values(len(chunk), len(chunk[0]))),
                             tuple(chain.from_iterable(chunk)))


def _json(value: Any) -> str:
    # As SQLAlchemy's JSON type binds: None is JSON null, not SQL NULL. Most requests have
    # neither tags nor metadata: json.dumps was a fifth of the usage writer's CPU.
    return "null" if value is None else json.dumps(value)


def _row(r: UsageRecord, pg: bool) -> tuple[Any, ...]:
    at = r.created_at
    tags, meta = r.tags, r.metadata
    return (
        r.request_id, r.account_id, r.key_id, r.model, r.replica, r.protocol, r.input_tokens, r.cached_tokens,
        r.output_tokens, r.reasoning_tokens, int(r.cost), r.status, r.ttft_ms, r.duration_ms,
        as_utc(at) if pg else sqlite_rows.datetime_text(at), r.end_user,
        "null" if not tags else _json(list(tags)), "null" if meta is None else _json(dict(meta)), r.finish_reason,
    )


def _daily(records: Sequence[UsageRecord], pg: bool) -> list[tuple[Any, ...]]:
    # Pre-aggregated per key: PostgreSQL refuses a multi-row upsert that hits one key twice.
    daily: dict[tuple[str, date, str], list[int]] = {}
    for r in records:
        d = daily.setdefault((r.account_id, _day(r.created_at), r.model), [0] * len(_SUMS))
        d[0] += 1
        d[1] += r.input_tokens
        d[2] += r.cached_tokens
        d[3] += r.output_tokens
        d[4] += r.reasoning_tokens
        d[5] += int(r.cost)
    return [(a, day if pg else day.isoformat(), m, *sums) for (a, day, m), sums in daily.items()]


async def purge(db: Database, retention_days: int, *, now: datetime | None = None) -> int:
    """Delete raw usage rows older than ``retention_days``; daily roll-ups stay. Returns the count."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    async with db.write() as conn:
        result = await conn.execute(delete(usage_records).where(usage_records.c.created_at < cutoff))
    return int(result.rowcount)


async def daily_usage(
    db: Database, *, account_id: str | None = None, days: int = 30, now: datetime | None = None
) -> list[DailyUsage]:
    """Usage per UTC day and model over the last ``days`` days (today included), oldest first.

    With ``account_id`` only that account's rows; without it, one row per account, day and
    model (for operators).
    """
    since = _day(now or utcnow()) - timedelta(days=max(1, days) - 1)
    q = select(usage_daily).where(usage_daily.c.day >= since)
    if account_id is not None:
        q = q.where(usage_daily.c.account_id == account_id)
    q = q.order_by(usage_daily.c.day, usage_daily.c.account_id, usage_daily.c.model)
    async with db.read() as conn:
        result = await conn.execute(q)
        return [
            DailyUsage(
                account_id=r.account_id,
                day=r.day,
                model=r.model,
                requests=r.requests,
                input_tokens=r.input_tokens,
                cached_tokens=r.cached_tokens,
                output_tokens=r.output_tokens,
                reasoning_tokens=r.reasoning_tokens,
                cost=MicroCredits(r.cost),
            )
            for r in result
        ]


async def last_use_by_key(db: Database, account_id: str) -> dict[str, datetime]:
    """Key id → the time of its newest usage record (the console's key list)."""
    q = (
        select(usage_records.c.key_id, func.max(usage_records.c.created_at).label("at"))
        .where(usage_records.c.account_id == account_id)
        .group_by(usage_records.c.key_id)
    )
    async with db.read() as conn:
        return {r.key_id: r.at for r in await conn.execute(q) if r.key_id is not None}


async def recent_requests(db: Database, account_id: str, *, limit: int = 50) -> list[UsageRecord]:
    """The account's latest usage records, newest first."""
    q = (
        select(usage_records)
        .where(usage_records.c.account_id == account_id)
        .order_by(usage_records.c.created_at.desc(), usage_records.c.id.desc())
        .limit(max(1, min(limit, 1000)))
    )
    async with db.read() as conn:
        return [record_from_row(r) for r in await conn.execute(q)]


def record_from_row(r: Any) -> UsageRecord:
    """A :class:`UsageRecord` from a ``usage_records`` row."""
    return UsageRecord(
        request_id=r.request_id,
        account_id=r.account_id,
        key_id=r.key_id,
        model=r.model,
        status=r.status,
        input_tokens=r.input_tokens,
        cached_tokens=r.cached_tokens,
        output_tokens=r.output_tokens,
        reasoning_tokens=r.reasoning_tokens,
        cost=MicroCredits(r.cost),
        replica=r.replica,
        protocol=r.protocol,
        ttft_ms=r.ttft_ms,
        duration_ms=r.duration_ms,
        created_at=r.created_at,
        end_user=r.end_user,
        tags=tuple(r.tags or ()),
        metadata=r.meta,
        finish_reason=r.finish_reason,
    )


async def generation(db: Database, account_id: str, request_id: str) -> UsageRecord | None:
    """The account's usage record of one request (None: unknown, or another account's)."""
    q = select(usage_records).where(usage_records.c.request_id == request_id, usage_records.c.account_id == account_id)
    async with db.read() as conn:
        row = (await conn.execute(q.order_by(usage_records.c.id).limit(1))).first()
    return None if row is None else record_from_row(row)


GROUPS = ("user", "tag", "key", "model")


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """One group of a breakdown: ``value`` None is the requests without one (no end user,
    no tags)."""

    value: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cost: MicroCredits


async def usage_by(
    db: Database, account_id: str, group_by: str, *, days: int = 30, now: datetime | None = None
) -> list[UsageGroup]:
    """The account's raw usage rows of the last ``days`` UTC days (today included, within the
    retention) summed by end user, tag, key or model; dearest first. A request with several
    tags counts once under each of them."""
    since = datetime.combine(_day(now or utcnow()) - timedelta(days=max(1, days) - 1), datetime.min.time(), UTC)
    where = (usage_records.c.account_id == account_id) & (usage_records.c.created_at >= since)
    sums: dict[str | None, list[int]] = {}
    if group_by == "tag":
        q = select(
            usage_records.c.tags, usage_records.c.input_tokens, usage_records.c.output_tokens, usage_records.c.cost
        ).where(where)
        async with db.read() as conn:
            for r in await conn.execute(q):
                for tag in r.tags or [None]:
                    s = sums.setdefault(tag, [0, 0, 0, 0])
                    s[0] += 1
                    s[1] += r.input_tokens
                    s[2] += r.output_tokens
                    s[3] += r.cost
    else:
        col = {"user": usage_records.c.end_user, "key": usage_records.c.key_id, "model": usage_records.c.model}[
            group_by
        ]
        q = (
            select(
                col.label("value"), func.count().label("n"), func.sum(usage_records.c.input_tokens).label("i"),
                func.sum(usage_records.c.output_tokens).label("o"), func.sum(usage_records.c.cost).label("c"),
            )
            .where(where)
            .group_by(col)
        )
        async with db.read() as conn:
            for r in await conn.execute(q):
                sums[r.value] = [int(r.n), int(r.i or 0), int(r.o or 0), int(r.c or 0)]
    groups = [UsageGroup(v, s[0], s[1], s[2], MicroCredits(s[3])) for v, s in sums.items()]
    return sorted(groups, key=lambda g: (-g.cost, -g.requests, g.value or ""))
