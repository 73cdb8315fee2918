"""Inviting people to an organization, and accepting an invitation.

Owners and admins invite by email with a role (only owners invite owners). The invitee
opens the link: signed in with the invited email, they accept; signed out, they either sign
in (then come back) or sign up with a password right there, which both creates the person
and makes them a member. The link works once, until it expires or is revoked.
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.audit_log import Actor
from mesh.accounts.invitations import Invitation
from mesh.accounts.sso import SingleSignOn
from mesh.console.passwords import normalize_email
from mesh.console.users import SignUpError
from mesh.console.web import PREFIX, SESSION_COOKIE, Console, Page
from mesh.errors import MeshError
from mesh.store import utcnow


def invitation_link(page: Page, token: str) -> str:
    configured = page.console.settings.server.public_url
    base = configured.rstrip("/").removesuffix("/v1") if configured else str(page.request.base_url).rstrip("/")
    return f"{base}{PREFIX}/invitations/{token}"


async def invite(page: Page) -> Response:
    email = normalize_email(page.field("email"))
    role = page.field("role", "viewer")
    if email is None:
        return page.redirect(PREFIX + "/members", "Enter a valid email address.", "error")
    if role == "owner" and not page.can("organization"):
        return page.render("error.html", status=403, title="Not allowed", message="Only owners invite owners.")
    limiter, keys = page.console.invite_limiter, (f"user:{page.user.id}", f"ip:{page.client_ip}")
    wait = max(limiter.retry_after(k) for k in keys)
    if wait:
        return page.render("error.html", status=429, title="Too many invitations",
                           message=f"Too many invitations sent; try again in {wait} s.")
    for k in keys:
        limiter.fail(k)
    try:
        invitation, token = await page.bound.invitations.create(page.account_id, email, role, page.user.id)
    except MeshError as err:
        return page.redirect(PREFIX + "/members", err.message, "error")
    link = invitation_link(page, token)
    await page.bound.mailer.send(
        email, f"You are invited to {invitation.account_name} on Mesh",
        f"{page.user.email} invites you to join {invitation.account_name} as {role}.\n\n"
        f"Open this link to accept (it works once, until {invitation.expires_at:%Y-%m-%d %H:%M} UTC):\n{link}\n",
    )
    await page.audit("member.invited", email, role=role, invitation=invitation.id)
    return page.redirect(PREFIX + "/members", f"Invitation sent to {email} as {role}.")


async def revoke_invitation(page: Page) -> Response:
    found = await page.bound.invitations.revoke(page.account_id, page.request.path_params["invitation_id"])
    if found is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such pending invitation.")
    await page.audit("member.invitation_revoked", found.email, invitation=found.id)
    return page.redirect(PREFIX + "/members", f"The invitation to {found.email} was revoked.")


async def _usable(page: Page) -> Invitation | Response:
    found = await page.bound.invitations.by_token(page.request.path_params["token"])
    if found is None or not found.usable(utcnow()):
        return page.render("error.html", status=404, title="Invitation not valid",
                           message="This invitation was used, revoked or has expired. Ask for a new one.")
    return found


def _render(page: Page, invitation: Invitation, *, status: int = 200, error: str | None = None) -> Response:
    exists = page.session is not None
    return page.render("invitation.html", status=status, title="Invitation", invitation=invitation, error=error,
                       token=page.request.path_params["token"], signed_in=exists,
                       signin_next=quote(page.request.url.path))


async def invitation_page(page: Page) -> Response:
    found = await _usable(page)
    if isinstance(found, Response):
        return found
    return _render(page, found)


async def accept(page: Page) -> Response:
    found = await _usable(page)
    if isinstance(found, Response):
        return found
    token = page.request.path_params["token"]
    if page.session is not None:
        if page.user.email != found.email:
            return _render(page, found, status=403,
                           error=f"This invitation is for {found.email}; you are signed in as {page.user.email}.")
        return await _join(page, token, page.user.id, page.user.email, page.session.token_hash)
    # Signed out: sign up with the invited email (receiving the link proves it).
    if await page.bound.users.by_email(found.email) is not None:
        return _render(page, found, status=400, error="You already have an account: sign in first, then accept.")
    password = page.field("password")
    if password != page.field("password_confirm"):
        return _render(page, found, status=400, error="The two passwords differ.")
    try:
        user = await page.bound.users.sign_up(found.email, password, joining=found.account_id, verified=True)
    except SignUpError as err:
        return _render(page, found, status=400, error=err.message)
    if user is None:
        return _render(page, found, status=400, error="You already have an account: sign in first, then accept.")
    return await _join(page, token, user.id, user.email, None)


async def _join(page: Page, token: str, user_id: str, email: str, session: str | None) -> Response:
    try:
        invitation = await page.bound.invitations.accept(token, user_id)
    except MeshError as err:
        return page.render("error.html", status=404, title="Invitation not valid", message=err.message)
    await page.services.audit.record(
        page.actor() if session else Actor(name=email, id=user_id, ip=page.client_ip, request_id=page.request_id),
        "member.joined",
        account_id=invitation.account_id, target=email, detail={"role": invitation.role, "invitation": invitation.id},
    )
    flash = f"Welcome to {invitation.account_name}: you are {invitation.role}."
    sso = await SingleSignOn(page.services.database).get(invitation.account_id)
    if sso is not None and sso.require_sso:
        # The link proves the email, not a sign-in through the organization's provider: no
        # session made here (or by a password earlier) may work in it.
        if session is not None:
            await page.bound.sessions.end(session)
        page.set_cookie(SESSION_COOKIE, None)
        return page.redirect(PREFIX + "/signin", flash + " It requires single sign-on: sign in with its provider.")
    if session is not None:
        await page.bound.sessions.switch(session, user_id, invitation.account_id)
        return page.redirect(PREFIX + "/dashboard", flash)
    new = await page.bound.sessions.create(user_id, invitation.account_id)
    page.set_cookie(SESSION_COOKIE, new, page.console.config.session_hours * 3600)
    return page.redirect(PREFIX + "/dashboard", flash)



def invitation_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/members/invite", invite, methods=("POST",), need="members"),
        r("/members/invitations/{invitation_id}/revoke", revoke_invitation, methods=("POST",), need="members"),
        r("/invitations/{token}", invitation_page, access="any"),
        r("/invitations/{token}", accept, methods=("POST",), access="any"),
    ]
