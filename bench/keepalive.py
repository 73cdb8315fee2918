"""Engine connections kept alive against closed after every answer (Mesh before issue 15).

Two Mesh gateways (SQLite, everything on) in front of one instant engine (whose body ends
a millisecond after [DONE]), one with the
engine's ``keep_alive: false``; the same load on each, alternating, for CPU per request of
Mesh and of the engine (a new connection costs both sides), and the engine's connection
count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.measure import Point, Sample, run_load, summarize
from bench.procs import cpu_seconds, http_json
from bench.targets import MODEL, Target, mesh_config, start_engine, start_mesh

POINTS = (Point("chat", 1), Point("stream", 16))
END_GAP_MS = 1.0


def compare(work: Path, rounds: int, duration: float, warmup: float,
            ours: Callable[[], list[int]], extra: list[Target], say: Callable[[str], None]) -> dict[str, Any]:
    # Its own engine, whose body ends a millisecond after [DONE], as a real engine's may: a
    # gateway that hangs up at [DONE] cuts the answer off and loses the connection.
    engine = start_engine(work, "--end-gap-ms", str(END_GAP_MS), name="engine-keepalive")
    extra.append(engine)
    targets: dict[str, Target] = {}
    for name, keep in (("after", True), ("before", False)):
        config = mesh_config(f"sqlite:///{work}/mesh-keepalive-{name}.db", engine.url)
        config["models"][0]["engines"][0]["keep_alive"] = keep
        targets[name] = start_mesh(f"mesh-keepalive-{name}", f"Mesh keep_alive={keep}", work, config)
        extra.append(targets[name])
    totals: dict[tuple[str, str], Sample] = {}
    engine_cpu: dict[tuple[str, str], list[float]] = {}  # [cpu seconds, requests served]
    connections: dict[str, int] = {}
    for rnd in range(1, rounds + 1):
        for point in POINTS:
            for name, target in targets.items():
                # The engine's CPU over the whole run (warm-up and drain too) over what it served then.
                stats0, cpu0 = http_json(engine.url + "/stats"), cpu_seconds(engine.server.pids())
                s = run_load(target, point, duration, warmup, ours=ours)
                stats1, cpu1 = http_json(engine.url + "/stats"), cpu_seconds(engine.server.pids())
                totals.setdefault((point.name, name), Sample()).add(s)
                acc = engine_cpu.setdefault((point.name, name), [0.0, 0.0])
                acc[0] += cpu1 - cpu0
                acc[1] += stats1["served"] - stats0["served"]
                key = f"{point.name} {name}"  # new engine connections, over every round
                connections[key] = connections.get(key, 0) + stats1["connections"] - stats0["connections"]
                r = summarize(s, point)
                say(f"round {rnd} keep-alive {name:<6} {point.name:<10} {r['rate']:>8,.1f}/s "
                    f"mesh {r['cpu_ms_per_req'] or 0:6.3f} ms/req, engine "
                    f"{1000 * (cpu1 - cpu0) / max(1, stats1['served'] - stats0['served']):6.3f} ms/req, "
                    f"{stats1['connections'] - stats0['connections']} engine connections")
    out: dict[str, Any] = {"model": MODEL, "points": {}, "engine_connections": connections}
    for point in POINTS:
        row: dict[str, Any] = {}
        for name in targets:
            r = summarize(totals[(point.name, name)], point)
            cpu, served = engine_cpu[(point.name, name)]
            mesh_ms = r["cpu_ms_per_req"]
            engine_ms = 1000 * cpu / served if served else None
            row[name] = {"mesh_cpu_ms_per_req": mesh_ms, "engine_cpu_ms_per_req": engine_ms, "rate": r["rate"],
                         "both_cpu_ms_per_req": (mesh_ms or 0) + (engine_ms or 0), "requests": served}
        out["points"][point.name] = row
    for t in [*targets.values(), engine]:
        t.server.stop()
    return out


def describe(result: dict[str, Any]) -> str:
    lines = ["Engine keep-alive, CPU per request (before: a new engine connection per answer):"]
    for point, row in result["points"].items():
        b, a = row["before"], row["after"]
        parts = []
        for label, k in (("Mesh", "mesh_cpu_ms_per_req"), ("engine", "engine_cpu_ms_per_req"),
                         ("both", "both_cpu_ms_per_req")):
            if a[k] and b[k]:
                parts.append(f"{label} {b[k]:.3f} -> {a[k]:.3f} ms ({100 * (a[k] - b[k]) / b[k]:+.0f}%)")
        conns = result["engine_connections"]
        lines.append(f"  {point:<10} " + ", ".join(parts)
                     + f"; {conns.get(point + ' before')} -> {conns.get(point + ' after')} new engine connections"
                     + f" for {int(b['requests'])} -> {int(a['requests'])} requests")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.keepalive [--rounds 2] [--duration 3]``: this section on its own."""
    import argparse
    import json
    import shutil

    from bench.run import RESULTS, say

    p = argparse.ArgumentParser(description="Mesh: engine keep-alive before and after")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    args = p.parse_args(argv)
    work = RESULTS / "work-keepalive"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    extra: list[Target] = []
    try:
        result = compare(work, args.rounds, args.duration, args.warmup,
                         lambda: [p for t in extra for p in t.server.pids()], extra, say)
    finally:
        for t in extra:
            t.server.stop()
    print(describe(result))
    (RESULTS / "keepalive-latest.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
