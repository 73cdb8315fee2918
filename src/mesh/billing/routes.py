"""Customer-facing billing routes, authenticated by the caller's API key.

``GET /v1/usage?days=30`` — the key's account's usage by UTC day and model, and its
prefix-cache hit rate per model and per key (``cache``).
``POST /v1/redeem {"code": "MESH-…"}`` — credit a redeem code to the key's account.

The app supplies ``authenticate(request) -> Principal`` (sync or async), so these routes
accept keys exactly as the inference endpoints do.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.principal import Principal
from mesh.admin.http import ServicesSource, guarded, int_query, json_response, read_body, resolve
from mesh.admin.views import balance_json, daily_json
from mesh.billing.cache_stats import cache_by_key, cache_by_model
from mesh.billing.money import format_credits
from mesh.billing.usage import daily_usage

Authenticate = Callable[[Request], Principal | Awaitable[Principal]]


class RedeemBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=100)


def customer_routes(services: ServicesSource, authenticate: Authenticate) -> list[Route]:
    """``GET /v1/usage`` and ``POST /v1/redeem``; errors (401, 400, …) in OpenAI's shape."""

    async def principal(request: Request) -> Principal:
        found = authenticate(request)
        return await found if inspect.isawaitable(found) else found

    async def get_usage(request: Request) -> Response:
        who = await principal(request)
        days = int_query(request, "days", 30, 1, 3660)
        db = resolve(services, request).database
        rows = await daily_usage(db, account_id=who.account_id, days=days)
        by_model = await cache_by_model(db, who.account_id, days=days)
        by_key = await cache_by_key(db, who.account_id, days=days)
        return json_response(
            {
                "object": "list",
                "account_id": who.account_id,
                "days": days,
                "data": [daily_json(d, with_account=False) for d in rows],
                "cache": {"by_model": [c.as_json() for c in by_model], "by_key": [c.as_json() for c in by_key]},
            }
        )

    async def redeem(request: Request) -> Response:
        who = await principal(request)
        body = await read_body(request, RedeemBody)
        svc = resolve(services, request)
        entry = await svc.redeem.redeem(who.account_id, body.code)
        balance, held = await svc.ledger.balance(who.account_id)
        return json_response(
            {"account_id": who.account_id, "credited": format_credits(entry.amount), **balance_json(balance, held)}
        )

    return [
        Route("/v1/usage", guarded(get_usage), methods=["GET"]),
        Route("/v1/redeem", guarded(redeem), methods=["POST"]),
    ]
