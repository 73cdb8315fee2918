"""ASGI app assembly: routes, lifespan. Everything else lives in the modules it names."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from mesh.accounts.principal import Principal
from mesh.admin.audit import audit_routes
from mesh.admin.fleet import fleet_routes
from mesh.admin.routes import admin_routes, check_admin
from mesh.api.chat import chat_completions
from mesh.api.endpoint import Endpoint
from mesh.api.messages import count_tokens, messages
from mesh.api.models import get_model, list_models
from mesh.api.responses import JSON, error_response
from mesh.api.responses_api import create_response, responses_routes
from mesh.api.workers import worker_routes
from mesh.billing.routes import customer_routes
from mesh.billing.services import Services
from mesh.config import Settings
from mesh.console.routes import console_routes
from mesh.console.topups import AutoTopups
from mesh.errors import MeshError, NotFound
from mesh.gateway import Gateway
from mesh.http.credentials import presented_credential, single
from mesh.observability.metrics import CONTENT_TYPE
from mesh.protocols import openai_errors


async def _health(request: Request) -> Response:
    return JSON({"status": "ok"})


async def _ready(request: Request) -> Response:
    """Readiness for a load balancer: 503 while the database or Redis cannot be reached,
    billing writes are failing or no replica is healthy (``/health/live`` stays 200)."""
    gateway: Gateway = request.app.state.gateway
    checks = await gateway.readiness()
    ready = all(checks.values())
    return JSON({"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)


async def _metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if not gateway.settings.server.metrics_public:
        try:
            check_admin(request, gateway.settings.admin_key)
        except MeshError as err:
            return error_response(err, openai_errors.render_error)
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound(f"Unknown path: {request.method} {request.url.path}"), openai_errors.render_error)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    err = NotFound(f"Method {request.method} is not allowed on {request.url.path}")
    err.status = 405
    return error_response(err, openai_errors.render_error)


def _services(request: Request) -> Services:
    services: Services = request.app.state.gateway.services
    return services


async def _principal(request: Request) -> Principal:
    """Key authentication for the customer billing routes, exactly as for inference."""
    gateway: Gateway = request.app.state.gateway
    raw = presented_credential(single(request.headers, "authorization"), single(request.headers, "x-api-key"))
    principal: Principal = await gateway.services.authenticator.authenticate(raw)
    return principal


def routes() -> list[BaseRoute]:
    return [
        Route("/health", _health, methods=["GET"]),
        Route("/health/live", _health, methods=["GET"]),  # the process runs and serves HTTP
        Route("/health/ready", _ready, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        *responses_routes(),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        *customer_routes(_services, _principal, lambda r: r.app.state.gateway.limiter),
        *admin_routes(_services),
        *worker_routes(),
        *fleet_routes(lambda r: r.app.state.gateway.router, lambda r: r.app.state.gateway.settings.admin_key),
        *audit_routes(lambda r: r.app.state.gateway),
    ]


# Allocations between young collections (CPython's default is 700). Requests make many
# short-lived containers; with the default and the whole heap in view, the collector was
# 5-6% of the gateway's CPU in py-spy profiles under load (bench/README.md).
_GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Once the gateway is built: its long-lived objects (modules, settings, pools, caches)
    leave the collector's view (``gc.freeze``), so the full collections that still run scan
    only what requests made, and young collections run less often. Cycles are still found.
    ``mesh serve`` starts with the collector off (``cli/serve.py``): it is turned on here.

    No collection first: the start leaves ~140 cyclic garbage objects (counted with SQLite
    and everything on), which frozen cost nothing, and a full pass over the ~100k objects
    it keeps cost 0.12-0.16 s of the start to first answer (as gc.freeze's docs advise:
    freeze, not collect then freeze)."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)
    gc.enable()


# The inference endpoints (POST only, no path parameters): ``MeshApp`` calls them straight
# from the scope. Their own wrapper (``api/endpoint.py``) already turns every exception into
# the protocol's error response, which is all Starlette's middleware would add.
_DIRECT: dict[str, Endpoint] = {
    "/v1/chat/completions": chat_completions,
    "/v1/messages": messages,
    "/v1/messages/count_tokens": count_tokens,
    "/v1/responses": create_response,
}


class MeshApp(Starlette):
    """Starlette, except that a ``POST`` to an inference path skips the layers between
    uvicorn and its endpoint (error middleware, exception middleware, router, route,
    ``request_response``): five calls and closures per request, about as much CPU as
    Mesh's own admission step. Every other request takes Starlette's way."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            direct = _DIRECT.get(scope["path"])
            if direct is not None:
                scope["app"] = self
                response = await direct(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, tune_gc: bool = False) -> Starlette:
    """The app; ``tune_gc`` (the served process only, not apps built inside a test run)
    tunes the process's garbage collector once the gateway has started."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = await Gateway.start(settings)
        app.state.gateway = gateway
        topping_up = AutoTopups(gateway.services.database, settings.console.payments)
        topping_up.start()
        if tune_gc:
            _tune_gc()
        try:
            yield
        finally:
            await topping_up.aclose()
            await gateway.aclose()

    return MeshApp(
        routes=[*routes(), *console_routes(settings)],
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )


def app_from_environment() -> Starlette:
    """The uvicorn factory: settings from ``MESH_CONFIG`` and ``MESH_*`` (one per worker)."""
    from mesh.config import load_settings
    from mesh.observability.logging import configure

    settings = load_settings()
    configure(settings.logging)
    return create_app(settings, tune_gc=True)
