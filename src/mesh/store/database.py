"""The database handle: one async engine, sessions, write transactions and migrations.

``Database(url)`` accepts ``sqlite:///path``, ``sqlite+aiosqlite:///path``,
``postgresql://…``, ``postgres://…`` and ``postgresql+asyncpg://…`` and always runs on
the async drivers (aiosqlite, asyncpg).

SQLite runs in WAL mode with a busy timeout and foreign keys on. Its transactions are
started by Mesh itself (the driver's implicit BEGIN is turned off): :meth:`Database.write`
opens ``BEGIN IMMEDIATE`` so that the write lock is taken up front and two concurrent
read-modify-write transactions can never interleave; within one process, writers also
queue on an ``asyncio.Lock`` instead of spinning in SQLite's busy handler. On PostgreSQL
writes rely on row locks and conditional updates under READ COMMITTED.

:meth:`Database.run_write` runs a whole write transaction as one synchronous function: on
PostgreSQL through the async connection (``run_sync``), on SQLite in one thread of its own
on a synchronous connection, handed over once. Through aiosqlite every statement is several
hand-offs between its thread and the event loop, and each waits for a busy loop's next turn:
measured under load (bench/), a capture of the credit flusher made 38 of them and took about
100 ms, holding the one write lock that admission's lease grows wait for.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from mesh.errors import DatabaseUnavailable
from mesh.store.errors import is_unavailable

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_POOL_SIZE = 10
POSTGRES_MAX_OVERFLOW = 20
# Seconds before an unreachable PostgreSQL turns into DatabaseUnavailable instead of a hang.
POSTGRES_CONNECT_TIMEOUT = 5.0
POSTGRES_POOL_TIMEOUT = 10.0
# pg_advisory_xact_lock key held while migrating, so that gateway replicas starting
# together run the migrations once, one after another.
MIGRATION_LOCK_KEY = 0x6D657368  # "mesh"
_IMMEDIATE = "mesh_begin_immediate"
_NO_FOREIGN_KEYS = "mesh_no_foreign_keys"

Dialect = Literal["sqlite", "postgresql"]
P = ParamSpec("P")
T = TypeVar("T")


@contextmanager
def _mapped_errors(*, connected: bool = False) -> Iterator[None]:
    """Connection failures become DatabaseUnavailable; everything else passes through.
    ``connected``: a connection was had, so a failure is one lost mid-transaction."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(connection_lost=connected) from exc
        raise


