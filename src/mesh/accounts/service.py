"""Accounts and API keys: creation, lookup and listing. Revocation lives in ``auth``.

A created key is returned in full exactly once (:class:`CreatedKey`); the database keeps
only its hash and its 12-character prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mesh.accounts.keys import generate_key, hash_key, key_prefix, new_id
from mesh.billing import budgets
from mesh.billing.money import MicroCredits
from mesh.errors import InvalidRequest, NotFound
from mesh.limits.policy import MAX_LIMIT, merge_overrides, overrides_from_json
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys

MAX_NAME_LENGTH = 200
DEFAULT_PAGE = 100
MAX_PAGE = 1000
ZERO = MicroCredits(0)


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    balance: MicroCredits
    held: MicroCredits
    created_at: datetime
    rate_limits: dict[str, int] | None = None  # the operator's overrides; missing: the default

    @property
    def available(self) -> MicroCredits:
        return MicroCredits(self.balance - self.held)


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """A key as listings show it: never the key itself."""

    id: str
    account_id: str
    name: str
    prefix: str
    allowed_models: tuple[str, ...] | None
    expires_at: datetime | None
    spend_limit: MicroCredits | None
    spent: MicroCredits
    held: MicroCredits
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime
    rate_limits: dict[str, int] | None = None  # the operator's overrides; missing: the default
    # The budget's period (mesh.billing.budgets); ``spent`` is this period's spend.
    budget_period: str = "none"
    budget_reset_day: int | None = None
    budget_resets_at: datetime | None = None
    user_budget: MicroCredits | None = None  # per end user, per budget period
    created_by: str | None = None  # the console user who created it; None: the admin API

    @property
    def remaining(self) -> MicroCredits | None:
        """What the budget still allows (held credit counts as spent); None: no budget."""
        if self.spend_limit is None:
            return None
        return MicroCredits(max(0, self.spend_limit - self.spent - self.held))


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: ``key`` is the only copy of the secret, to be shown once."""

    info: ApiKeyInfo
    key: str = field(repr=False)


def _account(row: Any) -> Account:
    return Account(
        id=row.id,
        name=row.name,
        balance=MicroCredits(row.balance),
        held=MicroCredits(row.held),
        created_at=row.created_at,
        rate_limits=overrides_from_json(row.rate_limits) or None,
    )


def key_info(row: Any) -> ApiKeyInfo:
    """Build an :class:`ApiKeyInfo` from an ``api_keys`` row."""
    models = row.allowed_models
    period = getattr(row, "budget_period", None) or "none"
    reset_day = getattr(row, "budget_reset_day", None)
    resets_at = getattr(row, "budget_resets_at", None)
    spent = int(row.spent)
    if resets_at is not None and resets_at <= budgets.now():
        # The period ended and nothing has rolled it over yet: show the new one.
        spent, resets_at = 0, budgets.next_reset(period, reset_day, budgets.now())
    return ApiKeyInfo(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        prefix=row.prefix,
        allowed_models=None if models is None else tuple(models),
        expires_at=row.expires_at,
        spend_limit=None if row.spend_limit is None else MicroCredits(row.spend_limit),
        spent=MicroCredits(spent),
        held=MicroCredits(row.held),
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        created_at=row.created_at,
        rate_limits=overrides_from_json(getattr(row, "rate_limits", None)) or None,
        budget_period=period,
        budget_reset_day=reset_day,
        budget_resets_at=resets_at,
        user_budget=None if getattr(row, "user_budget", None) is None else MicroCredits(row.user_budget),
        created_by=getattr(row, "created_by", None),
    )


def _period_columns(period: str, reset_day: int | None) -> dict[str, Any]:
    return {
        "budget_period": None if period == "none" else period,
        "budget_reset_day": reset_day,
        "budget_resets_at": budgets.next_reset(period, reset_day, budgets.now()),
    }


