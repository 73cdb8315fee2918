"""The customer's dashboard: balance, this month's spend, usage charts, prefix-cache hit
rates, recent requests."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from mesh.billing.cache_stats import cache_by_key, cache_by_model
from mesh.billing.usage import daily_usage, recent_requests
from mesh.console.usage_view import usage_view
from mesh.console.web import Console, Page
from mesh.store import utcnow

RECENT = 25


async def dashboard(page: Page) -> Response:
    account_id = page.account_id
    db = page.services.database
    today = utcnow().date()
    rows = await daily_usage(db, account_id=account_id, days=31)
    balance, held = await page.services.ledger.balance(account_id)
    recent = await recent_requests(db, account_id, limit=RECENT)
    keys = {k.id: k for k in await page.services.accounts.list_keys(account_id)}
    cache_models = await cache_by_model(db, account_id, days=30)
    cache_keys = await cache_by_key(db, account_id, days=30)
    return page.render(
        "dashboard.html",
        title="Dashboard",
        nav="dashboard",
        balance=balance,
        held=held,
        available=balance - held,
        usage=usage_view(rows, today),
        recent=recent,
        keys=keys,
        cache_models=cache_models,
        cache_keys=cache_keys,
        active_keys=sum(1 for k in keys.values() if k.revoked_at is None),
    )


def dashboard_routes(console: Console) -> list[Route]:
    return [console.route("/dashboard", dashboard, need="usage")]
