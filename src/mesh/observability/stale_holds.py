"""Holds older than ``observability.stale_hold_minutes``: credit taken and never settled.

A settlement that failed leaves its hold for the stale-hold sweeper; until then the
customer's credit is locked and nothing else says so. This watcher counts such holds every
``stale_hold_check_interval`` seconds (``mesh_stale_holds``) and logs each one once,
with its request id (lease holds carry their lease id). A database it cannot reach leaves
the last count in place: readiness reports that outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from mesh.store.database import Database
from mesh.store.tables import holds

log = logging.getLogger("mesh.billing.stale_holds")

MAX_LOGGED = 100  # stale holds named per check; the gauge counts them all


class StaleHolds:
    def __init__(self, database: Database, older_than_minutes: float, interval: float) -> None:
        self._database = database
        self.older_than = timedelta(minutes=older_than_minutes)
        self._interval = interval
        self.count = 0
        self._logged: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def check(self, now: datetime | None = None) -> int:
        """Count the stale holds now and log the ones not logged before; returns the count."""
        cutoff = (now or datetime.now(UTC)) - self.older_than
        stale = holds.c.created_at < cutoff
        async with self._database.read() as conn:
            count = (await conn.execute(select(func.count()).select_from(holds).where(stale))).scalar_one()
            rows = (await conn.execute(
                select(holds.c.request_id, holds.c.account_id, holds.c.amount, holds.c.created_at)
                .where(stale).order_by(holds.c.created_at).limit(MAX_LOGGED)
            )).all()
        self.count = int(count)
        seen = {r.request_id for r in rows}
        for r in rows:
            if r.request_id not in self._logged:
                log.warning(
                    "hold %s of account %s (%d micro-credits) is older than %s and not settled",
                    r.request_id, r.account_id, r.amount, self.older_than,
                    extra={"request_id": r.request_id, "account_id": r.account_id},
                )
        # Request ids are never reused, so a hold once logged is never logged again (a check that
        # missed it for a moment, e.g. past MAX_LOGGED, must not log it twice); bounded memory.
        self._logged |= seen
        if len(self._logged) > 16 * MAX_LOGGED:
            self._logged = seen
        return self.count

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mesh-stale-holds")

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as exc:  # the database is down: readiness says so; try again later
                log.debug("stale-hold check failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
