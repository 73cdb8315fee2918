"""The audit log: who did what to an organization, and the operator's own log.

An event names its actor (an email, or ``operator`` for the admin API), the client's IP,
the request id (the ``x-request-id`` of the answer), an action (``member.invited``,
``key.revoked``, ``credits.granted``…), its target and a small JSON detail. Events of an
organization carry its ``account_id``; the operator's (admin API) carry none. Events older
than the retention are deleted, at most once an hour per process.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select

from mesh.console.tables import audit_events
from mesh.store import Database, utcnow

PRUNE_EVERY_S = 3600.0
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a console user (``id`` and email) or the operator; from where."""

    name: str
    id: str | None
    ip: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    account_id: str | None
    actor: str
    actor_id: str | None
    ip: str | None
    request_id: str | None
    action: str
    target: str | None
    detail: dict[str, Any] | None
    created_at: datetime


CSV_COLUMNS = ("time", "actor", "ip", "request_id", "action", "target", "detail")


class AuditLog:
    def __init__(self, db: Database, retention_days: int) -> None:
        self.db = db
        self.retention = timedelta(days=retention_days)
        self._pruned_at = 0.0

    async def record(self, actor: Actor, action: str, *, account_id: str | None, target: str | None = None,
                     detail: dict[str, Any] | None = None) -> None:
        async with self.db.write() as conn:
            await conn.execute(insert(audit_events).values(
                account_id=account_id, actor=actor.name[:300], actor_id=actor.id, ip=(actor.ip or "")[:64] or None,
                request_id=actor.request_id, action=action, target=None if target is None else target[:300],
                detail=detail, created_at=utcnow(),
            ))
        if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
            await self.prune()

    async def prune(self) -> int:
        """Delete the events older than the retention; returns how many."""
        self._pruned_at = time.monotonic()
        async with self.db.write() as conn:
            old = audit_events.c.created_at < utcnow() - self.retention
            result = await conn.execute(delete(audit_events).where(old))
        return int(result.rowcount or 0)

    async def events(self, account_id: str | None, *, limit: int = 200) -> list[AuditEvent]:
        """Newest first: the organization's events, or the operator's with ``None``."""
        cond = audit_events.c.account_id.is_(None) if account_id is None else audit_events.c.account_id == account_id
        q = select(audit_events).where(cond).order_by(audit_events.c.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
        async with self.db.read() as conn:
            return [AuditEvent(**dict(r._mapping)) for r in await conn.execute(q)]


def as_csv(events: list[AuditEvent]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for e in events:
        detail = "" if not e.detail else "; ".join(f"{k}={v}" for k, v in sorted(e.detail.items()))
        # A cell starting with = + - @ would be a formula in a spreadsheet: quote it away.
        cells = [e.created_at.isoformat(), e.actor, e.ip or "", e.request_id or "", e.action, e.target or "", detail]
        writer.writerow(["'" + c if c[:1] in ("=", "+", "-", "@") else c for c in cells])
    return out.getvalue()
