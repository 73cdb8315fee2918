"""Organizations in the console: list, create and switch between them; members and roles.

Owners and admins manage members; only owners touch owners (grant, take away, remove),
so an admin can never lock the owners out. The last owner can neither leave nor be
removed nor demoted (``Members`` refuses it under a lock on the organization's row).
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.roles import ROLES
from mesh.console.web import PREFIX, Console, Page
from mesh.errors import MeshError


async def organizations_page(page: Page) -> Response:
    mine = await page.bound.members.of_user(page.user.id)
    current = page.session.account_id if page.session is not None else None
    return page.render("organizations.html", title="Organizations", nav="organizations", mine=mine,
                       current=current)


async def create_organization(page: Page) -> Response:
    assert page.session is not None
    try:
        account_id = await page.bound.members.create_organization(page.user.id, page.field("name"))
    except MeshError as err:
        return page.redirect(PREFIX + "/organizations", err.message, "error")
    await page.bound.sessions.switch(page.session.token_hash, page.user.id, account_id)
    name = page.field("name").strip()
    await page.audit("organization.created", name, account_id=account_id)
    return page.redirect(PREFIX + "/dashboard", f"Organization {name} created; you are its owner.")


async def switch_organization(page: Page) -> Response:
    assert page.session is not None
    found = await page.bound.members.get(page.field("account_id"), page.user.id)
    if found is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such organization.")
    await page.bound.sessions.switch(page.session.token_hash, page.user.id, found.account_id)
    return page.redirect(PREFIX + "/dashboard", f"Now working in {found.account_name}.")


async def members_page(page: Page) -> Response:
    members = await page.bound.members.of_account(page.account_id)
    pending = await page.bound.invitations.pending(page.account_id)
    return page.render("members.html", title="Members", nav="members", members=members, roles=ROLES,
                       owner=page.can("organization"), pending=pending,
                       invitation_hours=page.console.config.invitation_hours)


def _touches_owners(page: Page, current: str, new: str | None) -> bool:
    return (current == "owner" or new == "owner") and not page.can("organization")


async def change_role(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    found = await page.bound.members.get(page.account_id, user_id)
    if found is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such member.")
    role = page.field("role")
    if _touches_owners(page, found.role, role):
        return page.render("error.html", status=403, title="Not allowed", message="Only owners change owners.")
    try:
        await page.bound.members.set_role(page.account_id, user_id, role)
    except MeshError as err:
        return page.redirect(PREFIX + "/members", err.message, "error")
    await page.audit("member.role_changed", found.email, old=found.role, new=role)
    return page.redirect(PREFIX + "/members", f"{found.email} is now {role}.")


async def remove_member(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    found = await page.bound.members.get(page.account_id, user_id)
    if found is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such member.")
    if _touches_owners(page, found.role, None):
        return page.render("error.html", status=403, title="Not allowed", message="Only owners remove owners.")
    try:
        await page.bound.members.remove(page.account_id, user_id)
    except MeshError as err:
        return page.redirect(PREFIX + "/members", err.message, "error")
    await page.audit("member.removed", found.email, role=found.role)
    return page.redirect(PREFIX + "/members",
                         f"{found.email} was removed and signed out. The keys they created still work until revoked.")


async def leave(page: Page) -> Response:
    account_id = page.account_id
    try:
        found = await page.bound.members.remove(account_id, page.user.id)
    except MeshError as err:
        return page.redirect(PREFIX + "/organizations", err.message, "error")
    await page.audit("member.left", found.email, account_id=account_id)
    return page.redirect(PREFIX + "/signin", f"You left {found.account_name}. Sign in again to continue.")


async def delete_organization(page: Page) -> Response:
    account_id = page.account_id
    if page.field("confirm").strip() != account_id:
        return page.redirect(PREFIX + "/organizations", "Type the organization's id to confirm.", "error")
    try:
        key_ids = await page.bound.members.delete_organization(account_id)
    except MeshError as err:
        return page.redirect(PREFIX + "/organizations", err.message, "error")
    for key_id in key_ids:
        await page.services.authenticator.revoke(key_id)
    await page.audit("organization.deleted", account_id, account_id=account_id, keys_revoked=len(key_ids))
    return page.redirect(PREFIX + "/signin", "The organization was deleted and its keys revoked. Sign in again.")


def members_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/organizations", organizations_page),
        r("/organizations", create_organization, methods=("POST",)),
        r("/organizations/switch", switch_organization, methods=("POST",)),
        r("/organizations/leave", leave, methods=("POST",), need="usage"),
        r("/organizations/delete", delete_organization, methods=("POST",), need="organization"),
        r("/members", members_page, need="members"),
        r("/members/{user_id}/role", change_role, methods=("POST",), need="members"),
        r("/members/{user_id}/remove", remove_member, methods=("POST",), need="members"),
    ]
