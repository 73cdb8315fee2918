"""``mesh serve``: run the gateway with uvicorn (uvloop + httptools) and Mesh's edge limits."""

from __future__ import annotations

import gc
import logging
import os

import typer

log = logging.getLogger("mesh.serve")


def serve(
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file (also MESH_CONFIG)."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default from config: 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default from config: 8080)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Gateway processes sharing the port."),
    quickstart: bool = typer.Option(
        False, "--quickstart", help="Create a local account with free credits and a key, and print how to call."
    ),
) -> None:
    """Serve the API (OpenAI Chat, Responses, Anthropic Messages), the console and the admin API."""
    # Starting allocates ~200k objects that live as long as the process: the collector's
    # passes over them while the modules import and the app starts cost ~0.14 s of CPU. The
    # app turns it back on once started, with that heap frozen (mesh.app._tune_gc).
    gc.disable()
    try:
        _serve(config, host, port, workers, quickstart)
    finally:
        gc.enable()


def _serve(config: str | None, host: str | None, port: int | None, workers: int, quickstart: bool) -> None:
    from mesh.cli import _state
    from mesh.cli.serve_checks import Refused, check
    from mesh.http.server import EdgeLimits, run
    from mesh.observability.logging import configure

    if config is not None:
        _state.CONFIG_PATH.set(config)
    settings = _state.settings()
    configure(settings.logging)
    host = host or settings.server.host
    port = port if port is not None else settings.server.port
    try:
        warnings = check(settings, host, workers)
    except Refused as exc:
        typer.echo(f"mesh serve: {exc}", err=True)
        raise typer.Exit(2) from None
    for warning in warnings:
        log.warning("%s", warning)
    if quickstart:
        from mesh.cli.quickstart import prepare

        prepare(settings, host, port)
    config_path = _state.CONFIG_PATH.get()
    if config_path:
        # Worker processes load the same file through the factory below.
        os.environ["MESH_CONFIG"] = os.path.abspath(config_path)
    srv = settings.server
    edge = EdgeLimits(
        max_header_bytes=srv.max_header_bytes, header_timeout=srv.header_timeout, body_timeout=srv.body_timeout,
        keepalive_timeout=srv.keepalive_timeout, max_connections=srv.max_connections,
        write_timeout=srv.write_timeout,
    )
    if workers > 1:
        gc.enable()  # this process supervises; each worker process starts its own app
    run("mesh.app:app_from_environment", host=host, port=port, workers=workers, edge=edge,
        forwarded_allow_ips=srv.forwarded_allow_ips)
