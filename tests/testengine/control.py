"""Control API used by tests: recorded requests, injected faults, stats and pretend load."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .behaviour import ApiError
from .state import STATE, valid_fault

SLOW_FIRST_TOKEN_SECONDS = 5.0


def jsonr(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    return jsonr(err.body(), err.status)


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from None


async def control_requests(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if request.method == "DELETE":
        st.log.clear()
        st.headers.clear()
        return jsonr({"ok": True})
    return jsonr(list(st.log))


async def control_headers(request: web.Request) -> web.Response:
    return jsonr(list(request.app[STATE].headers))


async def control_faults(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if request.method == "DELETE":
        st.faults.clear()
    elif request.method == "POST":
        try:
            body = await read_json(request)
            mode = str(body.get("mode", "")) if isinstance(body, dict) else ""
            if not valid_fault(mode):
                raise ApiError(400, f"unknown fault mode {mode!r}", param="mode")
            default_delay = SLOW_FIRST_TOKEN_SECONDS if mode == "slow_first_token" else 0.0
            count = body.get("count")
            delay = body.get("delay")
            st.add_fault(mode, 1 if count is None else int(count), default_delay if delay is None else float(delay))
        except (ApiError, TypeError, ValueError) as err:
            if not isinstance(err, ApiError):
                err = ApiError(400, str(err))
            return error_response(err)
    return jsonr({"faults": [f.as_json() for f in st.faults]})


async def control_stats(request: web.Request) -> web.Response:
    return jsonr(request.app[STATE].stats())


async def control_load(request: web.Request) -> web.Response:
    """Pretend extra load in /metrics: ``{"model": optional, "running", "waiting", "kv_cache_usage"}``."""
    st = request.app[STATE]
    if request.method == "DELETE":
        st.load.clear()
        return jsonr({"load": {}})
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        return error_response(ApiError(400, "expected a JSON object"))
    target = st.load.setdefault(str(body.get("model") or "*"), {})
    for k in ("running", "waiting", "kv_cache_usage"):
        if body.get(k) is not None:
            target[k] = float(body[k])
    return jsonr({"load": st.load})


async def control_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return jsonr({"ok": True})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_route("GET", "/control/requests", control_requests)
    r.add_route("DELETE", "/control/requests", control_requests)
    r.add_get("/control/headers", control_headers)
    for method in ("GET", "POST", "DELETE"):
        r.add_route(method, "/control/faults", control_faults)
    r.add_get("/control/stats", control_stats)
    r.add_route("POST", "/control/load", control_load)
    r.add_route("DELETE", "/control/load", control_load)
    r.add_post("/control/reset", control_reset)
