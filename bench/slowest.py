"""Where the slowest requests spend their time, under load.

    python -m bench.slowest [--concurrency 16] [--seconds 6] [--mode chat|stream]

Starts the bench engine and a Mesh gateway (SQLite, everything on, as ``make bench``) whose
request path's steps (authenticate, rate limits, the credit hold, the route to a first
event, the rest of the answer, settlement) are timed per request, runs the load, and prints
each step's median over all requests and over the slowest 1%, then the slowest few. A step
that is fast at the median and slow at p99 is where the tail comes from (bench/README.md,
"The slowest requests"). A name that moved in the code fails here at start, not silently.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_STEPS = ("authenticate", "limits", "hold", "route", "answer", "settle", "total")
_REQUEST: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("request", default=None)
_DONE: list[dict[str, float]] = []


def _timed(owner: Any, name: str, step: str) -> None:
    f: Callable[..., Awaitable[Any]] = getattr(owner, name)

    @functools.wraps(f)
    async def wrapped(*a: Any, **k: Any) -> Any:
        times, start = _REQUEST.get(), time.perf_counter()
        try:
            return await f(*a, **k)
        finally:
            if times is not None:
                times[step] = times.get(step, 0.0) + (time.perf_counter() - start) * 1000

    setattr(owner, name, wrapped)


def _instrument() -> None:
    import mesh.api.inference
    import mesh.app
    from mesh.pipeline import Pipeline

    _timed(Pipeline, "authenticate", "authenticate")
    _timed(Pipeline, "limit", "limits")
    _timed(Pipeline, "_hold", "hold")
    _timed(Pipeline, "route", "route")
    _timed(Pipeline, "_settle_now", "settle")
    _timed(mesh.api.inference, "aggregate", "answer")  # a non-streamed answer's rest
    call = mesh.app.MeshApp.__call__

    @functools.wraps(call)
    async def app(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await call(self, scope, receive, send)
        times: dict[str, float] = {}
        _REQUEST.set(times)
        start = time.perf_counter()
        try:
            return await call(self, scope, receive, send)
        finally:
            times["total"] = (time.perf_counter() - start) * 1000
            _DONE.append(times)

    mesh.app.MeshApp.__call__ = app  # type: ignore[method-assign]


def _median(rows: list[dict[str, float]], step: str) -> float:
    values = sorted(r.get(step, 0.0) for r in rows)
    return values[len(values) // 2] if values else 0.0


def _measure(mode: str, concurrency: int, seconds: float) -> None:
    from bench.instrumented import gateway
    from bench.measure import Point, run_load, summarize

    point = Point(mode, concurrency)
    with gateway(__file__, "mesh-slowest-") as run:
        summary = summarize(run_load(run.mesh, point, seconds, 0.5), point)
    rows = sorted(run.gathered[200:], key=lambda r: r["total"])  # the first requests warm up
    slowest = rows[int(len(rows) * 0.99):]
    print(f"{point.name}: client p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms; "
          f"{len(rows)} requests timed in the gateway (ms)")
    print(f"  {'':<14}" + "".join(f"{s:>13}" for s in _STEPS))
    for label, group in (("median", rows), ("slowest 1%", slowest)):
        print(f"  {label:<14}" + "".join(f"{_median(group, s):>13.2f}" for s in _STEPS))
    for r in slowest[-5:]:
        print(f"  {'':<14}" + "".join(f"{r.get(s, 0.0):>13.2f}" for s in _STEPS))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--serve"]:  # in the gateway's process, run as a script
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.instrumented import serve

        serve(Path(args[1]), args[3:], _instrument, _DONE)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("chat", "stream"), default="chat")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6.0)
    a = p.parse_args(args)
    _measure(a.mode, a.concurrency, a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
