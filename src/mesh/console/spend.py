"""Who spent what: one generation's detail (linked from the dashboard's requests) and the
account's spend by end user, tag, key or model, with a CSV export. Only the signed-in
user's account is ever read; another account's generation is 404 like an unknown one."""

from __future__ import annotations

import csv
import io

from starlette.responses import Response
from starlette.routing import Route

from mesh.billing.money import format_credits
from mesh.billing.routes import request_id_of
from mesh.billing.usage import GROUPS, UsageGroup, generation, usage_by
from mesh.console.web import Console, Page

DAYS = (1, 7, 30, 90)


async def generation_page(page: Page) -> Response:
    rid = request_id_of(page.request.path_params["generation_id"])
    found = None if rid is None else await generation(page.services.database, page.account_id, rid)
    if found is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such request.")
    keys = {k.id: k for k in await page.services.accounts.list_keys(page.account_id)}
    return page.render("generation.html", title="Request", nav="dashboard", g=found, key=keys.get(found.key_id or ""))


async def _groups(page: Page) -> tuple[str, int, list[UsageGroup]]:
    group_by = page.request.query_params.get("group_by", "user")
    group_by = group_by if group_by in GROUPS else "user"
    try:
        days = int(page.request.query_params.get("days", "30"))
    except ValueError:
        days = 30
    days = days if days in DAYS else 30
    return group_by, days, await usage_by(page.services.database, page.account_id, group_by, days=days)


async def breakdown_page(page: Page) -> Response:
    group_by, days, groups = await _groups(page)
    names: dict[str, str] = {}
    if group_by == "key":
        names = {k.id: f"{k.name or 'Untitled'} ({k.prefix}…)" for k in await page.services.accounts.list_keys(
            page.account_id)}
    return page.render(
        "breakdown.html", title="Spend breakdown", nav="dashboard", groups=groups, group_by=group_by, days=days,
        choices=GROUPS, day_choices=DAYS, names=names, total=sum(g.cost for g in groups),
    )


async def breakdown_csv(page: Page) -> Response:
    group_by, days, groups = await _groups(page)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([group_by, "requests", "input_tokens", "output_tokens", "cost"])
    for g in groups:
        value = g.value or ""
        # A cell a spreadsheet would run as a formula is quoted as text.
        writer.writerow(["'" + value if value[:1] in "=+-@" and value else value, g.requests, g.input_tokens,
                         g.output_tokens, format_credits(g.cost)])
    return Response(
        out.getvalue(), media_type="text/csv",
        headers={"content-disposition": f'attachment; filename="mesh-spend-by-{group_by}-{days}d.csv"'},
    )


def spend_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/generations/{generation_id}", generation_page, need="usage"),
        r("/usage/breakdown", breakdown_page, need="usage"),
        r("/usage/breakdown.csv", breakdown_csv, need="usage"),
    ]
