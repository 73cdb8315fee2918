"""The operator's audit log: every admin API call that changes something is recorded (in
the operator's log, and in the organization's when it touches one), and
``GET /admin/v1/audit-log`` reads it back.

::

    GET /admin/v1/audit-log     ?account_id=&limit=   (no account_id: the operator's own log)
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from mesh.accounts.audit_log import Actor, AuditEvent
from mesh.admin.http import int_query, json_response
from mesh.billing.services import Services
from mesh.errors import NotFound

OPERATOR = "operator (admin key)"
# What an admin API handler does to an organization, as an audit action.
ORG_ACTIONS = {
    "create_account": "organization.created",
    "update_account": "organization.limits_changed",
    "create_key": "key.created",
    "update_key": "key.changed",
    "revoke_key": "key.revoked",
    "put_sso": "sso.settings_changed",
}


def actor(request: Request, request_id: str) -> Actor:
    client = request.client
    return Actor(name=OPERATOR, id=None, ip=client.host if client else None, request_id=request_id)


async def record(request: Request, svc: Services, handler: str, response: Response, request_id: str) -> None:
    """Record a successful change made through the admin API."""
    if request.method == "GET" or response.status_code >= 400 or handler in ("flush",):
        return
    who = actor(request, request_id)
    params = dict(request.path_params)
    await svc.audit.record(who, f"admin.{handler}", account_id=None, target=request.url.path, detail=params or None)
    body: Any = orjson.loads(bytes(response.body)) if response.body else {}
    account_id = params.get("account_id") or (body.get("account_id") if isinstance(body, dict) else None)
    if account_id is None and "key_id" in params:
        try:
            account_id = (await svc.accounts.get_key(params["key_id"])).account_id
        except NotFound:
            account_id = None
    if handler == "create_account" and isinstance(body, dict):
        account_id = body.get("id")
    action = ORG_ACTIONS.get(handler)
    if handler == "add_credits" and isinstance(body, dict):
        action = f"credits.{body.get('entry', {}).get('kind', 'grant')}"
    if account_id and action:
        target = params.get("key_id") or account_id
        await svc.audit.record(who, action, account_id=str(account_id), target=str(target), detail=_detail(body))


def _detail(body: Any) -> dict[str, Any] | None:
    if not isinstance(body, dict):
        return None
    entry = body.get("entry")
    if isinstance(entry, dict):
        return {"amount": entry.get("amount"), "memo": entry.get("memo")}
    keys = ("name", "prefix", "spend_limit", "budget_period", "rate_limits", "domains", "default_role", "require_sso")
    picked = {k: body[k] for k in keys if k in body}
    return picked or None


def event_json(e: AuditEvent) -> dict[str, Any]:
    return {"id": e.id, "object": "audit_event", "account_id": e.account_id, "actor": e.actor, "actor_id": e.actor_id,
            "ip": e.ip, "request_id": e.request_id, "action": e.action, "target": e.target, "detail": e.detail,
            "created_at": e.created_at.isoformat()}


async def audit_log(request: Request, svc: Services) -> Response:
    account_id = request.query_params.get("account_id") or None
    events = await svc.audit.events(account_id, limit=int_query(request, "limit", 100, 1, 1000))
    return json_response({"object": "list", "data": [event_json(e) for e in events]})
