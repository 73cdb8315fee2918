"""The invariants every test must leave behind on the gateways it used.

Once a test's requests are done: no credit held for any account or key and no hold row
left, every replica's in-flight count and every queue back to zero, each account's ledger
rows summing to its balance, and usage records' charges equal to the ledger's usage rows.

Gateways still running are flushed and audited (``POST /admin/v1/flush``, then
``GET /admin/v1/audit``) after every test; a gateway is audited once more just before
it stops (``GatewayProcess.stop``), and that audit is checked after the test, module or
session whose fixture stopped it. A test that legitimately leaves state is marked
``@pytest.mark.leaves_state("why")``.
"""

from __future__ import annotations

from typing import Any

import httpx

from support.gateway import GatewayProcess


def _audited(gw: GatewayProcess) -> bool:
    """Whether this gateway can be audited (it has the admin API and is alive)."""
    return bool(gw.config.get("admin_key")) and gw.proc is not None and gw.proc.poll() is None


def _report(gw: GatewayProcess, found: dict[str, Any], when: str, books: bool) -> list[str]:
    problems = {name: rows for name, rows in found.items() if rows}
    out: list[str] = []
    fleet = problems.pop("in_flight", None)
    if fleet:
        out.append(f"gateway {gw.url} has resources in use {when}: {fleet}")
    if books and problems:
        out.append(f"books of {gw.database} (via {gw.url}) are off {when}: {problems}")
    return out


def check_stopped() -> list[str]:
    """What the gateways stopped since the last check left behind."""
    failures: list[str] = []
    for gw, found in GatewayProcess.stopped:
        failures += _report(gw, found, "when it stopped", books=True)
    GatewayProcess.stopped.clear()
    return failures


def check_books() -> list[str]:
    """Every broken invariant on the gateways the test used, as readable lines."""
    failures = check_stopped()
    running = [gw for gw in GatewayProcess.running if _audited(gw)]
    try:
        for gw in running[1:]:  # gateways sharing a database: every one flushed before the last audit
            gw.admin_call("POST", "/admin/v1/flush")
        audits = [(gw, gw.audit()) for gw in running]
    except httpx.HTTPError as exc:
        return [*failures, f"auditing the running gateways failed: {exc!r}"]
    checked: set[str] = set()
    for gw, found in audits:
        failures += _report(gw, found, "after the test", books=gw.database not in checked)
        checked.add(gw.database)
    return failures
