"""Operator pages on the fleet: models with their replicas (health, breaker, load) and the
workers that registered replicas, as this gateway process sees them."""

from __future__ import annotations

from collections import defaultdict
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
    """Replicas grouped by the worker that registered them (``worker`` label); replicas
    from the configuration file form their own group."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for pool in page.gateway.router.pools.values():
        for replica in pool.replicas:
            worker = replica.labels.get("worker") or STATIC_SOURCE
            groups[worker].append({
                "model": pool.model.id,
                "name": replica.name,
                "healthy": replica.healthy,
                "breaker": str(replica.breaker.state),
                "in_flight": replica.in_flight,
                "capacity": replica.capacity,
                "load": replica.load,
                "served": replica.served,
            })
    workers = sorted(groups.items(), key=lambda kv: (kv[0] == STATIC_SOURCE, kv[0]))
    return page.render("admin/workers.html", title="Workers", nav="admin", section="workers", workers=workers,
                       static_source=STATIC_SOURCE)


def fleet_routes(console: Console) -> list[Route]:
    return [
        console.route("/admin/models", fleet_page, access="admin"),
        console.route("/admin/workers", workers_page, access="admin"),
    ]
