"""Customer-facing billing routes, authenticated by the caller's API key.

``GET /v1/usage?days=30`` — the key's account's usage by UTC day and model, and its
prefix-cache hit rate per model and per key (``cache``);
``group_by=user|tag|key|model`` sums it by end user, x-mesh-tags tag, key or model instead.
``GET /v1/generations/{id}`` — one request of the account, by the id its response carried
(``chatcmpl-…``, ``msg_…``, ``resp_…``) or its request id (``req_…``): model and replica,
tokens, cost, TTFT and duration, status, key, end user, tags. 404 for any other account's.
Usage rows are written in batches, so a request shows here a moment after it finished.
``POST /v1/redeem {"code": "MESH-…"}`` — credit a redeem code to the key's account.
``GET /v1/key`` — the calling key's own status: its name and models, its budget (amount,
period, spent this period, remaining, next reset), its rate limits with what each uses now
(requests and tokens in the minute's bucket, requests in flight) and the account's balance,
so that an agent can stop before it is refused.

The app supplies ``authenticate(request) -> Principal`` (sync or async), so these routes
accept keys exactly as the inference endpoints do.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.principal import Principal
from mesh.accounts.service import ApiKeyInfo
from mesh.admin.http import ServicesSource, guarded, int_query, json_response, read_body, resolve
from mesh.admin.views import balance_json, daily_json, iso, money
from mesh.billing.cache_stats import cache_by_key, cache_by_model
from mesh.billing.money import format_credits
from mesh.billing.usage import GROUPS, UsageGroup, UsageRecord, daily_usage, generation, usage_by
from mesh.errors import InvalidRequest, NotFound
from mesh.limits.base import Limiter, ScopeUsage

Authenticate = Callable[[Request], Principal | Awaitable[Principal]]


class RedeemBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=100)


_ID_PREFIXES = ("chatcmpl-", "msg_", "resp_", "req_")


def request_id_of(generation_id: str) -> str | None:
    """The request id behind a response's id (they share their random part)."""
    for prefix in _ID_PREFIXES:
        if generation_id.startswith(prefix) and 0 < len(generation_id) - len(prefix) <= 64:
            return "req_" + generation_id.removeprefix(prefix)
    return None


def generation_json(r: UsageRecord) -> dict[str, object]:
    return {
        "object": "generation",
        "id": r.request_id,
        "model": r.model,
        "replica": r.replica,
        "protocol": r.protocol,
        "status": r.status,
        "finish_reason": r.finish_reason,
        "usage": {
            "input_tokens": r.input_tokens, "cached_tokens": r.cached_tokens, "output_tokens": r.output_tokens,
            "reasoning_tokens": r.reasoning_tokens,
        },
        "cost": format_credits(r.cost),
        "ttft_ms": r.ttft_ms,
        "duration_ms": r.duration_ms,
        "key_id": r.key_id,
        "user": r.end_user,
        "tags": list(r.tags),
        "metadata": None if r.metadata is None else dict(r.metadata),
        "created_at": iso(r.created_at),
    }


def group_json(g: UsageGroup) -> dict[str, object]:
    return {
        "value": g.value, "requests": g.requests, "input_tokens": g.input_tokens, "output_tokens": g.output_tokens,
        "cost": format_credits(g.cost),
    }


def _in_use(level: float | None) -> int | None:
    # A bucket's level drains continuously; what is shown is the whole units still in it.
    return None if level is None else math.ceil(level - 1e-6)


def _usage_json(u: ScopeUsage | None) -> dict[str, int | None] | None:
    if u is None:
        return None
    return {"requests": _in_use(u.requests), "tokens": _in_use(u.tokens), "concurrent": u.concurrent}


def key_status_json(
    key: ApiKeyInfo, who: Principal, usage: Sequence[ScopeUsage | None] = ()
) -> dict[str, object]:
    """The key's own view of itself (never its secret, hash or account's other keys).
    ``usage`` is what the limiter says each of ``who.limits`` uses now."""
    used = list(usage) + [None] * (len(who.limits) - len(usage))
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
            "user_budget": money(key.user_budget),
        },
        "rate_limits": [
            {
                "scope": s.kind, "rpm": s.limits.rpm, "tpm": s.limits.tpm, "concurrent": s.limits.concurrent,
                "usage": _usage_json(u),
            }
            for s, u in zip(who.limits, used, strict=True)
        ],
    }


def customer_routes(
    services: ServicesSource, authenticate: Authenticate, limiter: Callable[[Request], Limiter] | None = None
) -> list[Route]:
    """``GET /v1/usage`` and ``POST /v1/redeem``; errors (401, 400, …) in OpenAI's shape.
    ``limiter`` (per request) answers ``GET /v1/key``'s current rate-limit usage."""

    async def principal(request: Request) -> Principal:
        found = authenticate(request)
        return await found if inspect.isawaitable(found) else found

    async def get_usage(request: Request) -> Response:
        who = await principal(request)
        days = int_query(request, "days", 30, 1, 3660)
        group_by = request.query_params.get("group_by")
        if group_by is not None:
            if group_by not in GROUPS:
                raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}", param="group_by")
            groups = await usage_by(resolve(services, request).database, who.account_id, group_by, days=days)
            return json_response(
                {
                    "object": "list", "account_id": who.account_id, "days": days, "group_by": group_by,
                    "data": [group_json(g) for g in groups],
                }
            )
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

    async def get_key(request: Request) -> Response:
        who = await principal(request)
        svc = resolve(services, request)
        key = await svc.accounts.get_key(who.key_id)
        balance, held = await svc.ledger.balance(who.account_id)
        usage = [] if limiter is None else await limiter(request).peek(who.limits)
        return json_response(
            {"object": "api_key_status", **key_status_json(key, who, usage), **balance_json(balance, held)}
        )

    async def get_generation(request: Request) -> Response:
        who = await principal(request)
        rid = request_id_of(request.path_params["generation_id"])
        found = None if rid is None else await generation(resolve(services, request).database, who.account_id, rid)
        if found is None:
            raise NotFound("No such generation for this account", code="generation_not_found")
        return json_response(generation_json(found))

    return [
        Route("/v1/key", guarded(get_key), methods=["GET"]),
        Route("/v1/generations/{generation_id}", guarded(get_generation), methods=["GET"]),
        Route("/v1/usage", guarded(get_usage), methods=["GET"]),
        Route("/v1/redeem", guarded(redeem), methods=["POST"]),
    ]
