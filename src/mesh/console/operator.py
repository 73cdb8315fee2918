"""Operator pages (admin users only): accounts and grants, platform usage, redeem codes.

Grants carry an idempotency key minted when the form is rendered, so a double click or
a resubmitted form grants once.
"""

from __future__ import annotations

import secrets
from collections import defaultdict

from starlette.responses import Response
from starlette.routing import Route

from mesh.billing.money import parse_credits
from mesh.billing.redeem import MAX_MINT
from mesh.billing.usage import daily_usage
from mesh.console.display import credits
from mesh.console.usage_view import usage_view
from mesh.console.web import PREFIX, Console, Handler, Page
from mesh.errors import MeshError, NotFound
from mesh.store import utcnow

PAGE_SIZE = 50
GRANT_KINDS = ("grant", "refund", "adjustment")


async def admin_home(page: Page) -> Response:
    return page.redirect(PREFIX + "/admin/accounts")


async def accounts_page(page: Page) -> Response:
    try:
        offset = max(0, int(page.request.query_params.get("offset", "0")))
    except ValueError:
        offset = 0
    found = await page.services.accounts.list_accounts(limit=PAGE_SIZE + 1, offset=offset)
    more = len(found) > PAGE_SIZE
    found = found[:PAGE_SIZE]
    emails = await page.bound.users.for_accounts([a.id for a in found])
    return page.render(
        "admin/accounts.html", title="Accounts", nav="admin", section="accounts", accounts=found, emails=emails,
        offset=offset, more=more, page_size=PAGE_SIZE, total=await page.services.accounts.count(),
    )


async def _account_page(page: Page, *, status: int = 200, error: str | None = None,
                        form: dict[str, str] | None = None) -> Response:
    try:
        account = await page.services.accounts.get(page.request.path_params["account_id"])
    except NotFound:
        return page.render("error.html", status=404, title="Not found", message="There is no such account.")
    entries, _ = await page.services.ledger.entries(account.id, limit=50)
    keys = await page.services.accounts.list_keys(account.id)
    rows = await daily_usage(page.services.database, account_id=account.id, days=31)
    emails = (await page.bound.users.for_accounts([account.id])).get(account.id, [])
    return page.render(
        "admin/account.html", status=status, title=account.name, nav="admin", section="accounts", account=account,
        entries=entries, keys=keys, usage=usage_view(rows, utcnow().date()), emails=emails, error=error,
        form=form or {}, grant_key=f"console-grant:{secrets.token_hex(12)}", kinds=GRANT_KINDS,
    )


async def account_page(page: Page) -> Response:
    return await _account_page(page)


async def grant(page: Page) -> Response:
    account_id = page.request.path_params["account_id"]
    kind = page.field("kind", "grant")
    form = {"amount": page.field("amount"), "memo": page.field("memo"), "kind": kind}
    if kind not in GRANT_KINDS:
        return await _account_page(page, status=400, error="Pick a kind of credit.", form=form)
    try:
        amount = parse_credits(page.field("amount").strip(), allow_negative=kind == "adjustment")
    except (TypeError, ValueError):
        return await _account_page(page, status=400, error="Enter an amount such as 25 or 2.50.", form=form)
    key = page.field("idempotency_key")[:200] or f"console-grant:{secrets.token_hex(12)}"
    memo = (page.field("memo").strip() or f"granted in the console by {page.user.email}")[:500]
    try:
        entry = await page.services.ledger.grant(account_id, amount, key, kind, memo)
    except MeshError as err:
        return await _account_page(page, status=err.status if err.status < 500 else 400, error=err.message, form=form)
    return page.redirect(f"{PREFIX}/admin/accounts/{account_id}",
                         f"{kind.capitalize()} of {credits(entry.amount)} credits recorded.")


async def usage_page(page: Page) -> Response:
    rows = await daily_usage(page.services.database, days=31)
    view = usage_view(rows, utcnow().date())
    per_account: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        if r.account_id is None:
            continue
        totals = per_account[r.account_id]
        totals[0] += r.requests
        totals[1] += r.input_tokens + r.output_tokens
        totals[2] += r.cost
    top = sorted(per_account.items(), key=lambda kv: -kv[1][2])[:20]
    names = {}
    for account_id, _ in top:
        try:
            names[account_id] = (await page.services.accounts.get(account_id)).name
        except NotFound:
            names[account_id] = account_id
    return page.render("admin/usage.html", title="Platform usage", nav="admin", section="usage", usage=view,
                       top=top, names=names)


async def codes_page(page: Page) -> Response:
    return page.render("admin/codes.html", title="Redeem codes", nav="admin", section="codes", minted=None,
                       error=None, max_mint=MAX_MINT, form={})


async def mint_codes(page: Page) -> Response:
    form = {"amount": page.field("amount"), "count": page.field("count", "1")}
    try:
        amount = parse_credits(form["amount"].strip())
        count = int(form["count"])
        minted = await page.services.redeem.mint(amount, count)
    except (TypeError, ValueError):
        error = f"Enter an amount such as 10 and a count from 1 to {MAX_MINT}."
        return page.render("admin/codes.html", status=400, title="Redeem codes", nav="admin", section="codes",
                           minted=None, error=error, max_mint=MAX_MINT, form=form)
    except MeshError as err:
        return page.render("admin/codes.html", status=400, title="Redeem codes", nav="admin", section="codes",
                           minted=None, error=err.message, max_mint=MAX_MINT, form=form)
    return page.render("admin/codes.html", status=201, title="Redeem codes", nav="admin", section="codes",
                       minted=minted, amount=amount, error=None, max_mint=MAX_MINT, form={})


def operator_routes(console: Console) -> list[Route]:
    def r(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> Route:
        return console.route("/admin" + path, handler, methods=methods, access="admin")

    return [
        r("", admin_home),
        r("/accounts", accounts_page),
        r("/accounts/{account_id}", account_page),
        r("/accounts/{account_id}/grant", grant, ("POST",)),
        r("/usage", usage_page),
        r("/codes", codes_page),
        r("/codes", mint_codes, ("POST",)),
    ]
