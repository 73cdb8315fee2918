"""A Mesh gateway run with its request path wrapped (``bench.timeline``, ``bench.slowest``).

The wrapping module is run as a script in the gateway's process: ``serve`` installs its
wrappers, runs ``mesh`` there and writes what they gathered to a file when it stops;
``gateway`` starts the bench engine and such a gateway (SQLite, everything on, as
``make bench``) and hands both over, then reads the file.
"""

from __future__ import annotations

import json
import runpy
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.targets import ROOT, Target, mesh_config, start_engine, start_mesh


def serve(out: Path, argv: list[str], instrument: Callable[[], None], gathered: object) -> None:
    """Run ``mesh <argv>`` with ``instrument()`` applied; ``gathered`` to ``out`` at the end."""
    sys.argv = ["mesh", *argv]
    signal.raise_signal = lambda s: None  # uvicorn re-raises the signal it caught: write first
    instrument()
    try:
        runpy.run_module("mesh", run_name="__main__", alter_sys=True)
    finally:
        out.write_text(json.dumps(gathered))


@dataclass
class Run:
    engine: Target
    mesh: Target
    gathered: Any = field(default=None)  # what the gateway wrote, once it stopped


@contextmanager
def gateway(script: str, prefix: str) -> Iterator[Run]:
    """The engine and a gateway running ``script --serve <file> -- <mesh argv>``; on exit
    both stop and ``Run.gathered`` holds what the gateway wrote."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    out = work / "gathered.json"
    engine = start_engine(work)

    def command(config: Path, port: int) -> list[str]:
        return [sys.executable, str(Path(script).resolve()), "--serve", str(out), "--",
                "--config", str(config), "serve", "--port", str(port)]

    try:
        # This checkout's src by absolute path: the gateway runs in ``work``, where a relative
        # PYTHONPATH (``PYTHONPATH=src``) means nothing and the environment's installed Mesh would run.
        mesh = start_mesh("mesh", "Mesh (SQLite)", work, mesh_config(f"sqlite:///{work}/mesh.db", engine.url),
                          command=command, env={"PYTHONPATH": str(ROOT / "src")})
        run = Run(engine, mesh)
        try:
            yield run
        finally:
            mesh.server.stop()
        run.gathered = json.loads(out.read_text())
    finally:
        engine.server.stop()
