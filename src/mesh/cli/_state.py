"""The ``--config`` option, shared by every subcommand."""

from __future__ import annotations

from contextvars import ContextVar

import typer

from mesh.config import ConfigError, Settings, load_settings

CONFIG_PATH: ContextVar[str | None] = ContextVar("mesh_config_path", default=None)


def settings() -> Settings:
    """Load the settings named by ``--config`` / ``MESH_CONFIG``; exit with the message on error."""
    try:
        return load_settings(CONFIG_PATH.get())
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
