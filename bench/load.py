"""The load generator: a separate process, so that its CPU never mixes with the target's.

    python -m bench.load --url http://127.0.0.1:PORT --mode chat|stream|hold --concurrency N
                         [--duration S] [--warmup S] [--max-requests M] [--tokens T] [--key K]

``chat`` and ``stream`` run N workers that each send one request after another over one
shared aiohttp connector; ``hold`` opens N streams once (``--delay`` makes the engine hold
their first token) and reads them to the end. Stdout carries ``GO`` when the measured
window opens, ``END`` when it closes (the runner samples the target's CPU at both), then
one JSON object with the results of that window only: requests and streams that completed
in it (latencies), first tokens that arrived in it (TTFT) and SSE data events received in
it by any stream (``chunks``; a slow target's streams may outlast the window).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

MODEL = "bench-model"
_DATA = b"data:"
_DONE = b"[DONE]"
MAX_ERROR_SAMPLES = 3


@dataclass
class Window:
    """What the measured window saw; requests are counted when they complete inside it."""

    open: bool = False
    closed: bool = False
    started: float = 0.0
    ended: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    chunks: int = 0  # SSE data events received inside the window, by every stream, finished or not
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text[:300])


def request_body(mode: str, tokens: int, delay: float) -> bytes:
    directive = f"[tokens:{tokens}]" + (f" [delay:{delay}]" if delay else "")
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Benchmark request, answer briefly. {directive}"}],
        "max_tokens": 256,
        "stream": mode != "chat",
    }
    if mode != "chat":
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool,
              tokens: int, win: Window) -> None:
    t0 = time.perf_counter()
    first: float | None = None
    events = 0
    try:
        async with session.post(url, data=body, headers=headers) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")
                if win.open and not win.closed:
                    win.error(f"HTTP {r.status}: {text}")
                return
            if stream:
                tail = b""
                async for data in r.content.iter_any():
                    buf = tail + data
                    n = buf.count(_DATA)
                    if n:
                        if first is None:
                            first = time.perf_counter()
                            if win.open and not win.closed:
                                win.ttfts.append(first - t0)
                        events += n
                        if win.open and not win.closed:
                            win.chunks += n
                    tail = buf[-8:]
                ok = _DONE in tail and events >= tokens
            else:
                payload = await r.read()
                ok = b'"choices"' in payload
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if win.open and not win.closed:
            win.error(f"{type(exc).__name__}: {exc}")
        return
    t1 = time.perf_counter()
    if not win.open or win.closed:
        return
    if not ok:
        win.error(f"incomplete response ({events} events)")
        return
    win.latencies.append(t1 - t0)
    if stream:
        win.events.append(events)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + "/v1/chat/completions"
    keys = args.key.split(",")
    headers_by_worker = [{"Content-Type": "application/json", "Authorization": f"Bearer {k}"} for k in keys]
    body = request_body(args.mode, args.tokens, args.delay)
    stream = args.mode != "chat"
    win = Window()
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as s:

        async def worker(i: int) -> None:
            headers = headers_by_worker[i % len(keys)]
            while not stop.is_set():
                await one(s, url, body, headers, stream, args.tokens, win)
                if win.open and len(win.latencies) + win.errors >= args.max_requests:
                    stop.set()

        async def hold(i: int) -> None:
            await one(s, url, body, headers_by_worker[i % len(keys)], stream, args.tokens, win)

        win.open, win.started = (True, time.perf_counter()) if args.mode == "hold" or args.warmup <= 0 else (False, 0)
        tasks = [asyncio.create_task(hold(i) if args.mode == "hold" else worker(i)) for i in range(args.concurrency)]
        if not win.open:
            await asyncio.wait(tasks, timeout=args.warmup)
            win.open, win.started = True, time.perf_counter()
        print("GO", flush=True)
        deadline = win.started + args.duration
        while not stop.is_set() and time.perf_counter() < deadline and not all(t.done() for t in tasks):
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(0.05, max(0.0, deadline - time.perf_counter())))
            except TimeoutError:
                pass
        win.closed, win.ended = True, time.perf_counter()
        print("END", flush=True)
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=args.drain)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "tokens": args.tokens,
        "window_s": win.ended - win.started,
        "completed": len(win.latencies),
        "errors": win.errors,
        "error_samples": win.error_samples,
        "latencies_ms": [round(x * 1000, 3) for x in win.latencies],
        "ttfts_ms": [round(x * 1000, 3) for x in win.ttfts],
        "events_min": min(win.events) if win.events else 0,
        "chunks": win.chunks,
        "loadgen_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Bench load generator (prints GO, END, then JSON).")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=("chat", "stream", "hold"), default="chat")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds (hold: the longest wait)")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--delay", type=float, default=0.0, help="engine-side hold before the first token")
    p.add_argument("--key", default="none", help="API key; a comma-separated list spreads workers over keys")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--drain", type=float, default=5.0, help="seconds to let in-flight requests finish")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
