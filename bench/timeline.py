"""Where a request's time goes before its first byte, at concurrency 1.

    python -m bench.timeline [--mode stream|chat] [--seconds 4]

Starts the bench engine and a Mesh gateway (SQLite, everything on, as ``make bench``) whose
request path is wrapped at its named steps (the edge's first read, the app, authenticate,
the body, the protocol's parse, resolve, admit, route, the router, the engine client's
request and first reads, the response's first write), runs one client for a while, and
prints the median time of each mark after the request's first byte reached the gateway.
The wrappers cost a microsecond or two each: read the gaps between steps, not the total.
A name that moved in the code fails here at start, not silently.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MARKS: list[dict[str, int]] = []
_current: dict[str, int] = {}


def _mark(label: str) -> None:
    _current.setdefault(label, time.perf_counter_ns())


def _around(owner: Any, name: str, label: str) -> None:
    """Mark entry and exit of ``owner.name`` (a coroutine function or a plain one)."""
    f = getattr(owner, name)
    target = f.__func__ if isinstance(f, staticmethod) else f
    if getattr(target, "__code__", None) is not None and target.__code__.co_flags & 0x80:  # a coroutine

        @functools.wraps(target)
        async def wrapped(*a: Any, **k: Any) -> Any:
            _mark(f"{label} >")
            try:
                return await target(*a, **k)
            finally:
                _mark(f"{label} <")
    else:

        @functools.wraps(target)
        def wrapped(*a: Any, **k: Any) -> Any:
            _mark(f"{label} >")
            try:
                return target(*a, **k)
            finally:
                _mark(f"{label} <")

    setattr(owner, name, staticmethod(wrapped) if isinstance(owner.__dict__.get(name), staticmethod) else wrapped)


def _before(owner: Any, name: str, label: str, first: Callable[..., bool] | None = None) -> None:
    """Mark each call of ``owner.name`` (only the first of a request counts)."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapped(self: Any, *a: Any, **k: Any) -> Any:
        if first is None or first(self, *a):
            _mark(label)
        return f(self, *a, **k)

    setattr(owner, name, wrapped)


def _instrument() -> None:
    import mesh.api.chat
    import mesh.api.common
    import mesh.app
    import mesh.http.server as edge
    from mesh.engines.http1 import Http1Client, _Connection
    from mesh.engines.openai_compat import OpenAIEngine
    from mesh.pipeline import Pipeline
    from mesh.routing.router import Router

    def new_request(proto: Any, data: bytes) -> bool:
        if not proto._headers_done and data[:4] in (b"POST", b"GET "):
            if _current:
                _MARKS.append(dict(_current))
            _current.clear()
            return True
        return False

    _before(edge.MeshHttpProtocol, "data_received", "0 first read", new_request)
    _before(edge._HeadersWithBody, "write", "9 first write to the client")
    _around(mesh.app.MeshApp, "__call__", "1 app")
    _around(Pipeline, "authenticate", "2 authenticate")
    _around(mesh.api.common, "read_body", "3 body")
    _around(mesh.api.chat.openai_chat, "parse_request", "4 parse")
    _around(Pipeline, "resolve", "5 resolve")
    _around(Pipeline, "admit", "6 admit")
    _around(Pipeline, "route", "7 route")
    _around(Router, "open", "7a router")
    _before(OpenAIEngine, "relay", "7b engine adapter")
    _around(Http1Client, "post", "7c engine request")
    _before(_Connection, "send", "7d written to the engine")
    _before(_Connection, "data_received", "7e engine's first bytes")
    _around(OpenAIEngine, "_first_events", "7f engine's first output")


def _measure(mode: str, seconds: float) -> None:
    from bench.instrumented import gateway
    from bench.measure import Point, run_load, summarize

    point = Point(mode, 1)
    with gateway(__file__, "mesh-timeline-") as run:
        direct = summarize(run_load(run.engine, point, seconds, 0.5), point)
        summary = summarize(run_load(run.mesh, point, seconds, 0.5), point)
    marks = run.gathered[100:]  # the first requests warm up
    key = "ttft_p50_ms" if mode == "stream" else "p50_ms"
    print(f"{mode}, c=1: the engine alone {direct[key]:.3f} ms, through Mesh {summary[key]:.3f} ms "
          f"({'first token' if mode == 'stream' else 'whole answer'}, p50; {len(marks)} requests marked)")
    for label in sorted({k for m in marks for k in m}):
        gaps = [(m[label] - m["0 first read"]) / 1000 for m in marks if label in m and "0 first read" in m]
        print(f"  {label:<32} {statistics.median(gaps):8.1f} us")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--serve"]:  # in the gateway's process, run as a script
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.instrumented import serve

        serve(Path(args[1]), args[3:], _instrument, _MARKS)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("stream", "chat"), default="stream")
    p.add_argument("--seconds", type=float, default=4.0)
    a = p.parse_args(args)
    _measure(a.mode, a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
