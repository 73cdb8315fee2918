"""The console's request plumbing: who is signed in, CSRF, rendering, redirects, flashes.

Every console endpoint is a handler ``(page: Page) -> Response`` wrapped by
:meth:`Console.route`, which

* loads the session from the ``mesh_session`` cookie (server-side, see ``sessions``) and
  redirects to the sign-in page when a page needs a user and there is none;
* answers 403 to non-admins on operator pages;
* on POST, rejects the request with 403 unless it carries the right CSRF token (form
  field ``csrf_token`` or header ``X-CSRF-Token``): the session's own token when signed
  in; for signed-out forms (sign in, sign up) an HMAC of a random ``mesh_csrf`` cookie;
* adds the security headers (a strict Content-Security-Policy: no inline script at all).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from mesh.accounts.audit_log import Actor
from mesh.accounts.invitations import Invitations
from mesh.accounts.members import Members
from mesh.accounts.roles import Permission, Role, allows
from mesh.billing.services import Services
from mesh.config import ConsoleConfig, Settings
from mesh.console import display
from mesh.console.email_tokens import EmailTokens
from mesh.console.mailer import Mailer
from mesh.console.ratelimit import AttemptLimiter
from mesh.console.secrets import load_secret, sign, verify
from mesh.console.sessions import Session, Sessions
from mesh.console.users import ConsoleUser, Users
from mesh.errors import MeshError
from mesh.gateway import Gateway
from mesh.http.ids import request_id as new_request_id
from mesh.http.streaming import StreamResponse

if TYPE_CHECKING:
    from jinja2 import Environment

log = logging.getLogger("mesh.console")

PREFIX = "/console"
HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
SESSION_COOKIE = "mesh_session"
CSRF_COOKIE = "mesh_csrf"
FLASH_COOKIE = "mesh_flash"
MAX_FORM_BYTES = 64 * 1024
Access = Literal["user", "admin", "anonymous", "any"]
AnyResponse = Response | StreamResponse
Handler = Callable[["Page"], Awaitable[AnyResponse]]


def _static_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


@dataclass(frozen=True, slots=True)
class HeldKey:
    """An API key whose raw value this process holds in memory (the playground's)."""

    key_id: str
    raw: str
    expires_at: datetime


@dataclass
class Bound:
    """The console's services on one running gateway."""

    gateway: Gateway
    services: Services
    users: Users
    sessions: Sessions
    members: Members
    invitations: Invitations
    mailer: Mailer
    email_tokens: EmailTokens
    secret: bytes
    # user id -> the playground key this process minted (console/playground.py)
    playground_keys: OrderedDict[str, HeldKey] = field(default_factory=OrderedDict)


class Console:
    """State shared by every console request of one app: templates, limiters, the secret."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config: ConsoleConfig = settings.console
        self.email_limiter = AttemptLimiter(self.config.signin_attempts_per_email)
        self.ip_limiter = AttemptLimiter(self.config.signin_attempts_per_ip)
        self.signup_limiter = AttemptLimiter(self.config.signups_per_ip_per_hour, window=3600)
        # Verification and reset mails: per address mailed and per client address.
        self.mail_limiter = AttemptLimiter(self.config.mails_per_email_per_hour, window=3600)
        self.mail_ip_limiter = AttemptLimiter(self.config.mails_per_ip_per_hour, window=3600)
        self.invite_limiter = AttemptLimiter(self.config.invitations_per_hour, window=3600)
        # Read once at start (a missing or short secret stops the gateway there).
        self.secret = load_secret(self.config) if self.config.enabled else b""
        self._bound: Bound | None = None
        self._lock = asyncio.Lock()
        stripe = self.config.payments.provider == "stripe"
        self.form_action = "'self' https://checkout.stripe.com" if stripe else "'self'"

    async def bind(self, request: Request) -> Bound:
        gateway: Gateway = request.app.state.gateway
        bound = self._bound
        if bound is not None and bound.gateway is gateway:
            return bound
        async with self._lock:
            if self._bound is None or self._bound.gateway is not gateway:
                db = gateway.services.database
                self._bound = Bound(
                    gateway=gateway,
                    services=gateway.services,
                    users=Users(db),
                    sessions=Sessions(db, timedelta(hours=self.config.session_hours)),
                    members=Members(db),
                    invitations=Invitations(db, timedelta(hours=self.config.invitation_hours)),
                    mailer=Mailer(self.config.smtp),
                    email_tokens=EmailTokens(db),
                    secret=self.secret,
                )
            return self._bound

    @functools.cached_property
    def env(self) -> Environment:
        """The templates, made at the first page rendered: jinja2 is a tenth of a gateway's
        imports, and an API-only gateway renders none."""
        import jinja2

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=jinja2.select_autoescape(["html", "svg"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(display.FILTERS)
        env.globals["static_version"] = _static_version()
        return env

    def is_admin(self, user: ConsoleUser) -> bool:
        return user.is_admin or user.email in {a.strip().lower() for a in self.config.admins}

    def secure(self, request: Request) -> bool:
        """Whether cookies carry ``Secure``: as configured, else as ``server.public_url``
        says (behind a TLS-terminating proxy the request itself may look like http)."""
        if self.config.secure_cookies is not None:
            return self.config.secure_cookies
        public_url = self.settings.server.public_url
        if public_url:
            return public_url.lower().startswith("https://")
        return request.url.scheme == "https"

    def route(self, path: str, handler: Handler, *, methods: tuple[str, ...] = ("GET",),
              access: Access = "user", need: Permission | None = None) -> Route:
        """``need``: the permission (mesh.accounts.roles) the user's role in the session's
        organization must grant; ``None`` for pages of the person (settings, sign out)."""

        async def endpoint(request: Request) -> AnyResponse:
            page = await self._page(request, access)
            try:
                response: AnyResponse | None = await self._guard(page, access)
                if response is None and need is not None and page.session is not None:
                    response = await self._role_guard(page, need)
                if response is None:
                    response = await handler(page)
            except MeshError as err:
                response = page.render("error.html", status=err.status, title="Something went wrong",
                                       message=err.message)
            except Exception:
                log.exception("console page %s failed", request.url.path)
                response = page.render("error.html", status=500, title="Something went wrong",
                                       message="The console had an error. Try again in a moment.")
            return self._finish(page, response)

        endpoint.__name__ = handler.__name__
        return Route(PREFIX + path, endpoint, methods=list(methods))

    async def _page(self, request: Request, access: Access) -> Page:
        bound = await self.bind(request)
        session = await bound.sessions.load(request.cookies.get(SESSION_COOKIE))
        return Page(self, bound, request, session)

    async def _guard(self, page: Page, access: Access) -> Response | None:
        request = page.request
        if access in ("user", "admin") and page.session is None:
            if request.method != "GET":
                return page.redirect(f"{PREFIX}/signin")
            return page.redirect(f"{PREFIX}/signin?next={quote(request.url.path)}")
        if access == "anonymous" and page.session is not None and request.method == "GET":
            return page.redirect(f"{PREFIX}/dashboard")
        if access == "admin" and not page.is_admin:
            return page.render("error.html", status=403, title="Operators only",
                               message="This page is for operators of this Mesh installation.")
        if request.method == "POST":
            length = request.headers.get("content-length") or "0"
            size = int(length) if length.isdigit() else MAX_FORM_BYTES + 1
            if size > MAX_FORM_BYTES and not request.url.path.endswith("/playground/chat"):
                return page.render("error.html", status=413, title="Too large", message="That form is too large.")
            ctype = request.headers.get("content-type", "")
            if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
                try:
                    page.form = await request.form(max_files=0, max_fields=100)
                except (HTTPException, MultiPartException, ValueError):  # Starlette: 400 on garbage
                    return page.render("error.html", status=400, title="Bad form", message="That form was garbled.")
            if not page.csrf_ok():
                return page.render("error.html", status=403, title="Form expired",
                                   message="This form was stale or did not come from this site. "
                                           "Go back, reload the page and try again.")
        return None

    async def _role_guard(self, page: Page, need: Permission) -> Response | None:
        if page.session is None or page.session.account_id is None:
            return page.render("error.html", status=403, title="No organization",
                               message="You are not a member of any organization. Accept an invitation, "
                                       "or create an organization from the settings page.")
        if not allows(page.session.role, need):
            # Refusals are in the organization's audit log too: who tried what.
            await page.audit("access.denied", page.request.url.path, role=page.session.role, needs=need)
            return page.render("error.html", status=403, title="Not allowed",
                               message=f"Your role ({page.session.role}) in this organization does not "
                                       "allow this page. Ask an owner or an admin.")
        return None

    def _finish(self, page: Page, response: AnyResponse) -> AnyResponse:
        h = response.headers
        h["x-request-id"] = page.request_id
        h.setdefault("cache-control", "no-store")
        h["x-content-type-options"] = "nosniff"
        h["referrer-policy"] = "same-origin"
        h["x-frame-options"] = "DENY"
        h["content-security-policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action {self.form_action}"
        )
        secure = self.secure(page.request)
        if not isinstance(response, Response):
            return response  # a stream sets no cookies
        for name, value, max_age in page.cookies:
            if value is None:
                response.delete_cookie(name, path=PREFIX, secure=secure, httponly=True, samesite="lax")
            else:
                response.set_cookie(name, value, max_age=max_age, path=PREFIX, secure=secure, httponly=True,
                                    samesite="lax")
        return response


@dataclass
class Page:
    """One console request: who is asking, their form, and how to answer."""

    console: Console
    bound: Bound
    request: Request
    session: Session | None
    form: FormData | None = None
    request_id: str = field(default_factory=new_request_id)
    cookies: list[tuple[str, str | None, int | None]] = field(default_factory=list)
    _anon_csrf: str | None = None

    @property
    def user(self) -> ConsoleUser:
        assert self.session is not None, "this page requires a signed-in user"
        return self.session.user

    @property
    def account_id(self) -> str:
        """The organization this session works in (pages with a ``need`` always have one)."""
        assert self.session is not None and self.session.account_id is not None, "no organization"
        return self.session.account_id

    @property
    def role(self) -> Role | None:
        return None if self.session is None else self.session.role

    def can(self, permission: Permission) -> bool:
        return allows(self.role, permission)

    @property
    def is_admin(self) -> bool:
        return self.session is not None and self.console.is_admin(self.session.user)

    @property
    def services(self) -> Services:
        return self.bound.services

    @property
    def gateway(self) -> Gateway:
        return self.bound.gateway

    @property
    def client_ip(self) -> str:
        client = self.request.client
        return client.host if client else "unknown"

    def actor_as(self, user: ConsoleUser) -> Actor:
        """A person acting before their session exists (signing up or in right now)."""
        return Actor(name=user.email, id=user.id, ip=self.client_ip, request_id=self.request_id)

    def actor(self) -> Actor:
        user = self.session.user if self.session is not None else None
        return Actor(name=user.email if user else "anonymous", id=user.id if user else None, ip=self.client_ip,
                     request_id=self.request_id)

    async def audit(self, action: str, target: str | None = None, *, account_id: str | None = None,
                    **detail: Any) -> None:
        """Record in the organization's audit log (the session's, unless ``account_id``)."""
        await self.services.audit.record(self.actor(), action, account_id=account_id or self.account_id,
                                         target=target, detail=detail or None)

    def field(self, name: str, default: str = "") -> str:
        value = self.form.get(name) if self.form is not None else None
        return value if isinstance(value, str) else default

    def fields(self, name: str) -> list[str]:
        return [v for v in self.form.getlist(name) if isinstance(v, str)] if self.form is not None else []

    def set_cookie(self, name: str, value: str | None, max_age: int | None = None) -> None:
        self.cookies.append((name, value, max_age))

    # CSRF ----------------------------------------------------------------------------------
    def csrf_token(self) -> str:
        if self.session is not None:
            return self.session.csrf_token
        if self._anon_csrf is None:
            nonce = self.request.cookies.get(CSRF_COOKIE)
            if not nonce or len(nonce) != 32:
                nonce = secrets.token_hex(16)
                self.set_cookie(CSRF_COOKIE, nonce, 24 * 3600)
            self._anon_csrf = sign(self.bound.secret, "csrf", nonce)
        return self._anon_csrf

    def csrf_ok(self) -> bool:
        sent = self.request.headers.get("x-csrf-token") or self.field("csrf_token")
        if not sent:
            return False
        if self.session is not None:
            return hmac.compare_digest(sent, self.session.csrf_token)
        nonce = self.request.cookies.get(CSRF_COOKIE)
        return bool(nonce) and verify(self.bound.secret, "csrf", nonce or "", sent)

    # answers -------------------------------------------------------------------------------
    def flash(self, message: str, kind: str = "ok") -> None:
        payload = base64.urlsafe_b64encode(json.dumps({"k": kind, "m": message}).encode()).decode()
        self.set_cookie(FLASH_COOKIE, f"{payload}.{sign(self.bound.secret, 'flash', payload)}", 120)

    def _take_flash(self) -> dict[str, str] | None:
        raw = self.request.cookies.get(FLASH_COOKIE)
        if not raw:
            return None
        self.set_cookie(FLASH_COOKIE, None)
        payload, _, signature = raw.partition(".")
        if not verify(self.bound.secret, "flash", payload, signature):
            return None
        try:
            data: dict[str, str] = json.loads(base64.urlsafe_b64decode(payload))
        except ValueError:
            return None
        return data

    def redirect(self, url: str, flash: str | None = None, kind: str = "ok") -> Response:
        if flash:
            self.flash(flash, kind)
        return RedirectResponse(url, status_code=303)

    def base_url(self) -> str:
        """The public base URL of the API (``server.public_url``, else this request's)."""
        configured = self.console.settings.server.public_url
        base = configured.rstrip("/") if configured else str(self.request.base_url).rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    def render(self, template: str, *, status: int = 200, **context: Any) -> Response:
        user = self.session.user if self.session is not None else None
        body = self.console.env.get_template(template).render(
            user=user,
            is_admin=self.is_admin,
            role=self.role,
            can=self.can,
            account_id=None if self.session is None else self.session.account_id,
            csrf_token=self.csrf_token(),
            flash=self._take_flash(),
            path=self.request.url.path,
            **context,
        )
        return HTMLResponse(body, status_code=status)
