"""Operator pages on the fleet: models with their replicas (health, breaker, load) and the
workers that registered replicas, as this gateway process sees them."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response
from starlette.routing import Route

from mesh.admin.fleet import pool_json
from mesh.console.web import Console, Page

STATIC_SOURCE = "configuration"


async def fleet_page(page: Page) -> Response:
    pools = [pool_json(p) for p in page.gateway.router.pools.values()]
    return page.render("admin/models.html", title="Fleet", nav="admin", section="models", pools=pools)


async def workers_page(page: Page) -> Response:
    """Replicas grouped by the worker token that registered them (``worker`` label), with the
    address each registered from, why one is out of rotation, and the address each token
    was last used from; replicas from the configuration file form their own group."""
    registry = page.gateway.workers.registry
    regs = {r.id: r for r in await registry.live()}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for tok in page.gateway.settings.workers.tokens:
        groups[tok.name] = []
    for pool in page.gateway.router.pools.values():
        for replica in pool.replicas:
            worker = replica.labels.get("worker") or STATIC_SOURCE
            reg = regs.get(replica.labels.get("registration", ""))
            groups[worker].append({
                "model": pool.model.id,
                "name": replica.name,
                "healthy": replica.healthy,
                "breaker": str(replica.breaker.state),
                "in_flight": replica.in_flight,
                "capacity": replica.capacity,
                "load": replica.load,
                "served": replica.served,
                "registration": reg.id if reg else None,
                "source": reg.source if reg else None,
                "quarantined": reg.quarantined if reg else None,
            })
    workers = sorted(groups.items(), key=lambda kv: (kv[0] == STATIC_SOURCE, kv[0]))
    sources = {
        name: (addr, datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
        for name, (addr, at) in (await registry.sources()).items()
    }
    return page.render("admin/workers.html", title="Workers", nav="admin", section="workers", workers=workers,
                       static_source=STATIC_SOURCE, sources=sources)


def fleet_routes(console: Console) -> list[Route]:
    return [
        console.route("/admin/models", fleet_page, access="admin"),
        console.route("/admin/workers", workers_page, access="admin"),
    ]
