"""API keys: create (shown in full once), list with prefix, last use and spend (this budget
period's), set a key's budget, revoke.

Only keys of the session's organization are ever listed or revocable; another
organization's key id answers 404, exactly like an unknown one. A developer revokes only
the keys they created; owners and admins any key (mesh.accounts.roles). Revocation goes through
``KeyAuthenticator.revoke`` so every gateway's key cache drops the key at once.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.service import ApiKeyInfo
from mesh.billing.budgets import PERIODS
from mesh.billing.money import format_credits, parse_credits
from mesh.billing.usage import last_use_by_key
from mesh.console.web import PREFIX, Console, Page
from mesh.errors import MeshError, NotFound
from mesh.store import utcnow

MAX_KEYS_SHOWN = 200


def _expiry(text: str, today: date) -> datetime | None:
    """The end of the chosen UTC day (a key is valid *through* that date)."""
    if not text:
        return None
    day = date.fromisoformat(text)
    if day < today:
        raise ValueError("Pick a date in the future.")
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)


def _form_errors(page: Page) -> tuple[dict[str, str], dict[str, Any]]:
    errors: dict[str, str] = {}
    values: dict[str, Any] = {"name": page.field("name").strip()}
    known = {m.id for m in page.console.settings.models}
    models = [m for m in page.fields("models") if m in known]
    values["models"] = models if page.field("restrict") == "yes" else None
    if values["models"] is not None and not models:
        errors["models"] = "Pick at least one model, or allow every model."
    try:
        values["expires_at"] = _expiry(page.field("expires"), utcnow().date())
    except ValueError as exc:
        errors["expires"] = str(exc) if "future" in str(exc) else "Enter a date."
    limit_text = page.field("spend_limit").strip()
    values["spend_limit"] = None
    values["spend_limit_text"] = limit_text
    if limit_text:
        try:
            values["spend_limit"] = parse_credits(limit_text)
        except (TypeError, ValueError):
            errors["spend_limit"] = "Enter an amount of credits such as 25 or 2.50."
    values["budget_period"] = page.field("budget_period", "none")
    if values["budget_period"] not in PERIODS:
        errors["spend_limit"] = "Pick a budget period from the list."
    if len(values["name"]) > 200:
        errors["name"] = "Use at most 200 characters."
    return errors, values


async def last_used(page: Page, keys: list[ApiKeyInfo]) -> dict[str, datetime]:
    """When each key was last used: the later of its ``last_used_at`` (written in batches,
    up to a minute late) and its newest usage record."""
    seen = await last_use_by_key(page.services.database, page.account_id)
    out: dict[str, datetime] = {}
    for k in keys:
        times = [t for t in (k.last_used_at, seen.get(k.id)) if t is not None]
        if times:
            out[k.id] = max(t if t.tzinfo else t.replace(tzinfo=UTC) for t in times)
    return out


async def _render(page: Page, *, status: int = 200, created: Any = None, errors: dict[str, str] | None = None,
                  form: dict[str, Any] | None = None) -> Response:
    keys = await page.services.accounts.list_keys(page.account_id)
    now = utcnow()
    active = [k for k in keys if k.revoked_at is None and (k.expires_at is None or k.expires_at > now)]
    inactive = [k for k in keys if k not in active][:MAX_KEYS_SHOWN]
    return page.render(
        "keys.html",
        status=status,
        title="API keys",
        nav="keys",
        active=active,
        inactive=inactive,
        created=created,
        errors=errors or {},
        form=form or {},
        models=page.console.settings.models,
        playground_key_id=page.user.playground_key_id,
        last_used=await last_used(page, keys),
        creators={m.user_id: m.email for m in await page.bound.members.of_account(page.account_id)},
        manage_all=page.can("keys.all"),
        base_url=page.base_url(),
        today=now.date().isoformat(),
    )


async def keys_page(page: Page) -> Response:
    return await _render(page)


async def create_key(page: Page) -> Response:
    errors, values = _form_errors(page)
    if errors:
        return await _render(page, status=400, errors=errors, form=values)
    try:
        created = await page.services.accounts.create_key(
            page.account_id,
            name=values["name"] or "Untitled key",
            allowed_models=values["models"],
            expires_at=values["expires_at"],
            spend_limit=values["spend_limit"],
            budget_period=values["budget_period"],
            created_by=page.user.id,
        )
    except MeshError as err:
        return await _render(page, status=400, errors={"name": err.message}, form=values)
    await page.audit("key.created", created.info.id, name=created.info.name, prefix=created.info.prefix + "…")
    return await _render(page, status=201, created=created)


async def owned_key(page: Page, key_id: str) -> ApiKeyInfo | None:
    """The key if it belongs to the signed-in user's account; ``None`` for any other."""
    try:
        key = await page.services.accounts.get_key(key_id)
    except NotFound:
        return None
    return key if key.account_id == page.account_id else None


async def revoke_key(page: Page) -> Response:
    key = await owned_key(page, page.request.path_params["key_id"])
    if key is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such API key.")
    if key.created_by != page.user.id and not page.can("keys.all"):
        return page.render("error.html", status=403, title="Not allowed",
                           message="Your role lets you revoke only the keys you created.")
    await page.services.authenticator.revoke(key.id)
    await page.audit("key.revoked", key.id, name=key.name, prefix=key.prefix + "…")
    return page.redirect(PREFIX + "/keys", f"Key {key.prefix}… ({key.name}) revoked. It stops working at once.")


async def change_budget(page: Page) -> Response:
    """A key's budget: its amount per period (empty: no limit) and its period."""
    key = await owned_key(page, page.request.path_params["key_id"])
    if key is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such API key.")
    text = page.field("spend_limit").strip()
    period = page.field("budget_period", key.budget_period)
    try:
        limit = parse_credits(text) if text else None
        info = await page.services.accounts.set_key_budget(
            key.id, spend_limit=limit, change_limit=True, period=period
        )
    except (TypeError, ValueError):
        return page.redirect(PREFIX + "/keys", "Enter an amount of credits such as 25 or 2.50.", "err")
    except MeshError as err:
        return page.redirect(PREFIX + "/keys", err.message, "err")
    await page.services.authenticator.key_changed(key.id)
    await page.audit("key.budget_changed", key.id, name=key.name, prefix=key.prefix + "…",
                     spend_limit=None if info.spend_limit is None else format_credits(info.spend_limit),
                     period=info.budget_period)
    what = "no budget" if info.spend_limit is None else f"a {info.budget_period} budget"
    return page.redirect(PREFIX + "/keys", f"Key {key.prefix}… ({key.name}) now has {what}.")


def keys_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/keys", keys_page, need="keys"),
        r("/keys", create_key, methods=("POST",), need="keys"),
        r("/keys/{key_id}/budget", change_budget, methods=("POST",), need="keys.all"),
        r("/keys/{key_id}/revoke", revoke_key, methods=("POST",), need="keys"),
    ]
