"""The worker API: GPU nodes register engine replicas and heartbeat their load.

::

    POST   /workers/v1/replicas              {model, engine_url, engine_model?, capacity?}
    POST   /workers/v1/replicas/{id}/heartbeat {healthy, running?, waiting?, kv_cache_usage?}
    DELETE /workers/v1/replicas/{id}

Authenticated by ``Authorization: Bearer <worker token>`` — worker tokens are their own
kind of credential (``workers.tokens`` in the config), separate from customer keys and the
admin key, and each may register only the models it lists, only engines on its own
address or its ``allow`` list (``workers/admission.py``), and models the config serves
with its own engines only where the operator opened them (``workers.allow_static``).
Errors use OpenAI's shape.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.responses import JSON
from mesh.config import WorkerToken
from mesh.errors import AuthenticationFailed, MeshError, ModelNotFound, NotFound, PermissionDenied
from mesh.gateway import Gateway
from mesh.http.body import read_body
from mesh.http.credentials import presented_credential, single
from mesh.http.ids import prefixed
from mesh.protocols import openai_errors
from mesh.protocols.validation import loads_object, validate
from mesh.request_context import RequestContext
from mesh.workers.admission import check_engine_host, engine_hosts, normalise_engine_url
from mesh.workers.registry import Registration

log = logging.getLogger("mesh.workers.api")

_MAX_BODY = 64 * 1024


class RegisterIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    engine_url: str = Field(min_length=8, max_length=500)
    engine_model: str | None = Field(default=None, max_length=200)
    capacity: int | None = Field(default=None, ge=1, le=100_000)
    # Which field the engine reads prior reasoning from (recent vLLM: "reasoning").
    reasoning_field: Literal["reasoning_content", "reasoning"] = "reasoning_content"



class HeartbeatIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    healthy: bool = True
    running: int | None = Field(default=None, ge=0)
    waiting: int | None = Field(default=None, ge=0)
    kv_cache_usage: float | None = Field(default=None, ge=0, le=1)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def worker_token(gw: Gateway, request: Request) -> WorkerToken:
    presented = presented_credential(single(request.headers, "authorization"))
    if presented is None:
        raise AuthenticationFailed("Missing worker token.")
    digest = _sha256(presented)
    for tok in gw.settings.workers.tokens:
        expected = tok.token_sha256 or _sha256(tok.token or "")
        if hmac.compare_digest(digest, expected):
            return tok
    raise AuthenticationFailed("Invalid worker token.")


def _load(beat: HeartbeatIn, capacity: int | None) -> float | None:
    """One number in [0, 1] from the engine's own gauges: a queue means full."""
    if beat.waiting:
        return 1.0
    parts = [beat.kv_cache_usage] if beat.kv_cache_usage is not None else []
    if capacity and beat.running is not None:
        parts.append(min(1.0, beat.running / capacity))
    return max(parts) if parts else None


async def _body(request: Request) -> dict[str, Any]:
    return loads_object(await read_body(request, _MAX_BODY))


@endpoint("workers", openai_errors.render_error)
async def register(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    try:
        return await _register(gw, request)
    except MeshError as err:
        # A GPU node that cannot join is capacity silently missing: count it and say why, once.
        code = err.code or err.kind
        gw.metrics.workers_refused.labels(code).inc()
        source = request.client.host if request.client else None
        log.warning("worker registration refused (%s): %s", code, err.message,
                    extra={"request_id": ctx.request_id, "source": source})
        raise


async def _register(gw: Gateway, request: Request) -> AnyResponse:
    tok = worker_token(gw, request)
    source = request.client.host if request.client else None
    await gw.workers.registry.note_source(tok.name, source)
    body = validate(RegisterIn, await _body(request))
    if "*" not in tok.models and body.model not in tok.models:
        raise PermissionDenied(f"This worker token may not serve the model '{body.model}'.", param="model")
    if body.model not in gw.router.pools:
        raise ModelNotFound(f"The gateway offers no model '{body.model}'.", param="model")
    static = gw.settings.model(body.model)
    if static is not None and static.engines:
        open_to_workers = static.allow_workers if static.allow_workers is not None else gw.settings.workers.allow_static
        if not open_to_workers:
            raise PermissionDenied(
                f"The model '{body.model}' is served by the gateway's own engines and is closed to workers.",
                param="model", code="model_closed_to_workers",
            )
    engine_url = normalise_engine_url(body.engine_url)
    await check_engine_host(engine_url, source, tok.allow)
    why = await gw.workers.registry.quarantined(tok.name, await engine_hosts(engine_url))
    if why is not None:
        raise PermissionDenied(f"This engine is out of rotation: {why}.", param="engine_url", code="quarantined")
    reg = Registration(
        id=prefixed("wr_"), worker=tok.name, model=body.model, engine_url=engine_url,
        engine_model=body.engine_model, capacity=body.capacity, reasoning_field=body.reasoning_field, source=source,
    )
    await gw.workers.registry.put(reg)
    await gw.workers.run_once()
    w = gw.settings.workers
    return JSON({"id": reg.id, "heartbeat_interval": w.heartbeat_interval, "dead_after": w.dead_after}, status_code=201)


async def _owned(gw: Gateway, request: Request) -> tuple[WorkerToken, Registration]:
    tok = worker_token(gw, request)
    await gw.workers.registry.note_source(tok.name, request.client.host if request.client else None)
    reg = await gw.workers.registry.get(request.path_params["reg_id"])
    if reg is None or reg.worker != tok.name:
        raise NotFound("Unknown replica registration; register again.", code="registration_not_found")
    return tok, reg


@endpoint("workers", openai_errors.render_error)
async def heartbeat(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    _, reg = await _owned(gw, request)
    beat = validate(HeartbeatIn, await _body(request))
    updated = await gw.workers.registry.heartbeat(
        reg.id, healthy=beat.healthy, load=_load(beat, reg.capacity), running=beat.running, waiting=beat.waiting
    )
    if updated is None:
        raise NotFound("Unknown replica registration; register again.", code="registration_not_found")
    if updated.healthy != reg.healthy:
        await gw.workers.run_once()
    return JSON({"id": reg.id, "ok": True})


@endpoint("workers", openai_errors.render_error)
async def deregister(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    _, reg = await _owned(gw, request)
    await gw.workers.registry.remove(reg.id)
    await gw.workers.run_once()
    return Response(status_code=204)


def worker_routes() -> list[Route]:
    return [
        Route("/workers/v1/replicas", register, methods=["POST"]),
        Route("/workers/v1/replicas/{reg_id}/heartbeat", heartbeat, methods=["POST"]),
        Route("/workers/v1/replicas/{reg_id}", deregister, methods=["DELETE"]),
    ]
