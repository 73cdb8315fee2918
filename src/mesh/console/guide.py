"""The model catalog with live status, and the quick start with copy-paste examples."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from mesh.console.web import Console, Page


async def models_page(page: Page) -> Response:
    router = page.gateway.router
    rows = []
    for m in page.console.settings.models:
        pool = router.pools.get(m.id)
        replicas = pool.replicas if pool is not None else []
        healthy = sum(1 for r in replicas if r.healthy)
        rows.append({"model": m, "healthy": healthy, "replicas": len(replicas), "up": healthy > 0})
    return page.render("models.html", title="Models", nav="models", rows=rows)


async def quickstart_page(page: Page) -> Response:
    base = page.base_url()
    models = page.console.settings.models
    model = next((m.id for m in models if page.gateway.is_available(m.id)), models[0].id if models else "MODEL")
    return page.render(
        "quickstart.html",
        title="Quick start",
        nav="quickstart",
        base_url=base,
        root_url=base.removesuffix("/v1"),
        model=model,
    )


def guide_routes(console: Console) -> list[Route]:
    return [
        console.route("/models", models_page, need="usage"),
        console.route("/quickstart", quickstart_page, need="usage"),
    ]