def _clean_name(name: str, *, required: bool) -> str:
    name = name.strip()
    if required and not name:
        raise InvalidRequest("name must not be empty", param="name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"name is longer than {MAX_NAME_LENGTH} characters", param="name")
    return name


def _clean_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    cleaned = sorted({m.strip() for m in models if m.strip()})
    if not cleaned:
        raise InvalidRequest(
            "allowed_models must name at least one model (or be null for every model)",
            param="allowed_models",
        )
    return cleaned


class Accounts:
    """Create, read and list accounts and their API keys."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, name: str) -> Account:
        """Create an account with a zero balance. Raises ``InvalidRequest`` for a bad name."""
        account = Account(new_id("acct"), _clean_name(name, required=True), ZERO, ZERO, utcnow())
        async with self.db.write() as conn:
            await insert_account(conn, account.id, account.name, account.created_at)
        return account

    async def get(self, account_id: str) -> Account:
        """The account, or ``NotFound`` (code ``account_not_found``)."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()
        if row is None:
            raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
        return _account(row)

    async def list_accounts(self, *, limit: int = DEFAULT_PAGE, offset: int = 0) -> list[Account]:
        """Accounts, oldest first."""
        limit = max(1, min(limit, MAX_PAGE))
        q = select(accounts).order_by(accounts.c.created_at, accounts.c.id).limit(limit).offset(max(0, offset))
        async with self.db.read() as conn:
            return [_account(r) for r in await conn.execute(q)]

    async def count(self) -> int:
        async with self.db.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(accounts))).scalar_one())

    async def create_key(
        self,
        account_id: str,
        *,
        name: str = "",
        allowed_models: Iterable[str] | None = None,
        expires_at: datetime | None = None,
        spend_limit: MicroCredits | None = None,
        rate_limits: Mapping[str, int | None] | None = None,
        budget_period: str = "none",
        budget_reset_day: int | None = None,
        user_budget: MicroCredits | None = None,
        created_by: str | None = None,
    ) -> CreatedKey:
        """Mint a key for the account and return it in full, once.

        Raises ``NotFound`` for an unknown account and ``InvalidRequest`` for a bad name,
        an empty model list, a naive ``expires_at``, a negative spend limit or a bad rate
        limit (``rate_limits``: ``rpm``, ``tpm``, ``concurrent``; 0 lifts the default).
        """
        if expires_at is not None and expires_at.tzinfo is None:
            raise InvalidRequest("expires_at must include a timezone", param="expires_at")
        if spend_limit is not None and spend_limit < 0:
            raise InvalidRequest("spend_limit cannot be negative", param="spend_limit")
        if user_budget is not None and user_budget < 0:
            raise InvalidRequest("user_budget cannot be negative", param="user_budget")
        period, reset_day = budgets.check(budget_period, budget_reset_day)
        raw = generate_key()
        row: dict[str, Any] = {
            "id": new_id("key"),
            "account_id": account_id,
            "name": _clean_name(name, required=False),
            "prefix": key_prefix(raw),
            "key_hash": hash_key(raw),
            "allowed_models": _clean_models(allowed_models),
            "expires_at": expires_at,
            "spend_limit": spend_limit,
            "spent": 0,
            "held": 0,
            "revoked_at": None,
            "last_used_at": None,
            "created_at": utcnow(),
            "created_by": created_by,
            "rate_limits": _limits_patch(None, rate_limits or {}),
            "user_budget": user_budget,
            **_period_columns(period, reset_day),
        }
        async with self.db.write() as conn:
            exists = await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))
            if exists.first() is None:
                raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
            await conn.execute(insert(api_keys).values(**row))
        return CreatedKey(info=key_info(SimpleNamespace(**row)), key=raw)

    async def list_keys(self, account_id: str) -> list[ApiKeyInfo]:
        """The account's keys, newest first (revoked ones included)."""
        q = (
            select(api_keys)
            .where(api_keys.c.account_id == account_id)
            .order_by(api_keys.c.created_at.desc(), api_keys.c.id)
        )
        async with self.db.read() as conn:
            return [key_info(r) for r in await conn.execute(q)]

    async def get_key(self, key_id: str) -> ApiKeyInfo:
        """The key's listing entry, or ``NotFound`` (code ``key_not_found``)."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise NotFound(f"API key {key_id!r} not found", code="key_not_found")
        return key_info(row)

    async def set_key_budget(
        self,
        key_id: str,
        *,
        spend_limit: MicroCredits | None = None,
        change_limit: bool = False,
        period: str | None = None,
        reset_day: int | None = None,
        change_reset_day: bool = False,
        user_budget: MicroCredits | None = None,
        change_user_budget: bool = False,
    ) -> ApiKeyInfo:
        """Change the key's budget: its amount (``change_limit``; ``None`` for no limit),
        its period and reset day (``None``/not ``change_reset_day``: unchanged). A changed
        period or reset day starts a new period now (``spent`` back to 0); a changed amount
        alone keeps what was spent. ``NotFound`` (``key_not_found``) or ``InvalidRequest``."""
        if change_limit and spend_limit is not None and spend_limit < 0:
            raise InvalidRequest("spend_limit cannot be negative", param="spend_limit")
        if change_user_budget and user_budget is not None and user_budget < 0:
            raise InvalidRequest("user_budget cannot be negative", param="user_budget")
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.budget_period, api_keys.c.budget_reset_day)
                    .where(api_keys.c.id == key_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(f"API key {key_id!r} not found", code="key_not_found")
            values: dict[str, Any] = {"spend_limit": spend_limit} if change_limit else {}
            if change_user_budget:
                values["user_budget"] = user_budget
            old_period, old_day = row.budget_period or "none", row.budget_reset_day
            if period is not None or change_reset_day:
                new_period = period if period is not None else old_period
                if period is not None and period != old_period and not change_reset_day:
                    reset_day = None  # the old period's day means nothing in the new one
                elif not change_reset_day:
                    reset_day = old_day
                new_period, reset_day = budgets.check(new_period, reset_day)
                if (new_period, reset_day) != (old_period, old_day):
                    values.update(_period_columns(new_period, reset_day), spent=0)
            if values:
                await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**values))
        return await self.get_key(key_id)

    async def set_account_limits(self, account_id: str, patch: Mapping[str, int | None] | None) -> Account:
        """Change the account's rate-limit overrides and return the account.

        ``patch`` maps ``rpm``/``tpm``/``concurrent`` to a limit (0: none, whatever the
        default) or ``None`` (back to the default); ``None`` drops every override. Raises
        ``NotFound`` (``account_not_found``) or ``InvalidRequest``. Callers must then tell the
        key caches (``KeyAuthenticator.account_changed``).
        """
        await self._set_limits(accounts, account_id, patch, "account_not_found", "Account")
        return await self.get(account_id)

    async def set_key_limits(self, key_id: str, patch: Mapping[str, int | None] | None) -> ApiKeyInfo:
        """The same for one key (``key_not_found``); then ``KeyAuthenticator.key_changed``."""
        await self._set_limits(api_keys, key_id, patch, "key_not_found", "API key")
        return await self.get_key(key_id)

    async def _set_limits(
        self, table: Table, row_id: str, patch: Mapping[str, int | None] | None, code: str, what: str
    ) -> None:
        async with self.db.write() as conn:
            row = (await conn.execute(select(table.c.rate_limits).where(table.c.id == row_id))).first()
            if row is None:
                raise NotFound(f"{what} {row_id!r} not found", code=code)
            merged = None if patch is None else _limits_patch(row.rate_limits, patch)
            await conn.execute(update(table).where(table.c.id == row_id).values(rate_limits=merged))


def _limits_patch(current: object, patch: Mapping[str, int | None]) -> dict[str, int] | None:
    for name, value in patch.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT):
            raise InvalidRequest(
                f"rate_limits.{name} must be a whole number from 0 to {MAX_LIMIT}, or null", param=f"rate_limits.{name}"
            )
    try:
        return merge_overrides(current, patch)
    except ValueError as exc:
        raise InvalidRequest(f"rate_limits: {exc}", param="rate_limits") from None


async def insert_account(conn: AsyncConnection, account_id: str, name: str, created_at: datetime) -> None:
    """A new account (organization), empty, inside the caller's transaction: the one place
    accounts are made, for the admin API and for the console's sign-up alike."""
    await conn.execute(insert(accounts).values(id=account_id, name=name, balance=0, held=0, created_at=created_at))
