"""``mesh worker``: register a GPU node's engine with a gateway and keep it there."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer


def worker(
    gateway: str = typer.Option(..., "--gateway", help="The gateway's base URL, e.g. https://mesh.example.com."),
    token: str | None = typer.Option(None, "--token", envvar="MESH_WORKER_TOKEN", help="Worker token."),
    token_file: Path | None = typer.Option(None, "--token-file", help="Read the worker token from this file."),
    engine_url: str = typer.Option(..., "--engine-url", help="The engine's OpenAI base URL on this node."),
    model: str = typer.Option(..., "--model", help="The gateway's model name this engine serves."),
    engine_model: str | None = typer.Option(None, "--engine-model", help="The engine's own model name."),
    launch: str | None = typer.Option(None, "--launch", help='Start the engine, e.g. "vllm serve …".'),
    capacity: int | None = typer.Option(None, "--capacity", min=1, help="Max concurrent requests."),
    advertise_url: str | None = typer.Option(None, "--advertise-url", help="Engine URL as the gateway sees it."),
    startup_timeout: float = typer.Option(900.0, "--startup-timeout", help="Seconds to wait for the engine."),
    reasoning_field: str = typer.Option(
        "reasoning_content", "--reasoning-field", help="Field the engine reads prior reasoning from (vLLM: reasoning)."
    ),
) -> None:
    """Run next to an engine: launch it (optional), register it, heartbeat its load."""
    from mesh.config import LoggingConfig
    from mesh.observability.logging import configure
    from mesh.workers.agent import AgentConfig, WorkerAgent

    configure(LoggingConfig())
    if token_file is not None:
        token = token_file.read_text().strip()
    if not token:
        typer.echo("a worker token is required (--token, --token-file or MESH_WORKER_TOKEN)", err=True)
        raise typer.Exit(2)
    agent = WorkerAgent(
        AgentConfig(
            gateway=gateway, token=token, engine_url=engine_url, model=model, engine_model=engine_model,
            launch=launch, capacity=capacity, advertise_url=advertise_url, startup_timeout=startup_timeout,
            reasoning_field=reasoning_field,
        )
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        asyncio.run(main())
    except PermissionError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(3) from None
