"""Customer-facing billing routes, authenticated by the caller's API key.

``GET /v1/usage?days=30`` — the key's account's usage by UTC day and model.
``POST /v1/redeem {"code": "MESH-…"}`` — credit a redeem code to the key's account.
``GET /v1/key`` — the calling key's own status: its name and models, its budget (amount,
period, spent this period, remaining, next reset), its rate limits and the account's
balance, so that an agent can stop before it is refused.

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
from mesh.accounts.service import ApiKeyInfo
from mesh.admin.http import ServicesSource, guarded, int_query, json_response, read_body, resolve
from mesh.admin.views import balance_json, daily_json, iso, money
from mesh.billing.money import format_credits
from mesh.billing.usage import daily_usage

Authenticate = Callable[[Request], Principal | Awaitable[Principal]]


class RedeemBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=100)


def key_status_json(key: ApiKeyInfo, who: Principal) -> dict[str, object]:
    """The key's own view of itself (never its secret, hash or account's other keys)."""
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "account_id": key.account_id,
        "models": None if key.allowed_models is None else list(key.allowed_models),
        "expires_at": iso(key.expires_at),
        "budget": {
            "limit": money(key.spend_limit),
            "period": key.budget_period,
            "reset_day": key.budget_reset_day,
            "spent": format_credits(key.spent),
            "held": format_credits(key.held),
            "remaining": money(key.remaining),
            "resets_at": iso(key.budget_resets_at),
        },
        "rate_limits": [
            {"scope": s.kind, "rpm": s.limits.rpm, "tpm": s.limits.tpm, "concurrent": s.limits.concurrent}
            for s in who.limits
        ],
    }


def customer_routes(services: ServicesSource, authenticate: Authenticate) -> list[Route]:
    """``GET /v1/usage`` and ``POST /v1/redeem``; errors (401, 400, …) in OpenAI's shape."""

    async def principal(request: Request) -> Principal:
        found = authenticate(request)
        return await found if inspect.isawaitable(found) else found

    async def get_usage(request: Request) -> Response:
        who = await principal(request)
        days = int_query(request, "days", 30, 1, 3660)
        rows = await daily_usage(resolve(services, request).database, account_id=who.account_id, days=days)
        return json_response(
            {
                "object": "list",
                "account_id": who.account_id,
                "days": days,
                "data": [daily_json(d, with_account=False) for d in rows],
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

    async def get_key(request: Request) -> Response:
        who = await principal(request)
        svc = resolve(services, request)
        key = await svc.accounts.get_key(who.key_id)
        balance, held = await svc.ledger.balance(who.account_id)
        return json_response({"object": "api_key_status", **key_status_json(key, who), **balance_json(balance, held)})

    return [
        Route("/v1/key", guarded(get_key), methods=["GET"]),
        Route("/v1/usage", guarded(get_usage), methods=["GET"]),
        Route("/v1/redeem", guarded(redeem), methods=["POST"]),
    ]
