"""HTTP layer of the test engine: a GPU-free imitation of vLLM's OpenAI-compatible server.

    python tests/testengine/server.py --host 127.0.0.1 --port 0 [--models a,b] [--name replica-a]
                                      [--chunk-delay-ms 0] [--max-model-len 4096]

prints exactly one line ``READY http://HOST:PORT`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

try:
    from . import behaviour, control, tokens, wire
    from .control import SLOW_FIRST_TOKEN_SECONDS, error_response, jsonr, read_json
    from .state import STATE, EngineState, Tracker, valid_fault
except ImportError:  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from testengine import behaviour, control, tokens, wire
    from testengine.control import SLOW_FIRST_TOKEN_SECONDS, error_response, jsonr, read_json
    from testengine.state import STATE, EngineState, Tracker, valid_fault

DEFAULT_MODELS = ["test-model", "test-reasoner", "test-reasoner-vllm"]
REPLICA_HEADER = "X-Testengine-Replica"
HANG_SECONDS = 3600.0
DROP_AFTER_CHUNKS = 3
POLL_SECONDS = 0.05
CUT_OFF_GRACE = 0.002


@dataclass
class EngineOptions:
    host: str = "127.0.0.1"
    port: int = 0
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    name: str = "testengine"
    chunk_delay_ms: float = 0.0
    max_model_len: int = 4096
    usage_factor: int = 1  # > 1: a lying engine that reports this many times the real usage

    @classmethod
    def coerce(cls, options: Any = None) -> EngineOptions:
        if isinstance(options, cls):
            return options
        raw = dict(options or {}) if not isinstance(options, argparse.Namespace) else vars(options)
        known = {f.name for f in fields(cls)}
        opts = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        if isinstance(opts.models, str):
            opts.models = [m.strip() for m in opts.models.split(",") if m.strip()]
        if not opts.models:
            raise ValueError("at least one model must be served")
        return opts


OPTIONS = web.AppKey("testengine_options", EngineOptions)
STARTED = int(time.time())


class ClientGone(Exception):
    """The client closed the connection while we were working."""


def gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def pause(request: web.Request, seconds: float) -> None:
    """Sleep, but notice a client disconnect (even without aiohttp's handler cancellation)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + max(0.0, seconds)
    while True:
        if gone(request):
            raise ClientGone
        left = end - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, POLL_SECONDS))


# -- plain vLLM endpoints ------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return jsonr({"version": "0.0.0+testengine"})