def normalize_url(url: str | URL) -> URL:
    """Map a database URL onto its async driver; raise ``ValueError`` if it is unsupported."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if not u.database or u.database == ":memory:":
            raise ValueError("in-memory SQLite is not supported: give a file path (sqlite:///path/to/mesh.db)")
        return u.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database URL scheme {u.drivername!r}: use sqlite:/// or postgresql://")


class Database:
    """An async engine plus the transaction helpers every store module uses.

    Use :meth:`read` for queries, :meth:`write` for anything that changes rows (it commits
    on success and rolls back on any exception), :meth:`session` where an ORM-style
    ``AsyncSession`` is handier, :meth:`migrate` once at start and :meth:`aclose` at the end.
    """

    def __init__(self, url: str | URL, *, echo: bool = False) -> None:
        self.url = normalize_url(url)
        self.dialect: Dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": self.dialect == "postgresql"}
        if self.dialect == "sqlite":
            assert self.url.database is not None
            Path(self.url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(
                pool_size=POSTGRES_POOL_SIZE,
                max_overflow=POSTGRES_MAX_OVERFLOW,
                pool_timeout=POSTGRES_POOL_TIMEOUT,
                connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT},
            )
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        self._write_lock: asyncio.Lock | None = None
        self._writer: _SqliteWriter | None = None  # SQLite: run_write's thread, made at first use
        if self.dialect == "sqlite":
            self._write_lock = asyncio.Lock()
            _install_sqlite_hooks(self.engine.sync_engine)

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a read transaction (rolled back on exit; do not write through it)."""
        with _mapped_errors():
            async with self.engine.connect() as conn:
                yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a write transaction: committed on normal exit, rolled back on error.

        SQLite: ``BEGIN IMMEDIATE``, one writer at a time. PostgreSQL: a plain transaction;
        callers lock rows (``FOR UPDATE``) or use conditional updates.
        """
        lock: AbstractAsyncContextManager[Any] = self._write_lock or nullcontext()
        with _mapped_errors():
            async with lock, self.engine.connect() as conn:
                with _mapped_errors(connected=True):
                    if self.dialect == "sqlite":
                        await conn.execution_options(**{_IMMEDIATE: True})
                    async with conn.begin():
                        yield conn

    async def run_write(self, fn: Callable[Concatenate[Connection, P], T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(conn, *args, **kwargs)`` in one write transaction on a synchronous connection,
        committed when it returns, rolled back when it raises; its result is returned.

        PostgreSQL: :meth:`write`'s connection through ``run_sync``. SQLite: the whole function
        in the writer thread, on that thread's own connection (``BEGIN IMMEDIATE``, under the
        same write lock as :meth:`write`, held until the thread is done even if the caller is
        cancelled meanwhile). A caller cancelled before the transaction commits has it rolled
        back, as on PostgreSQL; one cancelled while it commits cannot tell whether it did (as
        with a lost COMMIT reply), and callers that hold credit treat it so."""
        if self._write_lock is None:
            async with self.write() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        lock = self._write_lock
        loop = asyncio.get_running_loop()
        with _mapped_errors():
            await lock.acquire()
            try:
                writer = self._writer = self._writer or _SqliteWriter(self.url)
                abandoned = threading.Event()
                done = writer.thread.submit(writer.transaction, abandoned, lambda conn: fn(conn, *args, **kwargs))
            except BaseException:
                lock.release()
                raise

            def release(_: Future[T]) -> None:
                try:
                    loop.call_soon_threadsafe(lock.release)
                except RuntimeError:  # the loop is closed: nobody waits on the lock any more
                    pass

            done.add_done_callback(release)
            try:
                with _mapped_errors(connected=True):
                    return await asyncio.wrap_future(done)
            except asyncio.CancelledError:
                abandoned.set()  # roll back instead of committing, unless it is too late
                raise

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` on its own connection; commit it explicitly to keep changes.

        On SQLite its transaction is a deferred ``BEGIN``: use :meth:`write` for
        read-modify-write sequences that must not race.
        """
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            yield session

    async def migrate(self) -> None:
        """Run the Alembic migrations up to head. Safe to call from several processes at once.

        A schema already at head (every start but the first after an upgrade) is told by
        one ``SELECT`` against the migration files' own revision ids, without importing
        Alembic (a third of a gateway's start)."""
        head = _head_from_files()
        if head is not None and await self._revision_is(head):
            return
        if self.dialect == "sqlite":
            await self._migrate_sqlite()
            return
        async with self.write() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            await conn.run_sync(_upgrade_to_head)

    async def _revision_is(self, head: str) -> bool:
        try:
            async with self.read() as conn:
                rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        except DatabaseUnavailable:
            raise
        except Exception:  # no alembic_version table yet: a new database
            return False
        return list(rows) == [head]

    async def _migrate_sqlite(self) -> None:
        # SQLite changes a CHECK by rebuilding the table, which a referencing foreign key
        # forbids; its documented procedure turns the checks off outside the transaction
        # and runs ``foreign_key_check`` before COMMIT. The connection is discarded after,
        # so the pool never hands one out with foreign keys off.
        lock: AbstractAsyncContextManager[Any] = self._write_lock or nullcontext()
        with _mapped_errors():
            async with lock, self.engine.connect() as conn:
                await conn.execution_options(**{_IMMEDIATE: True, _NO_FOREIGN_KEYS: True})
                try:
                    async with conn.begin():
                        await conn.run_sync(_upgrade_to_head)
                        broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                        if broken:
                            raise RuntimeError(f"a migration broke foreign keys: {broken[:5]}")
                finally:
                    await conn.invalidate()

    async def current_revision(self) -> str | None:
        """The schema's Alembic revision, or ``None`` before the first migration."""
        async with self.read() as conn:
            return await conn.run_sync(_current_revision)

    async def aclose(self) -> None:
        """Dispose of the connection pools (and stop SQLite's writer thread, once the
        transaction it runs, if any, is done)."""
        if self._write_lock is not None:
            async with self._write_lock:  # after the run_writes running or queued before it
                writer, self._writer = self._writer, None
            if writer is not None:
                await writer.aclose()
        await self.engine.dispose()


_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']", re.M)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", re.M)


def _head_from_files() -> str | None:
    """The single head of the migration files (the revision no other one follows), read
    with a regular expression; None when that is not plain (no files, several heads, a
    revision it cannot read): then Alembic decides."""
    revisions: set[str] = set()
    followed: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        source = path.read_text()
        rev, down = _REVISION.search(source), _DOWN.search(source)
        if rev is None or down is None:
            return None
        revisions.add(rev.group(1))
        followed.update(re.findall(r"[\"']([^\"']+)[\"']", down.group(1)))
    heads = revisions - followed
    return next(iter(heads)) if len(heads) == 1 else None


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic ``Config`` for Mesh's migrations, optionally bound to an open connection."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration's revision id (what :meth:`Database.migrate` upgrades to)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command

    command.upgrade(alembic_config(connection), "head")


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


class _Abandoned(Exception):
    """Raised in the writer thread, before COMMIT, for a caller cancelled meanwhile."""


class _SqliteWriter:
    """:meth:`Database.run_write`'s thread and the synchronous engine only it uses."""

    def __init__(self, url: URL) -> None:
        self.engine = create_engine(url.set(drivername="sqlite+pysqlite"))
        _install_sqlite_hooks(self.engine)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="mesh-sqlite-writer")

    def transaction(self, abandoned: threading.Event, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            conn.execution_options(**{_IMMEDIATE: True})
            with conn.begin():
                result = fn(conn)
                if abandoned.is_set():
                    raise _Abandoned  # rolls the transaction back
                return result

    async def aclose(self) -> None:
        await asyncio.wrap_future(self.thread.submit(self.engine.dispose))  # its connections belong to that thread
        self.thread.shutdown(wait=False)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Mesh emits BEGIN itself (below); the driver's implicit, late BEGIN would let two
        # read-then-write transactions deadlock on the lock upgrade.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(_NO_FOREIGN_KEYS, False):
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # a no-op once a transaction is open
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_IMMEDIATE, False) else "BEGIN")
