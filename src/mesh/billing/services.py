"""The account and billing services, built one way for the gateway and the CLI.

``services = await open_services(settings)`` opens the database, migrates it, and (with
``background=True``) starts the background work: the usage writer, the key cache's
invalidation listener and ``last_used_at`` writer, and a maintenance loop that releases
stale holds and purges old usage rows. ``await services.aclose()`` stops all of it,
flushing what is queued, and closes the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from mesh.accounts.audit_log import AuditLog
from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.invalidation import INVALIDATION_SUFFIX
from mesh.accounts.service import Accounts
from mesh.billing.ledger import Ledger
from mesh.billing.redeem import RedeemCodes
from mesh.billing.usage import UsageWriter, purge
from mesh.config import Settings
from mesh.store import Database

# A hold this old belongs to a process that died: no request streams for two hours.
STALE_HOLD_AGE = timedelta(hours=2)
MAINTENANCE_INTERVAL = 300.0
PURGE_EVERY = 12  # maintenance rounds: about once an hour

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """Everything the request path, the admin API and the CLI need for accounts and money."""

    settings: Settings
    database: Database
    accounts: Accounts
    ledger: Ledger
    authenticator: KeyAuthenticator
    usage: UsageWriter
    redeem: RedeemCodes
    audit: AuditLog
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    async def start(self) -> None:
        """Start the background work (idempotent). Raises if Redis is configured but down."""
        await self.usage.start()
        await self.authenticator.start()
        if not self._tasks:
            self._tasks.append(asyncio.create_task(self._maintain(), name="mesh-billing-maintenance"))

    async def aclose(self) -> None:
        """Stop background work, flush queued usage and ``last_used_at``, close the database."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        try:
            await self.usage.aclose()
            await self.authenticator.aclose()
        finally:
            await self.database.aclose()

    async def _maintain(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                released = await self.ledger.release_stale_holds(STALE_HOLD_AGE)
                if released:
                    log.warning("released %d stale credit holds", released)
                if rounds % PURGE_EVERY == 0:
                    await purge(self.database, self.settings.billing.usage_retention_days)
            except Exception:
                log.exception("billing maintenance failed; will retry")
            rounds += 1


async def open_services(settings: Settings, *, migrate: bool = True, background: bool = True) -> Services:
    """Open the database named by ``settings`` and build the services on it.

    ``migrate`` runs the Alembic migrations first; ``background`` starts the background
    tasks (the CLI passes False: it only reads and writes, then exits).
    """
    db = Database(settings.database)
    try:
        if migrate:
            await db.migrate()
        usage = UsageWriter(
            db, flush_interval=settings.billing.usage_flush_interval,
            outbox=settings.billing.settlement_stream.url is not None,
        )
        services = Services(
            settings=settings,
            database=db,
            accounts=Accounts(db),
            ledger=Ledger(db, usage),
            authenticator=KeyAuthenticator(
                db,
                redis_url=settings.redis,
                channel=settings.redis_prefix + INVALIDATION_SUFFIX,
                limits=settings.limits,
            ),
            usage=usage,
            redeem=RedeemCodes(db),
            audit=AuditLog(db, settings.audit_retention_days),
        )
    except BaseException:
        await db.aclose()
        raise
    if background:
        try:
            await services.start()
        except BaseException:
            await services.aclose()
            raise
    return services
