"""An instant Chat Completions engine: the cheapest server that speaks vLLM's wire.

    python -m bench.engine [--port 0]

prints ``READY http://127.0.0.1:PORT`` once it accepts connections. It answers at once
with pre-encoded JSON (cached per shape), honours ``stream``, ``stream_options``
(``include_usage`` and vLLM's ``continuous_usage_stats``) and two directives in the last
user message, as the test engine does: ``[tokens:N]`` (N content chunks, default 16) and
``[delay:S]`` (hold the first token S seconds). ``GET /stats`` reports requests in flight,
served, and TCP connections seen.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import sys
from typing import Any

import orjson
import uvloop
from aiohttp import web

DEFAULT_TOKENS = 16
CREATED = 1_700_000_000
_TOKENS = re.compile(rb"\[tokens:(\d+)\]")
_DELAY = re.compile(rb"\[delay:(\d+(?:\.\d*)?)\]")
_cache: dict[tuple[str, int, int, bool, bool], list[bytes]] = {}
_json_cache: dict[tuple[str, int, int], bytes] = {}
_in_flight = 0
_served = 0
_peers: set[object] = set()  # client (address, port) pairs seen: one per TCP connection
_END_GAP = 0.0  # seconds between [DONE] and the end of the body (--end-gap-ms)


def _usage(prompt: int, done: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _chunks(model: str, n: int, prompt: int, include_usage: bool, continuous: bool) -> list[bytes]:
    """The SSE events of one reply: role, n content chunks, finish, usage, [DONE]."""
    out: list[bytes] = []

    def chunk(delta: dict[str, Any], done: int, finish: str | None = None) -> None:
        body: dict[str, Any] = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if continuous:
            body["usage"] = _usage(prompt, done)
        out.append(b"data: " + orjson.dumps(body) + b"\n\n")

    chunk({"role": "assistant", "content": ""}, 0)
    for i in range(n):
        chunk({"content": f" tok{i}"}, i + 1)
    chunk({}, n, "length" if n else "stop")
    if include_usage:
        final = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [],
            "usage": _usage(prompt, n),
        }
        out.append(b"data: " + orjson.dumps(final) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def _completion(model: str, n: int, prompt: int) -> bytes:
    text = "".join(f" tok{i}" for i in range(n))
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length" if n else "stop",
                }
            ],
            "usage": _usage(prompt, n),
        }
    )


async def chat(request: web.Request) -> web.StreamResponse:
    global _in_flight, _served
    if request.transport is not None:
        _peers.add(request.transport.get_extra_info("peername"))
    raw = await request.read()
    body = orjson.loads(raw)
    model = str(body.get("model") or "bench-model")
    m = _TOKENS.search(raw)
    n = int(m.group(1)) if m else DEFAULT_TOKENS
    d = _DELAY.search(raw)
    prompt = len(raw) // 4 + 8
    _in_flight += 1
    try:
        if not body.get("stream"):
            if d:
                await asyncio.sleep(float(d.group(1)))
            jkey = (model, n, prompt)
            data = _json_cache.get(jkey) or _json_cache.setdefault(jkey, _completion(model, n, prompt))
            return web.Response(body=data, content_type="application/json")
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        key = (model, n, prompt, include_usage, include_usage and bool(opts.get("continuous_usage_stats")))
        events = _cache.get(key) or _cache.setdefault(key, _chunks(model, *key[1:]))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if d:
            await asyncio.sleep(float(d.group(1)))
        for event in events:
            await resp.write(event)
        if _END_GAP:
            await asyncio.sleep(_END_GAP)  # the body's end comes a moment after [DONE]
        await resp.write_eof()
        return resp
    finally:
        _in_flight -= 1
        _served += 1


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "bench-model", "object": "model"}]})


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"in_flight": _in_flight, "served": _served, "connections": len(_peers)})


async def serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await web.SockSite(runner, sock, backlog=4096).start()
    print(f"READY http://{host}:{sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--end-gap-ms", type=float, default=0.0,
                   help="pause between [DONE] and the end of the body, as an engine finishing its bookkeeping")
    args = p.parse_args(argv)
    global _END_GAP
    _END_GAP = args.end_gap_ms / 1000
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
