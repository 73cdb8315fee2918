"""Two versions of Mesh in one run: the same engine and proxy in front of a gateway on this
checkout's code and one on another checkout's ``src`` (a ``git worktree`` of the commit to
compare with), measured in alternating windows, medians of the CPU per request or chunk.

    git worktree add /tmp/base <commit>
    .venv/bin/python -m bench.ab --base /tmp/base/src --mode chat --concurrency 16 --rounds 10
    .venv/bin/python -m bench.ab --base /tmp/base/src --mode chat --pg    # both on PostgreSQL

Each gateway gets a fresh SQLite (or, with ``--pg``, PostgreSQL) database, as in ``make bench``;
windows alternate in order and in reverse, so a drift of the machine falls on both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.measure import Point, run_load, summarize
from bench.targets import (
    ROOT,
    create_pg_database,
    drop_pg_database,
    mesh_config,
    start_engine,
    start_floor,
    start_mesh,
    start_proxy,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the other checkout's src directory")
    p.add_argument("--mode", choices=("chat", "stream"), default="chat")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--pg", action="store_true", help="both gateways on PostgreSQL (a fresh database each)")
    p.add_argument("--floor", action="store_true",
                   help="also Mesh's floor: its HTTP server and engine client passing requests through "
                        "(bench.floor), and the same with a streamed upstream")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mesh-ab-"))
    engine = start_engine(work)
    # The engine is measured too: its TTFT is what the others' "added" is counted from.
    targets = [engine, start_proxy(work, engine.url)]
    databases: list[str] = []

    def database(name: str) -> str:
        if not a.pg:
            return f"sqlite:///{work}/{name}.db"
        made = create_pg_database()
        if made is None:
            raise SystemExit("no PostgreSQL at 127.0.0.1:5432")
        databases.append(made[1])
        return made[0]

    try:
        if a.floor:
            targets += [start_floor(work, engine.url), start_floor(work, engine.url, stream_upstream=True)]
        targets.append(start_mesh("base", "Mesh (--base)", work, mesh_config(database("base"), engine.url),
                                  env={"PYTHONPATH": str(Path(a.base).resolve())}))
        # Its own src by absolute path: a relative PYTHONPATH (``PYTHONPATH=src``) means nothing in
        # the gateway's working directory, where the environment's installed Mesh would be run instead.
        targets.append(start_mesh("this", "Mesh (this checkout)", work, mesh_config(database("this"), engine.url),
                                  env={"PYTHONPATH": str(ROOT / "src")}))
        point = Point(a.mode, a.concurrency)
        key = "cpu_us_per_chunk" if a.mode == "stream" else "cpu_ms_per_req"
        seen: dict[str, list[float]] = {t.name: [] for t in targets}
        ttft: dict[str, list[float]] = {t.name: [] for t in targets}
        for r in range(a.rounds):
            for t in targets if r % 2 == 0 else targets[::-1]:
                summary = summarize(run_load(t, point, a.duration, 0.5), point)
                if summary[key] is not None:
                    seen[t.name].append(summary[key])
                if summary.get("ttft_p50_ms") is not None:
                    ttft[t.name].append(summary["ttft_p50_ms"])
        unit = "us/chunk" if a.mode == "stream" else "ms/request"
        proxy = statistics.median(seen["proxy"])
        engine_ttft = statistics.median(ttft[engine.name]) if ttft[engine.name] else None
        for t in targets:
            m = statistics.median(seen[t.name])
            first = ""
            if ttft[t.name]:
                first = f", TTFT p50 median {statistics.median(ttft[t.name]):.3f} ms"
                if engine_ttft is not None and t is not engine:
                    first += f" (+{statistics.median(ttft[t.name]) - engine_ttft:.3f} over the engine)"
            print(f"{t.label:<28} {point.name}: CPU median {m:.4g} {unit} ({m / proxy:.2f}x the proxy), "
                  f"min {min(seen[t.name]):.4g}, {len(seen[t.name])} windows{first}")
    finally:
        for t in targets:
            t.server.stop()
        for name in databases:
            drop_pg_database(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