async def list_models(request: web.Request) -> web.Response:
    opts = request.app[OPTIONS]
    data = [
        {
            "id": m,
            "object": "model",
            "created": STARTED,
            "owned_by": "testengine",
            "root": m,
            "parent": None,
            "max_model_len": opts.max_model_len,
        }
        for m in opts.models
    ]
    return jsonr({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[STATE].metrics()
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def tokenize(request: web.Request) -> web.Response:
    opts = request.app[OPTIONS]
    try:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise behaviour.ApiError(400, "Request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model not in opts.models:
            raise behaviour.ApiError(404, f"The model `{model}` does not exist.")
        if isinstance(body.get("messages"), list):
            ids = tokens.prompt_token_ids([m for m in body["messages"] if isinstance(m, dict)])
        elif isinstance(body.get("prompt"), str):
            ids = tokens.text_token_ids(body["prompt"])
        else:
            raise behaviour.ApiError(400, "Either `prompt` (a string) or `messages` is required.")
    except behaviour.ApiError as err:
        return error_response(err)
    return jsonr({"count": len(ids), "max_model_len": opts.max_model_len, "tokens": ids, "token_strs": None})


# -- chat completions ----------------------------------------------------------------------------
@dataclass
class Job:
    """Everything needed to deliver one planned chat reply."""

    request: web.Request
    body: dict[str, Any]
    plan: behaviour.Plan
    tracker: Tracker
    rid: str
    created: int
    cached: int
    first_delay: float
    chunk_delay: float
    drop: bool
    error_code: int | None = None  # an error event after a few chunks, as vLLM sends when it fails mid-stream


async def chat(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    st.requests += 1
    if request.transport is not None:
        st.saw_connection(request.transport.get_extra_info("peername"))
    key, tracker = st.begin(None)
    try:
        return await _chat(request, tracker)
    except behaviour.ApiError as err:
        st.failed += 1
        return error_response(err)
    except ClientGone:
        _cancelled(st, tracker)
        return web.Response(status=499)
    except asyncio.CancelledError:
        _cancelled(st, tracker)
        raise
    finally:
        st.end(key)


def _cancelled(st: EngineState, tracker: Tracker) -> None:
    if not tracker.cancelled:
        tracker.cancelled = True
        st.cancelled += 1


async def _chat(request: web.Request, tracker: Tracker) -> web.StreamResponse:
    st, opts = request.app[STATE], request.app[OPTIONS]
    body = await read_json(request)
    st.log.append(body)
    st.headers.append({str(k): v for k, v in request.headers.items()})  # istr keys: orjson wants str
    model, budget = behaviour.validate(body, opts.models, opts.max_model_len)
    tracker.model = model
    plan = behaviour.plan_request(body, model, budget)
    if opts.usage_factor != 1:
        plan.prompt_tokens *= opts.usage_factor
        for choice in plan.choices:
            choice.completion_tokens *= opts.usage_factor
    d = plan.directives
    fault = st.take_fault()
    # A directive's fault stands for the replica that first served the prompt: a continuation
    # (another replica resuming the stream) is served clean. Control-API faults apply to all.
    directed = d.fault if d.fault and valid_fault(d.fault) and not behaviour.continuing(body) else None
    mode = fault.mode if fault else directed
    first_delay = d.delay + (fault.delay if fault else 0.0)
    if mode == "slow_first_token" and fault is None:
        first_delay += SLOW_FIRST_TOKEN_SECONDS
    if mode == "hang":
        await pause(request, HANG_SECONDS)
    if mode is not None and mode.isdigit():
        await pause(request, first_delay)
        raise behaviour.ApiError(int(mode), "injected failure")
    base_id = request.headers.get("X-Request-Id") or secrets.token_hex(16)
    job = Job(
        request,
        body,
        plan,
        tracker,
        "chatcmpl-" + base_id,
        int(time.time()),
        st.cached_tokens(body["messages"]),
        first_delay,
        d.chunk_delay if d.chunk_delay is not None else opts.chunk_delay_ms / 1000.0,
        mode == "drop",
        int(mode.removeprefix("error_")) if mode is not None and mode.startswith("error_") else None,
    )
    tracker.tokens = plan.prompt_tokens
    if body.get("stream"):
        return await _stream(job)
    return await _complete(job)


def _finished(job: Job) -> None:
    st, plan = job.request.app[STATE], job.plan
    st.completed += 1
    st.prompt_tokens_total[plan.model] += plan.prompt_tokens
    st.generation_tokens_total[plan.model] += sum(c.completion_tokens for c in plan.choices)
    for c in plan.choices:
        st.finished[(plan.model, c.finish_reason)] += 1
    first = plan.choices[0]
    reply = {
        "role": "assistant",
        "content": None if first.tool_calls else first.content,
        "tool_calls": first.tool_calls,
    }
    st.remember([*job.body["messages"], reply])


def _cut_off(job: Job) -> None:
    job.tracker.cancelled = True  # counted here, not as a cancellation
    job.request.app[STATE].cut_off += 1
    _finished(job)


async def _abort(request: web.Request) -> None:
    await asyncio.sleep(POLL_SECONDS)  # let the chunks already written reach the socket
    if request.transport is not None:
        request.transport.abort()


async def _complete(job: Job) -> web.StreamResponse:
    request, st = job.request, job.request.app[STATE]
    await pause(request, job.first_delay)
    job.tracker.phase = "running"
    st.remember(job.body["messages"])
    if job.drop:
        st.failed += 1
        await _abort(request)
        return web.Response(status=499)
    steps = max(len(c.pieces) for c in job.plan.choices)
    await pause(request, job.chunk_delay * steps)
    job.tracker.tokens += sum(c.completion_tokens for c in job.plan.choices)
    _finished(job)
    return jsonr(wire.completion(job.plan, job.rid, job.created, job.cached))


async def _stream(job: Job) -> web.StreamResponse:
    request, st = job.request, job.request.app[STATE]
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    await resp.prepare(request)
    encoder = wire.StreamEncoder(job.plan, job.body, job.rid, job.created, job.cached)
    try:
        await pause(request, job.first_delay)
        job.tracker.phase = "running"
        st.remember(job.body["messages"])
        sent = 0
        for kind, data in encoder.events():
            if job.error_code and (kind == "finish" or (kind == "piece" and sent >= DROP_AFTER_CHUNKS)):
                st.failed += 1
                error = behaviour.ApiError(job.error_code, "injected failure mid-stream").body()
                await resp.write(b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if job.drop and (kind == "finish" or (kind == "piece" and sent >= DROP_AFTER_CHUNKS)):
                st.failed += 1
                await _abort(request)
                return resp
            if kind == "piece":
                stall = None if behaviour.continuing(job.body) else job.plan.directives.stall
                if stall is not None and sent >= stall:
                    await pause(request, HANG_SECONDS)  # silent, connection open, until the client goes
                if job.chunk_delay:
                    await pause(request, job.chunk_delay)
                sent += 1
                job.tracker.tokens += 1
                job.tracker.sent += 1
            if gone(request):
                raise ClientGone
            await resp.write(data)
        # Like vLLM, the answer is only done once its response has ended: a client that hangs
        # up right after [DONE] (before the end of the chunked body) cuts a finished answer off.
        try:
            await asyncio.sleep(CUT_OFF_GRACE)
        except asyncio.CancelledError:  # aiohttp cancels the handler when the client hangs up
            _cut_off(job)
            raise
        if gone(request):
            _cut_off(job)
            return resp
        await resp.write_eof()
    except (ClientGone, ConnectionError):
        _cancelled(st, job.tracker)
        return resp
    _finished(job)
    return resp


async def _replica_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REPLICA_HEADER] = request.app[OPTIONS].name


def make_app(options: Any = None) -> web.Application:
    """Build the engine app; ``options`` is an EngineOptions, a dict, an argparse Namespace or None."""
    opts = EngineOptions.coerce(options)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[OPTIONS] = opts
    app[STATE] = EngineState(name=opts.name, models=list(opts.models), max_model_len=opts.max_model_len)
    app.on_response_prepare.append(_replica_header)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/version", version)
    r.add_get("/v1/models", list_models)
    r.add_get("/metrics", metrics)
    r.add_post("/tokenize", tokenize)
    r.add_post("/v1/chat/completions", chat)
    control.add_routes(r)
    return app


def parse_args(argv: list[str] | None = None) -> EngineOptions:
    p = argparse.ArgumentParser(description="GPU-free vLLM imitation for tests")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--name", default="testengine", help="replica name (stats, X-Testengine-Replica)")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--usage-factor", type=int, default=1, help="report this many times the real usage (a liar)")
    return EngineOptions.coerce(p.parse_args(argv))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve(opts: EngineOptions) -> None:
    runner = web.AppRunner(make_app(opts), handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    sock = _listen(opts.host, opts.port)
    await web.SockSite(runner, sock).start()
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    print(f"READY http://{host}:{sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
