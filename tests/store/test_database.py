"""The database handle: URLs, migrations, SQLite settings and the money CHECKs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from mesh.errors import DatabaseUnavailable
from mesh.store import Database, head_revision, normalize_url, utcnow
from mesh.store import database as database_module
from mesh.store.database import _head_from_files
from mesh.store.tables import accounts, metadata


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x/mesh.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///x/mesh.db", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg"),
    ],
)
def test_normalize_url_uses_async_drivers(url: str, driver: str) -> None:
    assert normalize_url(url).drivername == driver


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://u@h/db"])
def test_normalize_url_rejects_unsupported(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(url)


async def test_database_creates_sqlite_parent_dir(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/a/b/mesh.db")
    try:
        await db.migrate()
        assert (tmp_path / "a" / "b" / "mesh.db").exists()
    finally:
        await db.aclose()


async def test_database_repr_hides_password() -> None:
    db = Database("postgresql://mesh:secret@127.0.0.1/x")
    try:
        assert "secret" not in repr(db)
    finally:
        await db.aclose()


async def test_migrate_is_idempotent_and_at_head(db: Database) -> None:
    await db.migrate()
    assert await db.current_revision() == head_revision()


def test_head_read_from_the_files_is_alembics_head() -> None:
    # migrate() skips Alembic when the schema is at this head: it must be Alembic's own.
    assert _head_from_files() == head_revision()


async def test_alembic_runs_only_for_a_schema_not_at_head(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(database_module, "_upgrade_to_head", lambda conn: ran.append("upgrade"))
    await db.migrate()
    assert ran == []  # at head: one SELECT, no Alembic
    async with db.write() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": "0001"})
    await db.migrate()
    assert ran == ["upgrade"]  # behind the files: Alembic decides


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata))


async def test_migrations_match_table_metadata(db: Database) -> None:
    async with db.read() as conn:
        diff = await conn.run_sync(_diff)
    assert diff == []


async def test_sqlite_runs_wal_with_foreign_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/mesh.db")
    try:
        async with db.read() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() >= 1000
    finally:
        await db.aclose()


async def _new_account(db: Database, balance: int = 0, held: int = 0) -> str:
    async with db.write() as conn:
        await conn.execute(
            insert(accounts).values(id="acct_x", name="x", balance=balance, held=held, created_at=utcnow())
        )
    return "acct_x"


@pytest.mark.parametrize(("balance", "held"), [(-1, 0), (5, 6), (5, -1)])
async def test_checks_keep_balance_at_least_held_at_least_zero(db: Database, balance: int, held: int) -> None:
    account_id = await _new_account(db, 10, 0)
    with pytest.raises(IntegrityError):
        async with db.write() as conn:
            await conn.execute(update(accounts).where(accounts.c.id == account_id).values(balance=balance, held=held))


async def test_write_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await conn.execute(insert(accounts).values(id="acct_y", name="y", balance=0, held=0, created_at=utcnow()))
            raise RuntimeError("boom")
    async with db.read() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM accounts"))).scalar() == 0


async def test_foreign_keys_enforced(db: Database) -> None:
    with pytest.raises(IntegrityError):
        async with db.write() as conn:
            await conn.execute(
                text(
                    "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, spent, held, created_at)"
                    " VALUES ('key_1', 'acct_missing', '', 'p', 'h', 0, 0, :t)"
                ),
                {"t": utcnow() if db.dialect == "postgresql" else utcnow().replace(tzinfo=None).isoformat()},
            )


async def test_session_reads(db: Database) -> None:
    await _new_account(db, 7)
    async with db.session() as session:
        assert (await session.execute(text("SELECT balance FROM accounts"))).scalar() == 7


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_connection_lost_mid_transaction_is_told_from_no_connection_at_all(db: Database) -> None:
    # Lost mid-transaction (the server ends this very session): the database answered a
    # moment ago and the write may or may not have committed; callers whose writes are safe
    # to repeat try once more on a fresh connection.
    with pytest.raises(DatabaseUnavailable) as lost:
        async with db.write() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    assert lost.value.connection_lost
    async with db.write() as conn:  # the pool hands out a live connection next
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    # Nothing listening: no connection at all, an outage.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    nowhere = Database(f"postgresql://postgres@127.0.0.1:{closed_port}/none")
    try:
        with pytest.raises(DatabaseUnavailable) as refused:
            async with nowhere.write() as conn:
                await conn.execute(text("SELECT 1"))
        assert not refused.value.connection_lost
    finally:
        await nowhere.aclose()


# -- run_write: a whole transaction as one synchronous function -----------------------------------


def _writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("mesh-sqlite-writer")}


def _insert_account(conn: Connection, account_id: str, balance: int) -> int:
    conn.execute(insert(accounts).values(id=account_id, name="x", balance=balance, held=0, created_at=utcnow()))
    return balance


async def _balances(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        return {r[0]: r[1] for r in await conn.execute(text("SELECT id, balance FROM accounts"))}


async def test_run_write_commits_what_its_function_did_and_returns_its_result(db: Database) -> None:
    assert await db.run_write(_insert_account, "acct_a", 5) == 5
    assert await _balances(db) == {"acct_a": 5}


async def test_run_write_rolls_back_and_raises_what_its_function_raised(db: Database) -> None:
    def half_then_fail(conn: Connection) -> None:
        _insert_account(conn, "acct_b", 1)
        conn.execute(update(accounts).where(accounts.c.id == "acct_b").values(held=2))  # held > balance: CHECK

    with pytest.raises(IntegrityError):
        await db.run_write(half_then_fail)

    class Boom(Exception):
        pass

    def boom(conn: Connection) -> None:
        _insert_account(conn, "acct_c", 1)
        raise Boom

    with pytest.raises(Boom):
        await db.run_write(boom)
    assert await _balances(db) == {}


async def test_run_write_on_sqlite_keeps_foreign_keys_and_takes_the_write_lock_up_front(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/mesh.db")
    try:
        await db.migrate()

        def settings(conn: Connection) -> tuple[object, object, bool]:
            fk = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            return fk, mode, conn.connection.dbapi_connection.in_transaction  # type: ignore[union-attr]

        assert await db.run_write(settings) == (1, "wal", True)
        with pytest.raises(IntegrityError):  # a key of an account that does not exist
            await db.run_write(lambda conn: conn.exec_driver_sql(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, spent, held, created_at)"
                " VALUES ('key_1', 'acct_missing', '', 'p', 'h', 0, 0, '2026-01-01 00:00:00')"))
    finally:
        await db.aclose()


async def test_a_cancelled_run_write_rolls_back_and_keeps_the_lock_until_its_thread_is_done(tmp_path: Path) -> None:
    # The thread cannot be stopped mid-transaction: a caller cancelled meanwhile must not let
    # the next writer in before it ends (it would wait in SQLite's busy handler, or interleave).
    db = Database(f"sqlite:///{tmp_path}/mesh.db")
    try:
        await db.migrate()
        started, go = threading.Event(), threading.Event()

        def slow(conn: Connection) -> None:
            _insert_account(conn, "acct_slow", 1)
            started.set()
            assert go.wait(10)

        first = asyncio.create_task(db.run_write(slow))
        assert await asyncio.to_thread(started.wait, 10)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert db._write_lock is not None and db._write_lock.locked()  # for the thread, not the caller
        second = asyncio.create_task(db.run_write(_insert_account, "acct_next", 2))

        async def write_one() -> None:
            async with db.write() as conn:
                await conn.execute(text("SELECT 1"))

        third = asyncio.create_task(write_one())
        await asyncio.sleep(0.1)
        assert not second.done() and not third.done()  # the first transaction is still open
        go.set()
        async with asyncio.timeout(10):
            assert await second == 2
            await third
        # The cancelled caller's transaction was rolled back before COMMIT, as on PostgreSQL.
        assert await _balances(db) == {"acct_next": 2}
    finally:
        await db.aclose()


async def test_aclose_waits_for_run_writes_and_leaves_no_writer_thread(tmp_path: Path) -> None:
    # aclose() racing a run_write queued on the lock must leave a Database that still works
    # (a later run_write makes a new writer; the next aclose stops it) and no thread behind.
    before = _writer_threads()  # other tests' databases, left open, may still have theirs
    db = Database(f"sqlite:///{tmp_path}/mesh.db")
    await db.migrate()

    def slow(conn: Connection) -> int:
        time.sleep(0.3)
        return 1

    first = asyncio.ensure_future(db.run_write(slow))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(db.run_write(lambda conn: 2))
    await asyncio.sleep(0.01)
    await db.aclose()
    assert await first == 1 and await queued == 2
    try:
        assert await db.run_write(lambda conn: conn.execute(text("SELECT 3")).scalar_one()) == 3
        async with db.write() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await db.aclose()
    await asyncio.sleep(0.1)
    assert _writer_threads() - before == set()


async def test_aclose_with_the_first_run_write_queued_leaves_no_writer_thread(tmp_path: Path) -> None:
    # A run_write queued on the lock (behind a write()) before the database's first writer
    # exists: aclose() must wait for it too, or its writer thread is made after aclose()
    # returned and nobody ever stops it (nor disposes its engine).
    before = _writer_threads()
    db = Database(f"sqlite:///{tmp_path}/mesh.db")
    await db.migrate()
    async with db.write():  # holds the write lock, as release_stale_holds or the careful hold do
        queued = asyncio.ensure_future(db.run_write(lambda conn: 2))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(db.aclose())
        await asyncio.sleep(0.05)
    await closing
    assert await queued == 2
    await asyncio.sleep(0.1)
    assert db._writer is None
    assert _writer_threads() - before == set()


_FIRST_ERROR = """
import asyncio, sys
from sqlalchemy import text
from mesh.errors import DatabaseUnavailable
from mesh.store import Database

