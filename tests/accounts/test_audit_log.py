"""The audit log keeps an organization's events apart from the operator's and from other
organizations', newest first, and deletes what is older than the retention."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from mesh.accounts.audit_log import Actor, AuditLog
from mesh.console.tables import audit_events
from mesh.store import Database, utcnow

ALICE = Actor(name="alice@example.com", id="user_a", ip="10.0.0.1", request_id="req_1")
OPERATOR = Actor(name="operator (admin key)", id=None, ip="10.0.0.2", request_id="req_2")


async def test_events_per_organization_and_retention(db: Database) -> None:
    log = AuditLog(db, retention_days=30)
    await log.record(ALICE, "key.created", account_id="acct_a", target="key_1", detail={"name": "k"})
    await log.record(ALICE, "key.revoked", account_id="acct_a", target="key_1")
    await log.record(ALICE, "member.invited", account_id="acct_b", target="x@example.com")
    await log.record(OPERATOR, "admin.add_credits", account_id=None, target="/admin/v1/accounts/acct_a/credits")
    mine = await log.events("acct_a")
    assert [e.action for e in mine] == ["key.revoked", "key.created"]
    assert mine[1].detail == {"name": "k"} and mine[1].ip == "10.0.0.1" and mine[1].request_id == "req_1"
    assert [e.action for e in await log.events(None)] == ["admin.add_credits"]
    async with db.write() as conn:
        await conn.execute(update(audit_events).where(audit_events.c.action == "key.created")
                           .values(created_at=utcnow() - timedelta(days=31)))
    assert await log.prune() == 1
    assert [e.action for e in await log.events("acct_a")] == ["key.revoked"]
