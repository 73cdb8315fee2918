"""Sign up, sign in (throttled), sign out, and the settings page (password change)."""

from __future__ import annotations

from datetime import timedelta

from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.sso import SingleSignOn
from mesh.console.passwords import normalize_email
from mesh.console.users import ConsoleUser, SignUpError
from mesh.console.web import PREFIX, SESSION_COOKIE, Console, Page

SIGNUP_DONE = "Your account is ready: sign in with your email and password."
SIGNUP_VERIFY = "Almost there: open the link we sent to your email, then sign in."
UNVERIFIED = "Verify your email first: open the link we sent you (or send it again below)."


def _next_url(raw: str) -> str:
    """Only a path inside the console, never another site (``//evil`` or ``https://…``)."""
    if raw.startswith(PREFIX + "/") and not raw.startswith("//") and "\\" not in raw and "://" not in raw:
        return raw
    return PREFIX + "/dashboard"


def _client(page: Page) -> str:
    client = page.request.client
    return client.host if client else "unknown"


async def landing_organization(page: Page, user: ConsoleUser) -> str | None:
    """Where a new session opens: the organization used last, if still a member, else the
    first one; ``None`` for a person in none."""
    mine = await page.bound.members.of_user(user.id)
    if any(m.account_id == user.account_id for m in mine):
        return user.account_id
    return mine[0].account_id if mine else None


async def start_session(page: Page, user: ConsoleUser, target: str, flash: str | None = None) -> Response:
    organization = await landing_organization(page, user)
    token = await page.bound.sessions.create(user.id, organization)
    if organization is None:
        target = PREFIX + "/organizations"  # in none: accept an invitation or create one
    page.set_cookie(SESSION_COOKIE, token, page.console.config.session_hours * 3600)
    return page.redirect(target, flash)


async def signup_form(page: Page) -> Response:
    if not page.console.config.allow_signup:
        return page.render("error.html", status=403, title="Sign-up is closed",
                           message="Ask the operator of this Mesh installation for an account.")
    return page.render("signup.html", title="Create your account", errors={}, email="")


async def signup(page: Page) -> Response:
    if not page.console.config.allow_signup:
        return await signup_form(page)
    email = page.field("email")
    password = page.field("password")
    ip = _client(page)
    wait = page.console.signup_limiter.retry_after(ip)
    if wait:
        errors = {"email": f"Too many new accounts from your address; try again in {wait} s."}
        return page.render("signup.html", status=429, title="Create your account", errors=errors, email=email)
    if password != page.field("password_confirm"):
        errors = {"password_confirm": "The two passwords differ."}
        return page.render("signup.html", status=400, title="Create your account", errors=errors, email=email)
    try:
        created = await page.bound.users.sign_up(email, password)
    except SignUpError as err:
        return page.render("signup.html", status=400, title="Create your account",
                           errors={err.field: err.message}, email=email)
    # Counts every well-formed attempt, a taken email too: probing emails costs the budget.
    page.console.signup_limiter.fail(ip)
    # The same answer whether the email was free or taken (its owner signs in as usual):
    # sign-up never says which emails are registered.
    if not page.console.config.verify_email:
        return page.redirect(PREFIX + "/signin", SIGNUP_DONE)
    if created is not None:
        await send_verification(page, created)
    return page.redirect(PREFIX + "/signin", SIGNUP_VERIFY)


async def signin_form(page: Page) -> Response:
    nxt = _next_url(page.request.query_params.get("next", ""))
    return page.render("signin.html", title="Sign in", error=None, email="", next=nxt,
                       providers=page.console.config.sso)


async def signin(page: Page) -> Response:
    email_text = page.field("email")
    nxt = _next_url(page.field("next"))
    email = normalize_email(email_text) or email_text.strip().lower()[:254]
    ip = _client(page)
    console = page.console
    wait = console.email_limiter.retry_after(email)
    if wait:
        return _too_many(page, email_text, nxt, wait)
    # An address over its limit is not refused outright: many people may share it (a NAT,
    # an office, a proxy whose headers are not trusted), and the right password still
    # signs in. Its wrong guesses get the throttled answer; each email keeps its own limit.
    ip_wait = console.ip_limiter.retry_after(ip)
    user = await page.bound.users.check_password(email_text, page.field("password"))
    if user is None:
        console.email_limiter.fail(email)
        console.ip_limiter.fail(ip)
        if ip_wait:
            return _too_many(page, email_text, nxt, ip_wait)
        return page.render("signin.html", status=400, title="Sign in", email=email_text, next=nxt,
                           providers=console.config.sso, error="Wrong email or password.")
    console.email_limiter.reset(email)
    if console.config.verify_email and user.email_verified_at is None:
        return page.render("signin.html", status=403, title="Sign in", email=email_text, next=nxt,
                           providers=console.config.sso, error=UNVERIFIED, unverified=True)
    if await SingleSignOn(page.services.database).requires_sso(user.id):
        return page.render("signin.html", status=403, title="Sign in", email=email_text, next=nxt,
                           providers=console.config.sso,
                           error="Your organization requires single sign-on: use its sign-in button.")
    return await start_session(page, user, nxt)


def _too_many(page: Page, email_text: str, nxt: str, wait: int) -> Response:
    return page.render("signin.html", status=429, title="Sign in", email=email_text, next=nxt,
                       providers=page.console.config.sso,
                       error=f"Too many attempts, try again in {wait} s.")


async def send_verification(page: Page, user: ConsoleUser) -> None:
    config = page.console.config
    token = await page.bound.email_tokens.issue(user.id, "verify", timedelta(hours=config.verification_hours))
    page.bound.mailer.post(
        user.email, "Verify your email for Mesh",
        f"Open this link to verify your email and finish creating your Mesh account "
        f"(it works once, for {config.verification_hours} hours):\n{site_base(page)}{PREFIX}/verify/{token}\n",
    )


def site_base(page: Page) -> str:
    configured = page.console.settings.server.public_url
    return configured.rstrip("/").removesuffix("/v1") if configured else str(page.request.base_url).rstrip("/")


async def signout(page: Page) -> Response:
    if page.session is not None:
        await page.bound.sessions.end(page.session.token_hash)
    page.set_cookie(SESSION_COOKIE, None)
    return page.redirect(PREFIX + "/signin", "You are signed out.")


async def settings_page(page: Page) -> Response:
    return page.render("settings.html", title="Settings", nav="settings", error=None)


async def change_password(page: Page) -> Response:
    assert page.session is not None
    if page.field("new_password") != page.field("new_password_confirm"):
        return page.render("settings.html", status=400, title="Settings", nav="settings",
                           error="The two new passwords differ.")
    problem = await page.bound.users.change_password(
        page.user, page.field("current_password"), page.field("new_password"), page.session.token_hash
    )
    if problem:
        return page.render("settings.html", status=400, title="Settings", nav="settings", error=problem)
    return page.redirect(PREFIX + "/settings", "Password changed. Other sessions were signed out.")


async def home(page: Page) -> Response:
    return page.redirect(PREFIX + ("/dashboard" if page.session is not None else "/signin"))


def auth_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("", home, access="any"),
        r("/", home, access="any"),
        r("/signup", signup_form, access="anonymous"),
        r("/signup", signup, methods=("POST",), access="anonymous"),
        r("/signin", signin_form, access="anonymous"),
        r("/signin", signin, methods=("POST",), access="anonymous"),
        r("/signout", signout, methods=("POST",), access="any"),
        r("/settings", settings_page),
        r("/settings/password", change_password, methods=("POST",)),
    ]
