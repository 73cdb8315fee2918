"""The operator API under ``/admin/v1``, authenticated by ``Authorization: Bearer <admin_key>``.

With no ``admin_key`` configured every call answers 403. All bodies are JSON objects;
amounts are decimal strings (exact JSON numbers are accepted too) and every amount in a
response is a string with 6 decimals. Errors use OpenAI's shape.

Rate limits (``rpm``, ``tpm``, ``concurrent``) are overrides of the configured defaults: a
number replaces the default (0: no limit at all), ``null`` returns that one to the
default, and ``"rate_limits": null`` returns all of them. A key's budget is its
``spend_limit`` per ``budget_period`` (none, daily, weekly, monthly; UTC) with an optional
``budget_reset_day`` (weekday 0-6 for weekly, 1-28 for monthly); see mesh.billing.budgets.
A change reaches every gateway at once (the key caches are invalidated through Redis).

::

    POST   /admin/v1/accounts                 {name}
    GET    /admin/v1/accounts                 ?limit=&offset=
    GET    /admin/v1/accounts/{id}
    PATCH  /admin/v1/accounts/{id}            {rate_limits: {rpm?, tpm?, concurrent?} | null}
    POST   /admin/v1/accounts/{id}/credits    {amount, idempotency_key?, kind?, memo?}
    GET    /admin/v1/accounts/{id}/ledger     ?limit=&after=   (newest first; after: the last_id of the page before)
    POST   /admin/v1/accounts/{id}/keys       {name?, allowed_models?, expires_at?, spend_limit?, budget_period?,
                                               budget_reset_day?, rate_limits?}
    GET    /admin/v1/accounts/{id}/keys
    PUT    /admin/v1/accounts/{id}/auto_topup {customer, payment_method, threshold, pack, enabled?}
    GET    /admin/v1/accounts/{id}/auto_topup
    PATCH  /admin/v1/keys/{id}                {rate_limits?: {rpm?, tpm?, concurrent?} | null, spend_limit?,
                                               budget_period?, budget_reset_day?}
    DELETE /admin/v1/keys/{id}
    GET    /admin/v1/usage                    ?account_id=&days=
    POST   /admin/v1/redeem-codes             {amount, count?}
    GET    /admin/v1/audit-log                ?account_id=&limit=
    GET    /admin/v1/accounts/{id}/sso
    PUT    /admin/v1/accounts/{id}/sso        {domains, default_role?, require_sso?}

Every call that changes something is recorded in the operator's audit log (and in the
organization's, when it touches one): see ``mesh.admin.audit_trail``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.sso import SingleSignOn, SsoSettings
from mesh.admin import audit_trail
from mesh.admin.http import ServicesSource, credits_param, guarded, int_query, json_response, read_body, resolve
from mesh.admin.views import account_json, balance_json, daily_json, entry_json, key_json
from mesh.billing.budgets import Period
from mesh.billing.money import format_credits
from mesh.billing.services import Services
from mesh.billing.usage import daily_usage
from mesh.console import topups
from mesh.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from mesh.http.credentials import presented_credential, single
from mesh.http.ids import request_id as new_request_id
from mesh.limits.policy import MAX_LIMIT

PREFIX = "/admin/v1"


class _Body(BaseModel):
    # defer_build: built at the first admin request, not at every start.
    model_config = ConfigDict(extra="forbid", defer_build=True)


class NewAccount(_Body):
    name: str = Field(min_length=1, max_length=200)


class Credits(_Body):
    amount: Any
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    kind: Literal["grant", "adjustment", "refund", "purchase"] = "grant"
    memo: str | None = Field(default=None, max_length=500)


class RateLimitsBody(_Body):
    rpm: int | None = Field(default=None, ge=0, le=MAX_LIMIT, strict=True)
    tpm: int | None = Field(default=None, ge=0, le=MAX_LIMIT, strict=True)
    concurrent: int | None = Field(default=None, ge=0, le=MAX_LIMIT, strict=True)

    def patch(self) -> dict[str, int | None]:
        """Only the fields the body named: an absent field is left as it is."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class LimitsPatch(_Body):
    rate_limits: RateLimitsBody | None


class NewKey(_Body):
    name: str = Field(default="", max_length=200)
    allowed_models: list[str] | None = None
    expires_at: AwareDatetime | None = None
    spend_limit: Any = None
    budget_period: Period = "none"
    budget_reset_day: int | None = Field(default=None, strict=True)
    rate_limits: RateLimitsBody | None = None
    user_budget: Any = None


class KeyPatch(_Body):
    """Only the fields the body names change."""

    rate_limits: RateLimitsBody | None = None
    spend_limit: Any = None
    budget_period: Period | None = None
    budget_reset_day: int | None = Field(default=None, strict=True)
    user_budget: Any = None


class AutoTopupBody(_Body):
    customer: str = Field(min_length=1, max_length=255)
    payment_method: str = Field(min_length=1, max_length=255)
    threshold: Any
    pack: str = Field(min_length=1, max_length=40)
    enabled: bool = True


