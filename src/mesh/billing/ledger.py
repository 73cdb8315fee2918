"""The credit ledger: grants, balances, and the request path's hold → settle pair.

Invariants, on SQLite and PostgreSQL alike:

* every balance change is a ledger row written in the same transaction, so the sum of an
  account's ledger amounts always equals its balance;
* ``balance >= held >= 0`` (CHECK constraints), so no request spends credit the account
  does not have, however many run at once;
* every ledger row has a unique idempotency key; retrying an operation with the same key
  returns the first row and changes nothing.

:meth:`Ledger.admit` reserves credit before dispatch with a conditional
``UPDATE … SET held = held + :h WHERE balance - held >= :h``; a hold moves no money and
writes no ledger row. :meth:`Ledger.settle` releases the hold and charges the real cost
in one transaction (idempotency key ``usage:<request_id>``), then queues the usage record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mesh.accounts.principal import Principal
from mesh.billing.entries import LedgerEntry, append_entry, entry_from_row, find_entry, post, run_idempotent
from mesh.billing.money import MicroCredits, format_credits
from mesh.billing.pricing import cost, hold_cost, max_output_tokens_affordable
from mesh.billing.usage import UsageRecord, UsageWriter
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import AuthenticationFailed, InsufficientCredits, InvalidRequest, NotFound
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys, holds, ledger

CREDIT_KINDS = frozenset({"grant", "purchase", "redeem", "refund", "adjustment"})


class FastPathAbandoned(Exception):
    """Abandon a fast-path transaction (rolled back) and take the careful path; shared with leases."""


# Hot-path statements, built once: constructing SQLAlchemy expressions per request was a
# measured fifth of a request's CPU (bench/results, py-spy).
HOLD_ACCOUNT = (
    update(accounts)
    .where(accounts.c.id == bindparam("a"), accounts.c.balance - accounts.c.held >= bindparam("h"))
    .values(held=accounts.c.held + bindparam("h"))
)
HOLD_KEY = (
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("k"),
        api_keys.c.spend_limit.is_(None)
        | (api_keys.c.spend_limit - api_keys.c.spent - api_keys.c.held >= bindparam("h")),
    )
    .values(held=api_keys.c.held + bindparam("h"))
)
INSERT_HOLD = insert(holds).values(
    request_id=bindparam("r"), account_id=bindparam("a"), key_id=bindparam("k"), amount=bindparam("h"),
    created_at=bindparam("t"),
)
SETTLE_ACCOUNT = (
    update(accounts)
    .where(
        accounts.c.id == bindparam("a"),
        accounts.c.balance - bindparam("due") >= accounts.c.held - bindparam("hold"),
    )
    .values(held=accounts.c.held - bindparam("hold"), balance=accounts.c.balance - bindparam("due"))
    .returning(accounts.c.balance)
)
SETTLE_KEY = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("k"))
    .values(held=api_keys.c.held - bindparam("hold"), spent=api_keys.c.spent + bindparam("due"))
)


@dataclass(frozen=True, slots=True)
class Admission:
    """Credit held for one request. ``max_output_tokens`` may be lower than asked for."""

    request_id: str
    account_id: str
    key_id: str | None
    held: MicroCredits
    max_output_tokens: int


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amounts are int micro-credits, not {type(amount).__name__}")


def _short(need: int, have: int, whose: str) -> InsufficientCredits:
    return InsufficientCredits(
        f"Insufficient credits: this request needs at least {format_credits(need)} credits "
        f"(its prompt and one output token) but {whose} {format_credits(max(have, 0))} available",
        should_retry=False,
    )


class Ledger:
    """Balances and their history. ``usage`` receives a record for every settled request."""

    def __init__(self, db: Database, usage: UsageWriter | None = None) -> None:
        self.db = db
        self.usage = usage

    async def grant(
        self,
        account_id: str,
        amount: int,
        idempotency_key: str | None = None,
        kind: str = "grant",
        memo: str | None = None,
    ) -> LedgerEntry:
        """Credit (or, for ``adjustment``, possibly debit) ``amount`` micro-credits.

        ``kind`` is one of grant, purchase, redeem, refund, adjustment; only an adjustment
        may be negative, and no amount may be zero. Retrying with the same idempotency key
        returns the original row; reusing a key for a different account, amount or kind
        raises ``InvalidRequest`` (code ``idempotency_key_reused``). Raises ``NotFound`` for
        an unknown account and ``InsufficientCredits`` for a debit beyond what is available.
        """
        _check_amount(amount)
        if kind not in CREDIT_KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(sorted(CREDIT_KINDS))}", param="kind")
        if amount == 0 or (amount < 0 and kind != "adjustment"):
            raise InvalidRequest("amount must be positive (only an adjustment may be negative)", param="amount")
        key = idempotency_key or f"{kind}:{uuid.uuid4().hex}"

        async def body(conn: AsyncConnection) -> LedgerEntry:
            return await post(conn, account_id=account_id, amount=amount, kind=kind, idempotency_key=key, memo=memo)

        def existing(entry: LedgerEntry) -> LedgerEntry:
            if (entry.account_id, entry.amount, entry.kind) != (account_id, amount, kind):
                raise InvalidRequest(
                    "this idempotency key was already used for a different operation",
                    param="idempotency_key",
                    code="idempotency_key_reused",
                )
            return entry

        return await run_idempotent(self.db, key, body, existing)

    async def balance(self, account_id: str) -> tuple[MicroCredits, MicroCredits]:
        """``(balance, held)`` in micro-credits; available is their difference. ``NotFound``
        for an unknown account."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(accounts.c.balance, accounts.c.held).where(accounts.c.id == account_id))
            ).first()
        if row is None:
            raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
        return MicroCredits(row.balance), MicroCredits(row.held)

    async def entries(self, account_id: str, *, limit: int = 50) -> list[LedgerEntry]:
        """The account's latest ledger rows, newest first."""
        q = select(ledger).where(ledger.c.account_id == account_id).order_by(ledger.c.id.desc()).limit(limit)
        async with self.db.read() as conn:
            return [entry_from_row(r) for r in await conn.execute(q)]

    async def ledger_sum(self, account_id: str) -> MicroCredits:
        """The sum of the account's ledger amounts (equal to its balance, always)."""
        q = select(func.coalesce(func.sum(ledger.c.amount), 0)).where(ledger.c.account_id == account_id)
        async with self.db.read() as conn:
            return MicroCredits(int((await conn.execute(q)).scalar_one()))

    async def admit(
        self,
        principal: Principal,
        pricing: Pricing,
        request_id: str,
        prompt_tokens_estimate: int,
        max_output_tokens: int,
    ) -> Admission:
        """Hold credit for a request before it is dispatched.

        The hold covers the prompt (priced uncached), ``max_output_tokens`` of output and the
        request fee. When the account (and the key's spend limit, if any) cannot pay for all
        of that but can pay for the prompt and at least one output token, the returned
        ``max_output_tokens`` is lowered to what it can pay for and that is held. Otherwise
        raises ``InsufficientCredits`` (402, not retryable). Free requests touch no database.
        """
        if max_output_tokens < 1:
            raise InvalidRequest("max_output_tokens must be at least 1", param="max_tokens")
        if hold_cost(pricing, prompt_tokens_estimate, max_output_tokens) == 0:
            return Admission(request_id, principal.account_id, principal.key_id, MicroCredits(0), max_output_tokens)
        try:
            return await self._hold(principal, pricing, request_id, prompt_tokens_estimate, max_output_tokens)
        except IntegrityError:
            raise InvalidRequest(f"request {request_id!r} already holds credit", code="duplicate_request_id") from None

    async def _hold(
        self, principal: Principal, pricing: Pricing, request_id: str, prompt_tokens: int, max_output_tokens: int
    ) -> Admission:
        # Fast path (the common case, measured as most of a request's CPU): two conditional
        # updates and the hold row, no reads. When the account or the key's spend limit cannot
        # cover the full hold, the careful path below works out what can be afforded.
        amount = hold_cost(pricing, prompt_tokens, max_output_tokens)
        try:
            async with self.db.write() as conn:
                params = {"a": principal.account_id, "k": principal.key_id, "h": amount}
                if (await conn.execute(HOLD_ACCOUNT, params)).rowcount == 1:
                    if (await conn.execute(HOLD_KEY, params)).rowcount != 1:
                        raise FastPathAbandoned  # roll the account's hold back and take the careful path
                    await conn.execute(
                        INSERT_HOLD,
                        {"r": request_id, "a": principal.account_id, "k": principal.key_id, "h": amount,
                         "t": utcnow()},
                    )
                    return Admission(request_id, principal.account_id, principal.key_id, amount, max_output_tokens)
        except FastPathAbandoned:
            pass
        return await self._hold_carefully(principal, pricing, request_id, prompt_tokens, max_output_tokens)

    async def _hold_carefully(
        self, principal: Principal, pricing: Pricing, request_id: str, prompt_tokens: int, max_output_tokens: int
    ) -> Admission:
        async with self.db.write() as conn:
            acct = (
                await conn.execute(
                    select(accounts.c.balance, accounts.c.held)
                    .where(accounts.c.id == principal.account_id)
                    .with_for_update()
                )
            ).first()
            key = (
                await conn.execute(
                    select(api_keys.c.spend_limit, api_keys.c.spent, api_keys.c.held)
                    .where(api_keys.c.id == principal.key_id)
                    .with_for_update()
                )
            ).first()
            if acct is None or key is None:
                raise AuthenticationFailed("Invalid API key")
            floor = hold_cost(pricing, prompt_tokens, 1)
            available = acct.balance - acct.held
            if max_output_tokens_affordable(pricing, available, prompt_tokens) < 1:
                raise _short(floor, available, "the account has")
            limit = available
            if key.spend_limit is not None:
                key_left = key.spend_limit - key.spent - key.held
                if max_output_tokens_affordable(pricing, key_left, prompt_tokens) < 1:
                    raise _short(floor, key_left, "the API key's spend limit leaves")
                limit = min(limit, key_left)
            out = min(max_output_tokens, max_output_tokens_affordable(pricing, limit, prompt_tokens))
            amount = hold_cost(pricing, prompt_tokens, out)
            held = await conn.execute(
                update(accounts)
                .where(accounts.c.id == principal.account_id, accounts.c.balance - accounts.c.held >= amount)
                .values(held=accounts.c.held + amount)
            )
            if held.rowcount != 1:  # only reachable if the row lock above were missing
                raise _short(floor, available, "the account has")
            key_held = await conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.id == principal.key_id,
                    api_keys.c.spend_limit.is_(None)
                    | (api_keys.c.spend_limit - api_keys.c.spent - api_keys.c.held >= amount),
                )
                .values(held=api_keys.c.held + amount)
            )
            if key_held.rowcount != 1:
                raise _short(floor, limit, "the API key's spend limit leaves")
            await conn.execute(
                insert(holds).values(
                    request_id=request_id,
                    account_id=principal.account_id,
                    key_id=principal.key_id,
                    amount=amount,
                    created_at=utcnow(),
                )
            )
        return Admission(request_id, principal.account_id, principal.key_id, amount, out)

    async def settle(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        status: str,
        model: str,
        pricing: Pricing,
        replica: str | None = None,
        protocol: str | None = None,
        ttft_ms: int | None = None,
        duration_ms: int | None = None,
    ) -> MicroCredits:
        """Release the hold and charge the real cost; returns the micro-credits charged.

        ``usage`` None (or all zeros) means nothing was generated: the cost is 0. A cost
        beyond the hold plus the account's available credit is charged only up to what the
        balance has, and the shortfall is noted in the ledger row's memo. Settling the same
        request again charges nothing more and returns the first charge. The usage record
        goes to the usage writer after the transaction commits.
        """
        usage = usage or Usage()
        due = 0 if usage.input_tokens == 0 and usage.output_tokens == 0 else cost(pricing, usage)
        key = f"usage:{admission.request_id}"
        first = True

        def existing(entry: LedgerEntry) -> MicroCredits:
            nonlocal first
            first = False
            return MicroCredits(-entry.amount)

        async def body(conn: AsyncConnection) -> MicroCredits:
            nonlocal first
            released = (
                await conn.execute(
                    delete(holds).where(holds.c.request_id == admission.request_id).returning(holds.c.amount)
                )
            ).scalar_one_or_none()
            hold = int(released or 0)
            if hold == 0 and admission.held > 0:
                # The hold is gone: settled before (perhaps by a transaction we just waited
                # for on its row lock), or swept as stale. Only the latter still owes.
                earlier = await find_entry(conn, key)
                if earlier is not None:
                    return existing(earlier)
                first = due > 0
            if hold == 0 and due == 0:
                return MicroCredits(0)
            # Fast path: the balance covers the whole cost (one conditional update, no reads).
            balance_after = (
                await conn.execute(SETTLE_ACCOUNT, {"a": admission.account_id, "hold": hold, "due": due})
            ).scalar_one_or_none()
            if balance_after is not None:
                if due:
                    await append_entry(
                        conn, account_id=admission.account_id, amount=-due, kind="usage",
                        balance_after=int(balance_after), idempotency_key=key,
                        request_id=admission.request_id, key_id=admission.key_id,
                    )
                if admission.key_id is not None:
                    await conn.execute(SETTLE_KEY, {"k": admission.key_id, "hold": hold, "due": due})
                return MicroCredits(due)
            acct = (
                await conn.execute(
                    select(accounts.c.balance, accounts.c.held)
                    .where(accounts.c.id == admission.account_id)
                    .with_for_update()
                )
            ).first()
            if acct is None:
                raise NotFound(f"Account {admission.account_id!r} not found", code="account_not_found")
            charge = max(0, min(due, acct.balance - (acct.held - hold)))
            if hold:
                await conn.execute(
                    update(accounts).where(accounts.c.id == admission.account_id).values(held=accounts.c.held - hold)
                )
            if charge:
                memo = None
                if charge < due:
                    memo = f"shortfall: cost {format_credits(due)}, charged {format_credits(charge)}"
                await post(
                    conn,
                    account_id=admission.account_id,
                    amount=-charge,
                    kind="usage",
                    idempotency_key=key,
                    request_id=admission.request_id,
                    key_id=admission.key_id,
                    memo=memo,
                )
            if admission.key_id is not None:
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == admission.key_id)
                    .values(held=api_keys.c.held - hold, spent=api_keys.c.spent + charge)
                )
            return MicroCredits(charge)

        charged = await run_idempotent(self.db, key, body, existing, precheck=False)
        if first and self.usage is not None:
            self.usage.enqueue(
                UsageRecord(
                    request_id=admission.request_id,
                    account_id=admission.account_id,
                    key_id=admission.key_id,
                    model=model,
                    status=status,
                    input_tokens=usage.input_tokens,
                    cached_tokens=usage.cached_tokens,
                    output_tokens=usage.output_tokens,
                    reasoning_tokens=usage.reasoning_tokens,
                    cost=charged,
                    replica=replica,
                    protocol=protocol,
                    ttft_ms=ttft_ms,
                    duration_ms=duration_ms,
                )
            )
        return charged

    async def release_stale_holds(self, older_than: timedelta, *, prefix: str | None = None) -> int:
        """Release holds older than ``older_than`` (left by a crashed process); returns how
        many. A request settled after its hold was swept is still charged, from the balance.
        ``prefix`` limits the sweep to hold ids starting with it (credit leases)."""
        cutoff = utcnow() - older_than
        stale = holds.c.created_at < cutoff
        if prefix is not None:
            stale = stale & holds.c.request_id.startswith(prefix, autoescape=True)
        async with self.db.write() as conn:
            rows = (
                await conn.execute(
                    delete(holds).where(stale).returning(holds.c.account_id, holds.c.key_id, holds.c.amount)
                )
            ).all()
            per_account: dict[str, int] = {}
            per_key: dict[str, int] = {}
            for r in rows:
                per_account[r.account_id] = per_account.get(r.account_id, 0) + r.amount
                if r.key_id is not None:
                    per_key[r.key_id] = per_key.get(r.key_id, 0) + r.amount
            for account_id in sorted(per_account):
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.id == account_id)
                    .values(held=accounts.c.held - per_account[account_id])
                )
            for key_id in sorted(per_key):
                await conn.execute(
                    update(api_keys).where(api_keys.c.id == key_id).values(held=api_keys.c.held - per_key[key_id])
                )
        return len(rows)
