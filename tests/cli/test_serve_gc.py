"""``mesh serve`` starts with the garbage collector off (``cli/serve.py``); it must be on
again in every process that goes on running: the supervisor of several workers, and the
serving process whatever way its start ends. (The app turns it on in its own process once
started: ``mesh.app._tune_gc``.)"""

from __future__ import annotations

import contextvars
import gc
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from conftest import TEST_PRICING
from mesh.http import server
from mesh.observability import logging as mesh_logging

serve_module = importlib.import_module("mesh.cli.serve")  # mesh.cli.serve is also the command's name


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({
        "database": f"sqlite:///{tmp_path}/mesh.db",
        "redis": "redis://127.0.0.1:6379/0",  # several workers need it (never reached here)
        "models": [{"id": "m", "pricing": TEST_PRICING,
                    "engines": [{"type": "openai", "base_url": "http://127.0.0.1:9", "model": "m"}]}],
    }))
    monkeypatch.setenv("MESH_CONFIG", str(path))  # serve sets it for its workers: restored after
    monkeypatch.setattr(mesh_logging, "configure", lambda *a, **k: None)
    assert gc.isenabled()
    yield str(path)
    gc.enable()  # whatever the test did


def _serve(config: str, workers: int) -> None:
    def call() -> None:
        serve_module.serve(config=config, host=None, port=None, workers=workers, quickstart=False)

    # serve sets the --config context variable: in a context of its own, not the test's.
    contextvars.copy_context().run(call)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_collector_is_on_again_whatever_way_serving_ends(
    config: str, monkeypatch: pytest.MonkeyPatch, workers: int,
) -> None:
    seen: list[bool] = []

    def run(*args: Any, **kwargs: Any) -> None:
        seen.append(gc.isenabled())
        raise RuntimeError("the server failed to start")

    monkeypatch.setattr(server, "run", run)
    with pytest.raises(RuntimeError, match="failed to start"):
        _serve(config, workers)
    # One process: off while it starts (the app turns it on); a supervisor: on, it serves nothing.
    assert seen == [workers > 1]
    assert gc.isenabled()


def test_the_collector_is_on_again_after_a_refused_start(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(config)
    data = yaml.safe_load(path.read_text())
    del data["redis"]
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(server, "run", lambda *a, **k: pytest.fail("refused: never run"))
    with pytest.raises(typer.Exit):
        _serve(config, 2)  # several workers without Redis: refused by serve_checks
    assert gc.isenabled()


def test_the_collector_is_on_again_after_a_failed_start(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(3)  # uvicorn's start failed (the app's lifespan raised)

    monkeypatch.setattr(server, "run", run)
    with pytest.raises(SystemExit):
        _serve(config, 1)
    assert gc.isenabled()


async def test_the_served_app_turns_the_collector_on_once_started(config: str) -> None:
    from mesh.app import create_app
    from mesh.config import load_settings

    app = create_app(load_settings(config), tune_gc=True)
    threshold = gc.get_threshold()
    gc.disable()  # as mesh serve starts it
    try:
        async with app.router.lifespan_context(app):
            assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()  # this test process goes on: its heap back in the collector's view
        gc.set_threshold(*threshold)