def auto_topup_json(t: topups.AutoTopup) -> dict[str, Any]:
    return {
        "object": "auto_topup", "account_id": t.account_id, "customer": t.customer,
        "payment_method": t.payment_method, "threshold": format_credits(t.threshold), "pack": t.pack_id,
        "enabled": t.enabled, "attempts": t.attempts, "failures": t.failures, "pending_payment": t.pending_payment,
    }


async def put_auto_topup(request: Request, svc: Services) -> Response:
    body = await read_body(request, AutoTopupBody)
    found = await topups.configure(
        svc.database, svc.settings.console.payments, request.path_params["account_id"], customer=body.customer,
        payment_method=body.payment_method, threshold=credits_param(body.threshold, "threshold"),
        pack_id=body.pack, enabled=body.enabled,
    )
    return json_response(auto_topup_json(found))


async def get_auto_topup(request: Request, svc: Services) -> Response:
    found = await topups.get(svc.database, request.path_params["account_id"])
    if found is None:
        raise NotFound("No automatic top-up for this account", code="auto_topup_not_found")
    return json_response(auto_topup_json(found))


class SsoBody(_Body):
    domains: list[str] = Field(max_length=50)
    default_role: str = "viewer"
    require_sso: bool = False


class NewCodes(_Body):
    amount: Any
    count: int = Field(default=1, ge=1, le=1000)


def check_admin(request: Request, admin_key: str | None) -> None:
    """Raise unless the request carries the configured admin key (constant-time compare)."""
    if not admin_key:
        raise PermissionDenied("The admin API is disabled: no admin_key is configured", code="admin_api_disabled")
    token = presented_credential(single(request.headers, "authorization")) or ""
    if not hmac.compare_digest(token.encode(), admin_key.encode()):
        raise AuthenticationFailed("Invalid admin key", code="invalid_admin_key")


Handler = Callable[[Request, Services], Awaitable[Response]]


