"""Email verification and password reset by mailed, single-use, expiring links.

Asking for a mail (verification again, a reset) always gets the same answer, whether the
email is registered or not, and is throttled per email and per client address, so neither
the answer nor a flood of mails gives anything away.
"""

from __future__ import annotations

from datetime import timedelta

from starlette.responses import Response
from starlette.routing import Route

from mesh.console.auth_routes import send_verification, site_base
from mesh.console.passwords import normalize_email, password_problem
from mesh.console.web import PREFIX, Console, Page

SENT = "If that email has an account, a link is on its way. It works once."


def _throttled(page: Page, email: str) -> int:
    console = page.console
    wait = max(console.mail_limiter.retry_after(email), console.mail_ip_limiter.retry_after(page.client_ip))
    if not wait:
        console.mail_limiter.fail(email)
        console.mail_ip_limiter.fail(page.client_ip)
    return wait


_USED = "This link was used or has expired. Sign in to have a new one sent."


async def verify_form(page: Page) -> Response:
    """The link shows a button and uses nothing up: mail scanners (and link previews) fetch
    every link in a mail, and a GET that spent the token left the person a dead link."""
    token = page.request.path_params["token"]
    if await page.bound.email_tokens.peek(token, "verify") is None:
        return page.render("error.html", status=404, title="Link not valid", message=_USED)
    return page.render("verify.html", title="Verify your email", token=token)


async def verify(page: Page) -> Response:
    user_id = await page.bound.email_tokens.use(page.request.path_params["token"], "verify")
    if user_id is None:
        return page.render("error.html", status=404, title="Link not valid", message=_USED)
    await page.bound.users.mark_verified(user_id)
    return page.redirect(PREFIX + "/signin", "Your email is verified: sign in.")


async def resend(page: Page) -> Response:
    email = normalize_email(page.field("email")) or ""
    wait = _throttled(page, email)
    if wait:
        return page.render("reset_request.html", status=429, title="Too many mails", sent=None,
                           error=f"Too many mails asked for; try again in {wait} s.")
    user = await page.bound.users.by_email(email) if email else None
    if user is not None and user.email_verified_at is None:
        await send_verification(page, user)
    return page.redirect(PREFIX + "/signin", SENT)


async def reset_request_form(page: Page) -> Response:
    return page.render("reset_request.html", title="Reset your password", sent=None, error=None)


async def reset_request(page: Page) -> Response:
    email = normalize_email(page.field("email")) or ""
    wait = _throttled(page, email)
    if wait:
        return page.render("reset_request.html", status=429, title="Reset your password", sent=None,
                           error=f"Too many mails asked for; try again in {wait} s.")
    user = await page.bound.users.by_email(email) if email else None
    if user is not None:
        minutes = page.console.config.reset_minutes
        token = await page.bound.email_tokens.issue(user.id, "reset", timedelta(minutes=minutes))
        page.bound.mailer.post(
            user.email, "Reset your Mesh password",
            f"Someone (we hope you) asked to reset your Mesh password. Open this link to choose a new one "
            f"(it works once, for {minutes} minutes):\n{site_base(page)}{PREFIX}/reset/{token}\n\n"
            "If it was not you, ignore this mail: your password stays as it is.\n",
        )
    return page.render("reset_request.html", title="Reset your password", sent=SENT, error=None)


async def reset_form(page: Page) -> Response:
    if await page.bound.email_tokens.peek(page.request.path_params["token"], "reset") is None:
        return page.render("error.html", status=404, title="Link not valid",
                           message="This link was used or has expired. Ask for a new one.")
    return page.render("reset_form.html", title="Choose a new password", error=None,
                       token=page.request.path_params["token"])


async def reset(page: Page) -> Response:
    token = page.request.path_params["token"]
    if page.field("password") != page.field("password_confirm"):
        return page.render("reset_form.html", status=400, title="Choose a new password",
                           error="The two passwords differ.", token=token)
    user_id = await page.bound.email_tokens.peek(token, "reset")
    if user_id is None:
        return page.render("error.html", status=404, title="Link not valid",
                           message="This link was used or has expired. Ask for a new one.")
    problem = password_problem(page.field("password"))
    if problem:
        return page.render("reset_form.html", status=400, title="Choose a new password", error=problem, token=token)
    if await page.bound.email_tokens.use(token, "reset") != user_id:
        return page.render("error.html", status=404, title="Link not valid",
                           message="This link was used or has expired. Ask for a new one.")
    await page.bound.users.reset_password(user_id, page.field("password"))
    return page.redirect(PREFIX + "/signin", "Password changed; every session was signed out. Sign in.")


def email_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/verify/{token}", verify_form, access="any"),
        r("/verify/{token}", verify, methods=("POST",), access="any"),
        r("/verify", resend, methods=("POST",), access="any"),
        r("/reset", reset_request_form, access="any"),
        r("/reset", reset_request, methods=("POST",), access="any"),
        r("/reset/{token}", reset_form, access="any"),
        r("/reset/{token}", reset, methods=("POST",), access="any"),
    ]
