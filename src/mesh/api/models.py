"""``GET /v1/models`` and ``GET /v1/models/{id}``, in OpenAI's shape or Anthropic's.

Anthropic clients hit the same path; they are told apart by ``anthropic-version`` or
``x-api-key``. Each entry carries Mesh's own fields: family, license, context length,
pricing (credits per million tokens, as decimal strings).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.responses import JSON
from mesh.config import ModelConfig
from mesh.errors import ModelNotFound
from mesh.gateway import Gateway
from mesh.http.credentials import single
from mesh.protocols import openai_errors
from mesh.request_context import RequestContext

_CREATED = 1735689600  # a fixed epoch: Mesh has no per-model creation time


def _pricing(m: ModelConfig) -> dict[str, str]:
    p = m.pricing
    return {
        "input": str(p.input),
        "cached_input": str(p.cached_input if p.cached_input is not None else p.input),
        "output": str(p.output),
        "request": str(p.request),
    }


def _openai(m: ModelConfig, available: bool) -> dict[str, Any]:
    return {
        "id": m.id,
        "object": "model",
        "created": _CREATED,
        "owned_by": m.family.lower() if m.family else "mesh",
        "family": m.family,
        "license": m.license,
        "context_length": m.context_length,
        "pricing": _pricing(m),
        "available": available,
    }


def _anthropic(m: ModelConfig) -> dict[str, Any]:
    return {
        "type": "model",
        "id": m.id,
        "display_name": m.id,
        "created_at": "2025-01-01T00:00:00Z",
        "max_input_tokens": m.context_length,
    }


def _is_anthropic(request: Request) -> bool:
    return "anthropic-version" in request.headers or "x-api-key" in request.headers


@endpoint("models", openai_errors.render_error)
async def list_models(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    await gw.pipeline.authenticate(ctx, single(request.headers, "authorization"), single(request.headers, "x-api-key"))
    configured = {m.id for m in gw.settings.models}
    # Configured models always; catalog models only while a worker serves them.
    models = [
        m for m in gw.router.models()
        if ctx.who.may_use(m.id) and (m.id in configured or gw.is_available(m.id))
    ]
    if _is_anthropic(request):
        data = [_anthropic(m) for m in models]
        return JSON(
            {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
             "last_id": data[-1]["id"] if data else None}
        )
    return JSON({"object": "list", "data": [_openai(m, gw.is_available(m.id)) for m in models]})


@endpoint("models", openai_errors.render_error)
async def get_model(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    await gw.pipeline.authenticate(ctx, single(request.headers, "authorization"), single(request.headers, "x-api-key"))
    model_id = request.path_params["model_id"]
    pool = gw.router.pools.get(model_id)
    m = pool.model if pool is not None else None
    if m is None or not ctx.who.may_use(m.id) or (
        gw.settings.model(model_id) is None and not gw.is_available(model_id)
    ):
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.", param="model")
    return JSON(_anthropic(m) if _is_anthropic(request) else _openai(m, gw.is_available(m.id)))
