"""``POST /admin/v1/flush`` and ``GET /admin/v1/audit``: write what is pending, then check the books.

``flush`` waits for this process's background settlements, writes every pending charge
and usage record and gives idle leased credit back (tests, operators before a check or a
deploy). ``audit`` reports every broken invariant it finds, as lists that are empty when
all is well:

- ``held``: accounts or keys with credit held, or hold rows left (nothing is held at rest);
- ``ledger``: accounts whose ledger rows do not sum to their balance;
- ``usage``: accounts whose usage records' charges differ from their usage ledger rows;
- ``reversed``: accounts whose ``reversed`` differs from what their reversal rows took back
  (the balance's floor below zero is exactly what refunds and disputes reversed);
- ``in_flight``: replicas with requests open on this process, pools with waiters or
  reserved slots.

Only meaningful at rest (no request running): the test suite calls both after every test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.admin.http import guarded, json_response
from mesh.admin.routes import PREFIX, check_admin
from mesh.gateway import Gateway
from mesh.store.database import Database
from mesh.store.tables import accounts, api_keys, holds, key_user_spend, ledger, usage_records


async def books(database: Database) -> dict[str, list[dict[str, Any]]]:
    """The money invariants that fail, per account (see the module docstring)."""
    async with database.engine.connect() as conn:
        held = [
            {"account_id": r.id, "held": int(r.held)}
            for r in await conn.execute(select(accounts.c.id, accounts.c.held).where(accounts.c.held != 0))
        ]
        held += [
            {"key_id": r.id, "account_id": r.account_id, "held": int(r.held)}
            for r in await conn.execute(
                select(api_keys.c.id, api_keys.c.account_id, api_keys.c.held).where(api_keys.c.held != 0)
            )
        ]
        held += [
            {"key_id": r.key_id, "end_user": r.end_user, "held": int(r.held)}
            for r in await conn.execute(
                select(key_user_spend.c.key_id, key_user_spend.c.end_user, key_user_spend.c.held).where(
                    key_user_spend.c.held != 0
                )
            )
        ]
        held += [
            {"hold": r.request_id, "account_id": r.account_id, "amount": int(r.amount)}
            for r in await conn.execute(select(holds.c.request_id, holds.c.account_id, holds.c.amount))
        ]
        sums = (
            select(ledger.c.account_id, func.coalesce(func.sum(ledger.c.amount), 0).label("total"))
            .group_by(ledger.c.account_id)
            .subquery()
        )
        wrong_ledger = [
            {"account_id": r.id, "balance": int(r.balance), "ledger_sum": int(r.total or 0)}
            for r in await conn.execute(
                select(accounts.c.id, accounts.c.balance, sums.c.total)
                .select_from(accounts.outerjoin(sums, sums.c.account_id == accounts.c.id))
                .where(accounts.c.balance != func.coalesce(sums.c.total, 0))
            )
        ]
        charged = {
            r.account_id: -int(r.total)
            for r in await conn.execute(
                select(ledger.c.account_id, func.sum(ledger.c.amount).label("total"))
                .where(ledger.c.kind == "usage")
                .group_by(ledger.c.account_id)
            )
        }
        recorded = {
            r.account_id: int(r.total)
            for r in await conn.execute(
                select(usage_records.c.account_id, func.sum(usage_records.c.cost).label("total")).group_by(
                    usage_records.c.account_id
                )
            )
        }
        taken = (
            select(ledger.c.account_id, (-func.sum(ledger.c.amount)).label("total"))
            .where(ledger.c.kind == "reversal")
            .group_by(ledger.c.account_id)
            .subquery()
        )
        wrong_reversed = [
            {"account_id": r.id, "reversed": int(r.reversed), "reversal_rows": int(r.total or 0)}
            for r in await conn.execute(
                select(accounts.c.id, accounts.c.reversed, taken.c.total)
                .select_from(accounts.outerjoin(taken, taken.c.account_id == accounts.c.id))
                .where(accounts.c.reversed != func.coalesce(taken.c.total, 0))
            )
        ]
    wrong_usage = [
        {"account_id": a, "ledger_usage": charged.get(a, 0), "usage_records": recorded.get(a, 0)}
        for a in sorted(set(charged) | set(recorded))
        if charged.get(a, 0) != recorded.get(a, 0)
    ]
    return {"held": held, "ledger": wrong_ledger, "usage": wrong_usage, "reversed": wrong_reversed}


def fleet_in_use(gateway: Gateway) -> list[dict[str, Any]]:
    """Replicas with requests open on this process, and pools with waiters or reserved slots."""
    out: list[dict[str, Any]] = []
    for pool in gateway.router.pools.values():
        if len(pool.queue) or pool.reserved:
            out.append({"model": pool.model.id, "queued": len(pool.queue), "reserved": pool.reserved})
        out += [
            {"model": pool.model.id, "replica": r.name, "in_flight": r.in_flight}
            for r in pool.replicas
            if r.in_flight
        ]
    return out


def audit_routes(gateway: Callable[[Request], Gateway]) -> list[Route]:
    async def flush(request: Request) -> Response:
        gw = gateway(request)
        check_admin(request, gw.settings.admin_key)
        while gw.tasks:  # settlements of requests that just ended, then what they queued
            await asyncio.gather(*list(gw.tasks), return_exceptions=True)
        await gw.flush_billing()
        return json_response({"flushed": True})

    async def audit(request: Request) -> Response:
        gw = gateway(request)
        check_admin(request, gw.settings.admin_key)
        found = await books(gw.services.database)
        return json_response({**found, "in_flight": fleet_in_use(gw)})

    return [
        Route(PREFIX + "/flush", guarded(flush), methods=["POST"]),
        Route(PREFIX + "/audit", guarded(audit), methods=["GET"]),
    ]
