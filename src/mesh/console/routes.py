"""All console routes, for the app to mount: ``routes = [..., *console_routes(settings)]``."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from mesh.config import Settings
from mesh.console.audit_view import audit_routes
from mesh.console.auth_routes import auth_routes
from mesh.console.billing import billing_routes
from mesh.console.dashboard import dashboard_routes
from mesh.console.email_routes import email_routes
from mesh.console.guide import guide_routes
from mesh.console.invitations import invitation_routes
from mesh.console.keys import keys_routes
from mesh.console.members import members_routes
from mesh.console.operator import operator_routes
from mesh.console.operator_fleet import fleet_routes
from mesh.console.playground import playground_routes
from mesh.console.spend import spend_routes
from mesh.console.sso import sso_routes
from mesh.console.static_headers import StaticHeaders
from mesh.console.web import PREFIX, STATIC, Console, Page


async def not_found(page: Page) -> Response:
    return page.render("error.html", status=404, title="Not found", message="There is no such page in the console.")


def console_routes(settings: Settings) -> list[BaseRoute]:
    """The console's pages, its static files and its webhook; empty when it is disabled."""
    if not settings.console.enabled:
        return []
    console = Console(settings)
    return [
        Mount(PREFIX + "/static", StaticHeaders(StaticFiles(directory=STATIC)), name="console-static"),
        *auth_routes(console),
        *dashboard_routes(console),
        *billing_routes(console),
        *keys_routes(console),
        *members_routes(console),
        *invitation_routes(console),
        *audit_routes(console),
        *sso_routes(console),
        *email_routes(console),
        *spend_routes(console),
        *guide_routes(console),
        *playground_routes(console),
        *operator_routes(console),
        *fleet_routes(console),
        console.route("/{path:path}", not_found, access="any"),
    ]
