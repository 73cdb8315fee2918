"""The organization's audit log in the console (owners and admins), and its CSV export."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.audit_log import as_csv
from mesh.console.web import Console, Page

SHOWN = 500
EXPORTED = 1000


async def audit_page(page: Page) -> Response:
    events = await page.services.audit.events(page.account_id, limit=SHOWN)
    return page.render("audit.html", title="Audit log", nav="audit", events=events,
                       retention_days=page.console.settings.audit_retention_days)


async def audit_csv(page: Page) -> Response:
    events = await page.services.audit.events(page.account_id, limit=EXPORTED)
    return Response(as_csv(events), media_type="text/csv; charset=utf-8",
                     headers={"content-disposition": 'attachment; filename="audit-log.csv"'})


def audit_routes(console: Console) -> list[Route]:
    return [
        console.route("/audit", audit_page, need="audit"),
        console.route("/audit.csv", audit_csv, need="audit"),
    ]
