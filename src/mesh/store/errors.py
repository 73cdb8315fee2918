"""Database errors at the storage edge: which ones mean "the database is unreachable".

As httpx maps transport errors once at its edge, :meth:`mesh.store.Database.read` and
``write`` turn driver and SQLAlchemy connection failures into
:class:`mesh.errors.DatabaseUnavailable` (503/529 with ``retry-after``), so no caller
answers an outage with a 500. Constraint violations and other statement errors pass
through unchanged: they are bugs or conflicts, not outages.
"""

from __future__ import annotations

import sys

from sqlalchemy import exc as sa


def _connection_errors() -> tuple[type[BaseException], ...]:
    """OSError, TimeoutError and asyncpg's connection-level failures (its statement errors
    are PostgresError subclasses that are not these). An asyncpg error exists only once
    SQLAlchemy has loaded the driver for a PostgreSQL database: with SQLite it is not
    imported at all (it was ~20 ms of every start)."""
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None:
        return (OSError, TimeoutError)
    return (
        OSError,
        TimeoutError,
        asyncpg.exceptions.PostgresConnectionError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.AdminShutdownError,
        asyncpg.exceptions.CrashShutdownError,
    )


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached or the connection was lost."""
    connection = _connection_errors()
    if isinstance(exc, sa.DBAPIError):
        if exc.connection_invalidated:
            return True
        # SQLAlchemy's asyncpg adapter wraps the driver's error in its own: look at both.
        for err in (exc.orig, getattr(exc.orig, "__cause__", None)):
            if isinstance(err, connection):
                return True
        return isinstance(exc, sa.InterfaceError)
    if isinstance(exc, sa.TimeoutError):  # the pool had no connection to give
        return True
    return isinstance(exc, connection)
