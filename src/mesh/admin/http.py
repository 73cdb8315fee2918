"""Small JSON-over-HTTP helpers shared by the admin API and the customer billing routes.

Errors use OpenAI's shape (``mesh.protocols.openai_errors``). Request bodies are parsed
with JSON numbers that have a fraction read as ``Decimal``, so ``{"amount": 12.5}`` is
exactly 12.5 credits and never passes through a float.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from mesh.billing.money import MicroCredits, parse_credits
from mesh.billing.services import Services
from mesh.errors import InvalidRequest, MeshError
from mesh.protocols.openai_errors import render_error

MAX_BODY_BYTES = 1024 * 1024

ServicesSource = Services | Callable[[Request], Services]
"""The services, or how to find them per request (e.g. ``lambda r: r.app.state.gateway.services``)
when the app builds them in its lifespan, after the routes exist."""

M = TypeVar("M", bound=BaseModel)


def resolve(source: ServicesSource, request: Request) -> Services:
    return source if isinstance(source, Services) else source(request)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def error_response(err: MeshError) -> Response:
    status, body = render_error(err)
    headers = {"retry-after": str(int(err.retry_after))} if err.retry_after is not None else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Wrap an endpoint so that a ``MeshError`` becomes its JSON error response."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except MeshError as err:
            return error_response(err)

    endpoint.__name__ = handler.__name__
    return endpoint


async def read_body(request: Request, model: type[M]) -> M:
    """Parse and validate a JSON object body; ``InvalidRequest`` (400) naming the bad field."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest("request body is too large")
    try:
        data = json.loads(raw or b"{}", parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise InvalidRequest(f"{param + ': ' if param else ''}{err['msg']}", param=param) from None


def credits_param(value: Any, param: str, *, allow_negative: bool = False) -> MicroCredits:
    """A credit amount from a body field (decimal string, exact number or int)."""
    if isinstance(value, float):  # never produced by read_body; guards other callers
        raise InvalidRequest(f"{param} must be a decimal string", param=param)
    try:
        return parse_credits(value, allow_negative=allow_negative)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param) from None


def int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", param=name) from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}", param=name)
    return value
