"""Single sign-on settings of organizations, and who an SSO sign-in makes a member where.

The operator sets, per organization, the email domains whose *verified* SSO sign-ins join it
just in time (with a default role), and whether its members must sign in through SSO (their
password sign-in is then refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from mesh.accounts.members import add_member
from mesh.accounts.roles import Role, is_role
from mesh.console.tables import console_sessions, memberships, sso_settings
from mesh.errors import InvalidRequest, NotFound
from mesh.store import Database, utcnow
from mesh.store.tables import accounts

MAX_DOMAINS = 50


@dataclass(frozen=True, slots=True)
class SsoSettings:
    account_id: str
    domains: tuple[str, ...]
    default_role: Role
    require_sso: bool


def _settings(row: Any) -> SsoSettings:
    return SsoSettings(account_id=row.account_id, domains=tuple(row.domains or ()), default_role=row.default_role,
                       require_sso=bool(row.require_sso))


def _clean_domains(domains: list[str]) -> list[str]:
    out = sorted({d.strip().lower().lstrip("@") for d in domains if d.strip()})
    if len(out) > MAX_DOMAINS or any("." not in d or len(d) > 253 or " " in d for d in out):
        raise InvalidRequest("domains must be up to 50 email domains such as example.com", param="domains")
    return out


class SingleSignOn:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, account_id: str) -> SsoSettings | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(sso_settings).where(sso_settings.c.account_id == account_id))).first()
        return None if row is None else _settings(row)

    async def put(self, account_id: str, *, domains: list[str], default_role: str, require_sso: bool) -> SsoSettings:
        if not is_role(default_role) or default_role == "owner":
            raise InvalidRequest("default_role must be admin, billing, developer or viewer", param="default_role")
        values = {"domains": _clean_domains(domains), "default_role": default_role, "require_sso": require_sso,
                  "updated_at": utcnow()}
        async with self.db.write() as conn:
            if (await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))).first() is None:
                raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
            mine = sso_settings.c.account_id == account_id
            before = (await conn.execute(select(sso_settings.c.require_sso).where(mine))).first()
            if before is None:
                await conn.execute(sso_settings.insert().values(account_id=account_id, **values))
            else:
                await conn.execute(
                    sso_settings.update().where(sso_settings.c.account_id == account_id).values(**values)
                )
            if require_sso and not (before is not None and before.require_sso):
                # Sessions its members opened with a password end now (password sign-in is
                # refused from here on); a session does not record how it began, so all go.
                members = select(memberships.c.user_id).where(memberships.c.account_id == account_id)
                await conn.execute(delete(console_sessions).where(console_sessions.c.user_id.in_(members)))
        found = await self.get(account_id)
        assert found is not None
        return found

    async def requires_sso(self, user_id: str) -> bool:
        """Whether any organization the person belongs to requires SSO."""
        q = (
            select(sso_settings.c.account_id)
            .join(memberships, memberships.c.account_id == sso_settings.c.account_id)
            .where(memberships.c.user_id == user_id, sso_settings.c.require_sso.is_(True))
        )
        async with self.db.read() as conn:
            return (await conn.execute(q)).first() is not None

    async def organizations_for(self, email: str) -> list[SsoSettings]:
        """The organizations that claim the email's domain (few: the operator sets them)."""
        domain = email.rsplit("@", 1)[-1].lower()
        async with self.db.read() as conn:
            rows = [_settings(r) for r in await conn.execute(select(sso_settings))]
        return [s for s in rows if domain in s.domains]

    async def join_by_domain(self, user_id: str, email: str) -> list[tuple[str, Role]]:
        """Make the person (whose email the provider verified) a member of every organization
        that claims its domain and does not count them yet; returns (organization, role) added."""
        domain = email.rsplit("@", 1)[-1].lower()
        added: list[tuple[str, Role]] = []
        async with self.db.write() as conn:
            for row in await conn.execute(select(sso_settings)):
                found = _settings(row)
                if domain not in found.domains:
                    continue
                member = await conn.execute(select(memberships.c.role).where(
                    memberships.c.account_id == found.account_id, memberships.c.user_id == user_id))
                if member.first() is None:
                    await add_member(conn, user_id, found.account_id, found.default_role)
                    added.append((found.account_id, found.default_role))
        return added
