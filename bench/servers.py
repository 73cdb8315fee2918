"""uvicorn+httptools (``mesh serve``, with Mesh's edge limits) against granian, on Mesh's routes.

    python -m bench.servers [--rounds 3] [--duration 3]

Issue 16 asked whether another well-kept ASGI server makes Mesh cheaper per request. The
same Mesh app (``mesh.app:app_from_environment``, SQLite, everything on) runs once under
``mesh serve`` and once under granian (Rust HTTP, uvloop, one worker), beside the minimal
proxy as the baseline; the targets alternate within each round, like ``make bench``. granian
is installed, pinned with hashes (``bench/granian-requirements.txt``), into bench/.granian,
never into Mesh's environment. Prints each round and the medians as ratios to the proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.measure import Point, Sample, run_load, summarize
from bench.targets import ROOT, Target, mesh_config, start_engine, start_mesh, start_proxy

TARGET_DIR = ROOT / "bench" / ".granian"
REQUIREMENTS = ROOT / "bench" / "granian-requirements.txt"
POINTS = (Point("chat", 1), Point("chat", 16), Point("stream", 16))


def ensure_granian() -> Path:
    marker = TARGET_DIR / ".installed"
    stamp = REQUIREMENTS.read_text()
    if not (marker.exists() and marker.read_text() == stamp):
        uv = ROOT / ".tools" / "bin" / "uv"
        subprocess.run([str(uv), "pip", "install", "-q", "--python", sys.executable, "--target", str(TARGET_DIR),
                        "--require-hashes", "-r", str(REQUIREMENTS)], check=True)
        marker.write_text(stamp)
    return TARGET_DIR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    args = p.parse_args(argv)
    granian = ensure_granian()
    work = Path(tempfile.mkdtemp(prefix="mesh-servers-"))
    engine = start_engine(work)
    targets: dict[str, Target] = {}
    try:
        targets["proxy"] = start_proxy(work, engine.url)
        targets["uvicorn"] = start_mesh("uvicorn", "uvicorn", work, mesh_config(f"sqlite:///{work}/u.db", engine.url))
        targets["granian"] = start_mesh(
            "granian", "granian", work, mesh_config(f"sqlite:///{work}/g.db", engine.url),
            command=lambda cfg, port: [
                sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1",
                "--port", str(port), "--loop", "uvloop", "--workers", "1", "--no-ws", "--log-level", "warning",
                "mesh.app:app_from_environment"],
            env={"MESH_CONFIG": str(work / "granian.yaml"),
                 "PYTHONPATH": os.pathsep.join([str(granian), str(ROOT / "src")])})
        totals: dict[tuple[str, str], Sample] = {}
        for rnd in range(1, args.rounds + 1):
            for point in POINTS:
                for name, target in targets.items():
                    sample = run_load(target, point, args.duration, 0.5)
                    totals.setdefault((point.name, name), Sample()).add(sample)
                    r = summarize(sample, point)
                    print(f"round {rnd} {point.name:<10} {name:<8} {r['rate']:>8,.0f}/s "
                          f"cpu {r['cpu_ms_per_req']:.3f} ms/req errors {r['errors']}", flush=True)
        out = {}
        for point in POINTS:
            rows = {name: summarize(totals[(point.name, name)], point) for name in targets}
            key = "cpu_us_per_chunk" if point.mode == "stream" else "cpu_ms_per_req"
            base = rows["proxy"][key]
            out[point.name] = {name: {"cpu": r[key], "x_proxy": round(r[key] / base, 2),
                                      "latency_p50_ms": r.get("ttft_p50_ms") or r.get("p50_ms"),
                                      "errors": r["errors"]} for name, r in rows.items()}
        print(json.dumps(out, indent=1))
    finally:
        for target in [*targets.values(), engine]:
            target.server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