async def main() -> None:
    assert "asyncpg" not in sys.modules, "asyncpg loaded before the database was made"
    db = Database(sys.argv[1])
    try:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))
    except DatabaseUnavailable as exc:
        print("unavailable", type(exc.__cause__).__name__)
    except Exception as exc:
        print("raised", type(exc).__name__, exc)
    else:
        print("connected")
    await db.engine.dispose()

asyncio.run(main())
"""


def _refusing_postgres(code: str) -> socket.socket:
    """A server that answers PostgreSQL's startup (after declining SSL) with a FATAL ``code``."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while True:
                    size = conn.recv(4)
                    if len(size) < 4:
                        break
                    rest = b""
                    while len(rest) < int.from_bytes(size, "big") - 4:
                        rest += conn.recv(65536)
                    if rest[:4] == (80877103).to_bytes(4, "big"):  # SSLRequest
                        conn.sendall(b"N")
                        continue
                    fields = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0Mrefused by the test\0\0"
                    conn.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)
                    break

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize("code", ["53300", "57P03"])  # too many connections; the database is starting up
def test_a_postgres_refusal_before_any_connection_of_the_process_is_unavailable(code: str) -> None:
    """The first error of a process that never connected (asyncpg not imported before the
    engine was made) is told as an outage, like every later one."""
    server = _refusing_postgres(code)
    try:
        port = server.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-c", _FIRST_ERROR, f"postgresql://mesh@127.0.0.1:{port}/test"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        server.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "unavailable", out.stdout + out.stderr
