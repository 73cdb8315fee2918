"""``GET /admin/v1/models``: every model with its replicas, health, breaker and load.

What operators (and ``mesh models``, and the console's operator pages) read to see the
fleet as this gateway process sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.admin.http import guarded, json_response
from mesh.admin.routes import PREFIX, check_admin
from mesh.routing.pool import ModelPool
from mesh.routing.replica import Replica
from mesh.routing.router import Router


def replica_json(r: Replica) -> dict[str, Any]:
    return {
        "name": r.name,
        "healthy": r.healthy,
        "breaker": str(r.breaker.state),
        "in_flight": r.in_flight,
        "capacity": r.capacity,
        "served": r.served,
        "failures": r.failures,
        "reported_load": r.reported_load,
        **r.labels,
    }


def pool_json(pool: ModelPool) -> dict[str, Any]:
    m = pool.model
    return {
        "id": m.id,
        "family": m.family,
        "license": m.license,
        "context_length": m.context_length,
        "available": any(r.healthy for r in pool.replicas),
        "queued": len(pool.queue),
        "fallbacks": list(m.fallbacks),
        "replicas": [replica_json(r) for r in pool.replicas],
    }


def fleet_routes(router: Callable[[Request], Router], admin_key: Callable[[Request], str | None]) -> list[Route]:
    async def list_fleet(request: Request) -> Response:
        check_admin(request, admin_key(request))
        pools = router(request).pools.values()
        return json_response({"object": "list", "data": [pool_json(p) for p in pools]})

    return [Route(PREFIX + "/models", guarded(list_fleet), methods=["GET"])]