def admin_routes(services: ServicesSource) -> list[Route]:
    """The admin API's routes, with full ``/admin/v1/…`` paths, for the app to include."""

    def route(path: str, handler: Handler, method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            svc = resolve(services, request)
            check_admin(request, svc.settings.admin_key)
            rid = new_request_id()
            response = await handler(request, svc)
            response.headers["x-request-id"] = rid
            await audit_trail.record(request, svc, handler.__name__, response, rid)
            return response

        endpoint.__name__ = handler.__name__
        return Route(PREFIX + path, guarded(endpoint), methods=[method])

    return [
        route("/accounts", create_account, "POST"),
        route("/accounts", list_accounts, "GET"),
        route("/accounts/{account_id}", get_account, "GET"),
        route("/accounts/{account_id}", update_account, "PATCH"),
        route("/accounts/{account_id}/credits", add_credits, "POST"),
        route("/accounts/{account_id}/ledger", list_ledger, "GET"),
        route("/accounts/{account_id}/keys", create_key, "POST"),
        route("/accounts/{account_id}/keys", list_keys, "GET"),
        route("/accounts/{account_id}/auto_topup", put_auto_topup, "PUT"),
        route("/accounts/{account_id}/auto_topup", get_auto_topup, "GET"),
        route("/keys/{key_id}", update_key, "PATCH"),
        route("/keys/{key_id}", revoke_key, "DELETE"),
        route("/usage", usage, "GET"),
        route("/redeem-codes", mint_codes, "POST"),
        route("/audit-log", audit_trail.audit_log, "GET"),
        route("/accounts/{account_id}/sso", get_sso, "GET"),
        route("/accounts/{account_id}/sso", put_sso, "PUT"),
    ]


async def create_account(request: Request, svc: Services) -> Response:
    body = await read_body(request, NewAccount)
    return json_response(account_json(await svc.accounts.create(body.name)), 201)


async def list_accounts(request: Request, svc: Services) -> Response:
    limit = int_query(request, "limit", 100, 1, 1000)
    offset = int_query(request, "offset", 0, 0, 10**9)
    found = await svc.accounts.list_accounts(limit=limit, offset=offset)
    return json_response({"object": "list", "data": [account_json(a) for a in found]})


async def get_account(request: Request, svc: Services) -> Response:
    return json_response(account_json(await svc.accounts.get(request.path_params["account_id"])))


async def update_account(request: Request, svc: Services) -> Response:
    body = await read_body(request, LimitsPatch)
    account_id = request.path_params["account_id"]
    patch = None if body.rate_limits is None else body.rate_limits.patch()
    account = await svc.accounts.set_account_limits(account_id, patch)
    await svc.authenticator.account_changed(account_id)
    return json_response(account_json(account))


async def add_credits(request: Request, svc: Services) -> Response:
    account_id = request.path_params["account_id"]
    body = await read_body(request, Credits)
    amount = credits_param(body.amount, "amount", allow_negative=body.kind == "adjustment")
    entry = await svc.ledger.grant(account_id, amount, body.idempotency_key, body.kind, body.memo)
    balance, held = await svc.ledger.balance(account_id)
    return json_response({"account_id": account_id, "entry": entry_json(entry), **balance_json(balance, held)})


async def list_ledger(request: Request, svc: Services) -> Response:
    account_id = request.path_params["account_id"]
    await svc.accounts.get(account_id)
    after = request.query_params.get("after")
    entries, more = await svc.ledger.entries(
        account_id, limit=int_query(request, "limit", 50, 1, 1000),
        after=None if after is None else int_query(request, "after", 0, 1, 2**63 - 1),
    )
    return json_response({
        "object": "list", "data": [entry_json(e) for e in entries], "has_more": more,
        "first_id": entries[0].id if entries else None, "last_id": entries[-1].id if entries else None,
    })


async def create_key(request: Request, svc: Services) -> Response:
    body = await read_body(request, NewKey)
    limit = None if body.spend_limit is None else credits_param(body.spend_limit, "spend_limit")
    created = await svc.accounts.create_key(
        request.path_params["account_id"],
        name=body.name,
        allowed_models=body.allowed_models,
        expires_at=body.expires_at,
        spend_limit=limit,
        rate_limits=None if body.rate_limits is None else body.rate_limits.patch(),
        budget_period=body.budget_period,
        budget_reset_day=body.budget_reset_day,
        user_budget=None if body.user_budget is None else credits_param(body.user_budget, "user_budget"),
    )
    return json_response({**key_json(created.info), "key": created.key}, 201)


async def list_keys(request: Request, svc: Services) -> Response:
    account_id = request.path_params["account_id"]
    await svc.accounts.get(account_id)
    keys = await svc.accounts.list_keys(account_id)
    return json_response({"object": "list", "data": [key_json(k) for k in keys]})


async def update_key(request: Request, svc: Services) -> Response:
    body = await read_body(request, KeyPatch)
    key_id = request.path_params["key_id"]
    named = body.model_fields_set
    if not named:
        raise InvalidRequest(
            "name at least one of rate_limits, spend_limit, budget_period, budget_reset_day, user_budget"
        )
    info = await svc.accounts.get_key(key_id)
    if "rate_limits" in named:
        patch = None if body.rate_limits is None else body.rate_limits.patch()
        info = await svc.accounts.set_key_limits(key_id, patch)
    if named & {"spend_limit", "budget_period", "budget_reset_day", "user_budget"}:
        info = await svc.accounts.set_key_budget(
            key_id,
            spend_limit=None if body.spend_limit is None else credits_param(body.spend_limit, "spend_limit"),
            change_limit="spend_limit" in named,
            period=body.budget_period,
            reset_day=body.budget_reset_day,
            change_reset_day="budget_reset_day" in named,
            user_budget=None if body.user_budget is None else credits_param(body.user_budget, "user_budget"),
            change_user_budget="user_budget" in named,
        )
    await svc.authenticator.key_changed(key_id)
    return json_response(key_json(info))


async def revoke_key(request: Request, svc: Services) -> Response:
    key_id = request.path_params["key_id"]
    await svc.authenticator.revoke(key_id)
    return json_response(key_json(await svc.accounts.get_key(key_id)))


async def usage(request: Request, svc: Services) -> Response:
    account_id = request.query_params.get("account_id") or None
    days = int_query(request, "days", 30, 1, 3660)
    rows = await daily_usage(svc.database, account_id=account_id, days=days)
    return json_response({"object": "list", "days": days, "data": [daily_json(d) for d in rows]})


def _sso_json(s: SsoSettings) -> dict[str, Any]:
    return {"object": "sso_settings", "account_id": s.account_id, "domains": list(s.domains),
            "default_role": s.default_role, "require_sso": s.require_sso}


async def get_sso(request: Request, svc: Services) -> Response:
    account_id = request.path_params["account_id"]
    await svc.accounts.get(account_id)
    found = await SingleSignOn(svc.database).get(account_id)
    if found is None:
        found = SsoSettings(account_id=account_id, domains=(), default_role="viewer", require_sso=False)
    return json_response(_sso_json(found))


async def put_sso(request: Request, svc: Services) -> Response:
    body = await read_body(request, SsoBody)
    found = await SingleSignOn(svc.database).put(request.path_params["account_id"], domains=body.domains,
                                                 default_role=body.default_role, require_sso=body.require_sso)
    return json_response(_sso_json(found))


async def mint_codes(request: Request, svc: Services) -> Response:
    body = await read_body(request, NewCodes)
    amount = credits_param(body.amount, "amount")
    minted = await svc.redeem.mint(amount, body.count)
    return json_response(
        {
            "object": "list",
            "amount": balance_json(amount, 0)["balance"],
            "codes": [m.code for m in minted],
        },
        201,
    )
