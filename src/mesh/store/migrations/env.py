"""Alembic environment for Mesh.

``Database.migrate()`` hands in an open connection (``config.attributes["connection"]``)
from inside the running event loop. From the ``alembic`` command line, pass the database
with ``-x url=sqlite:///path`` (or a ``postgresql://`` URL); it is normalised to the
async driver and run on a fresh event loop.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

import mesh.console.tables  # registers the console tables on metadata
import mesh.conversations.tables  # noqa: F401  (registers the stored-responses tables on metadata)
from mesh.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    from mesh.store.database import Database

    db = Database(url)
    try:
        async with db.write() as conn:
            await conn.run_sync(_run)
    finally:
        await db.aclose()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database as: alembic -x url=sqlite:///path/to/mesh.db upgrade head")
    asyncio.run(_run_from_url(url))


_main()
