"""``mesh models``: every catalog model, with its replicas and status on a running gateway."""

from __future__ import annotations

import json
from typing import Any

import typer


def models(
    gateway: str | None = typer.Option(None, "--gateway", help="Gateway URL (default: from the config)."),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="MESH_ADMIN_KEY", help="Admin key."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the catalog's models and the gateway's live view of their replicas."""
    import httpx  # here, not at the top: `mesh serve` starts without it
    from rich.console import Console
    from rich.table import Table

    from mesh.catalog import load_catalog
    from mesh.cli import _state

    settings = _state.settings()
    url = gateway or f"http://{settings.server.host}:{settings.server.port}"
    key = admin_key or settings.admin_key
    live: dict[str, dict[str, Any]] = {}
    error = None
    try:
        headers = {"Authorization": f"Bearer {key or ''}"}
        r = httpx.get(url.rstrip("/") + "/admin/v1/models", headers=headers, timeout=10)
        if r.status_code == 200:
            live = {m["id"]: m for m in r.json()["data"]}
        else:
            error = f"the gateway answered {r.status_code}: {r.text[:200]}"
    except httpx.HTTPError as exc:
        error = f"cannot reach the gateway at {url}: {type(exc).__name__}"
    catalog = load_catalog()
    ids = list(dict.fromkeys([*catalog.ids, *live]))
    rows: list[dict[str, Any]] = []
    for model_id in ids:
        entry = catalog.get(model_id)
        view = live.get(model_id)
        replicas = view["replicas"] if view else []
        status = "not offered" if view is None else ("available" if view["available"] else "no healthy replica")
        rows.append({
            "id": model_id,
            "family": entry.family if entry else (view or {}).get("family"),
            "in_catalog": entry is not None,
            "status": status,
            "replicas": [
                {k: r.get(k) for k in ("name", "healthy", "breaker", "in_flight", "capacity", "worker")}
                for r in replicas
            ],
        })
    if as_json:
        typer.echo(json.dumps({"gateway": url, "error": error, "models": rows}, indent=2))
        return
    table = Table(title=f"Models on {url}")
    for col in ("model", "family", "status", "replicas"):
        table.add_column(col)
    for row in rows:
        reps = "\n".join(
            f"{r['name']} [{r['breaker']}] {r['in_flight']}/{r['capacity'] or '∞'}" for r in row["replicas"]
        ) or "-"
        table.add_row(str(row["id"]), str(row["family"] or "-"), str(row["status"]), reps)
    console = Console()
    console.print(table)
    if error:
        console.print(f"[yellow]{error}[/yellow]")
