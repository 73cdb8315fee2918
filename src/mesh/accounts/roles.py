"""Organization roles and what each may do: the one place the rules live.

docs/organizations.md has the same rules as a table per route; a test walks every console
route with every role and checks the answers against that table.
"""

from __future__ import annotations

from typing import Literal

Role = Literal["owner", "admin", "billing", "developer", "viewer"]
ROLES: tuple[Role, ...] = ("owner", "admin", "billing", "developer", "viewer")

Permission = Literal["usage", "keys", "keys.all", "billing", "members", "audit", "playground", "organization"]

GRANTS: dict[Permission, frozenset[Role]] = {
    "usage": frozenset(ROLES),  # dashboard, usage breakdowns, models
    "keys": frozenset({"owner", "admin", "developer"}),  # list keys, create and revoke one's own
    "keys.all": frozenset({"owner", "admin"}),  # revoke or re-budget anyone's key
    "billing": frozenset({"owner", "billing"}),  # buy credits, redeem codes, invoices
    "members": frozenset({"owner", "admin"}),  # invite, remove, change roles
    "audit": frozenset({"owner", "admin"}),
    "playground": frozenset({"owner", "admin", "developer"}),  # spends credits through a key
    "organization": frozenset({"owner"}),  # rename, SSO settings, transfer ownership
}


def allows(role: str | None, permission: Permission) -> bool:
    return role is not None and role in GRANTS[permission]


def is_role(text: str) -> bool:
    return text in ROLES
