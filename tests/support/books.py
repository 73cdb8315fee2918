"""The invariants every test must leave behind on the gateways it used.

Once a test's requests are done: no credit held for any account or key and no hold row
left, every replica's in-flight count and every queue back to zero, each account's ledger
rows summing to its balance, and usage records' charges equal to the ledger's usage rows.

Gateways still running are asked (``POST /admin/v1/flush``, then ``GET /admin/v1/audit``);
the books of a gateway the test stopped are read from its database directly (a clean stop
writes every charge and gives leased credit back), unless a gateway still running shares
that database. A test that legitimately leaves state is marked
``@pytest.mark.leaves_state("why")``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx

from mesh.admin.audit import books
from mesh.store import Database
from support.gateway import GatewayProcess


def _books_of(url: str) -> dict[str, list[dict[str, Any]]]:
    """Read the books in a thread of its own: the test's event loop may be current here."""
    out: dict[str, Any] = {}

    async def read() -> None:
        database = Database(url)
        try:
            out.update(await books(database))
        finally:
            await database.aclose()

    def run() -> None:
        try:
            asyncio.run(read())
        except BaseException as exc:  # reported, not swallowed: the check must be able to fail
            out["error"] = [{"reading the books failed": repr(exc)}]

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out


def _problems(found: dict[str, Any]) -> dict[str, Any]:
    return {name: rows for name, rows in found.items() if rows}


def _audited(gw: GatewayProcess) -> bool:
    """Whether this gateway can be audited (it has the admin API and is alive)."""
    return bool(gw.config.get("admin_key")) and gw.proc is not None and gw.proc.poll() is None


def check_books() -> list[str]:
    """Every broken invariant on the gateways the test used, as readable lines."""
    failures: list[str] = []
    running = [gw for gw in GatewayProcess.running if _audited(gw)]
    for gw, fleet in GatewayProcess.stopped:
        if fleet:
            failures.append(f"gateway {gw.url} was stopped with resources in use: {fleet}")
    try:
        for gw in running[1:]:  # gateways sharing a database: every one flushed before the last audit
            gw.admin_call("POST", "/admin/v1/flush")
        audits = {gw.url: gw.audit() for gw in running}
    except httpx.HTTPError as exc:
        return [*failures, f"auditing the running gateways failed: {exc!r}"]
    checked: set[str] = set()
    for gw in running:
        found = _problems(audits[gw.url])
        fleet = found.pop("in_flight", None)
        if fleet:
            failures.append(f"gateway {gw.url} has resources in use after the test: {fleet}")
        if gw.database in checked:
            continue
        checked.add(gw.database)
        if found:
            failures.append(f"books of {gw.database} (via {gw.url}) are off: {found}")
    for gw, _ in GatewayProcess.stopped:
        if gw.database in checked or not gw.config.get("admin_key"):
            continue
        checked.add(gw.database)
        found = _problems(_books_of(gw.database))
        if found:
            failures.append(f"books of {gw.database} (gateway stopped) are off: {found}")
    return failures
