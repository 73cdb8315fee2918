"""The ``mesh`` command. Subcommands live in sibling modules, one concern each."""

from __future__ import annotations

import typer

from mesh.cli import _state
from mesh.cli.models import models
from mesh.cli.serve import serve
from mesh.cli.worker import worker
from mesh.console.cli import console_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Mesh: one endpoint for open-weight LLMs.")


@app.callback()
def _root(
    config: str | None = typer.Option(None, "--config", "-c", envvar="MESH_CONFIG", help="YAML config file."),
) -> None:
    _state.CONFIG_PATH.set(config)


app.command()(serve)
app.command()(worker)
app.command()(models)
app.add_typer(console_app, name="console")


def _register_ops() -> None:
    # Operator subcommands (accounts, credits, keys, usage, redeem, models) register
    # themselves here when their module exists.
    try:
        from mesh.cli import ops
    except ImportError:  # pragma: no cover - during bootstrap only
        return
    ops.register(app)


_register_ops()


def main() -> None:
    app()
