"""The credit ledger: grants, balances, and exact per-request holds.

Invariants, on SQLite and PostgreSQL alike:

* every balance change is a ledger row written in the same transaction, so the sum of an
  account's ledger amounts always equals its balance;
* ``balance + reversed >= held >= 0`` (CHECK constraints), so no request spends credit the
  account does not have, however many run at once; ``reversed`` is what Stripe refunds and
  disputes took back (:meth:`Ledger.reverse`), the only thing that may take a balance below
  zero, and only by that much;
* every ledger row has a unique idempotency key; retrying an operation with the same key
  returns the first row and changes nothing.

Grants and other credits are posted by :mod:`mesh.billing.entries`. Everything that holds,
charges or releases credit for requests goes through :mod:`mesh.billing.settlement`:
:meth:`Ledger.admit` takes an exact hold (lowering ``max_output_tokens`` or refusing with
402 when the balance is short), :meth:`Ledger.rehold` tops it up for a dearer model, and
:meth:`Ledger.settle` captures the real cost and releases the rest in one transaction
(idempotency key ``usage:<request_id>``), then queues the usage record.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mesh.accounts.principal import Principal
from mesh.billing import budgets, settlement
from mesh.billing.attribution import Attribution
from mesh.billing.entries import (
    LedgerEntry,
    entry_from_row,
    find_entry,
    post,
    post_reversal,
    reversed_under,
    run_idempotent,
)
from mesh.billing.money import MicroCredits, format_credits
from mesh.billing.pricing import hold_cost, max_output_tokens_affordable
from mesh.billing.usage import UsageRecord, UsageWriter
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import (
    AuthenticationFailed,
    InsufficientCredits,
    InvalidRequest,
    KeyBudgetExceeded,
    NotFound,
    UserBudgetExceeded,
)
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys, holds, ledger

CREDIT_KINDS = frozenset({"grant", "purchase", "redeem", "refund", "adjustment"})


@dataclass(frozen=True, slots=True)
class Admission:
    """Credit held for one request. ``max_output_tokens`` (per choice) may be lower than
    asked for; the hold covers the prompt estimate and ``max_output_tokens`` for each of
    ``choices`` choices. ``hold_id`` is the hold row it is held by: its own request id
    (an exact hold), a lease's id, or None when nothing is held (a free model)."""

    request_id: str
    account_id: str
    key_id: str | None
    held: MicroCredits
    max_output_tokens: int
    choices: int = 1
    prompt_tokens: int = 0
    hold_id: str | None = None
    end_user: str | None = None  # counted against the key's user_budget (None: not counted)

    @property
    def output_limit(self) -> int:
        """The most output the request can produce: more from an engine is not trusted."""
        return self.max_output_tokens * self.choices


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amounts are int micro-credits, not {type(amount).__name__}")


def _short(need: int, have: int, whose: str) -> InsufficientCredits:
    return InsufficientCredits(
        f"Insufficient credits: this request needs at least {format_credits(need)} credits "
        f"(its prompt and one output token) but {whose} {format_credits(max(have, 0))} available",
        should_retry=False,
    )


def _over_budget(need: int, left: int, period: str | None, resets_at: datetime | None) -> KeyBudgetExceeded:
    left = max(left, 0)
    what = "spend limit" if period in (None, "none") else f"{period} budget"
    when = "" if resets_at is None else f"; it resets at {resets_at.isoformat()}"
    headers = {"x-mesh-budget-remaining": format_credits(left)}
    if resets_at is not None:
        headers["x-mesh-budget-resets-at"] = resets_at.isoformat()
    return KeyBudgetExceeded(
        f"The API key's {what} is spent: this request needs at least {format_credits(need)} credits "
        f"(its prompt and one output token) but the key's {what} leaves {format_credits(left)}{when}. "
        "The account's balance is not the limit here.",
        headers=headers,
    )


def _over_user_budget(need: int, left: int, period: str | None, resets_at: datetime | None) -> UserBudgetExceeded:
    left = max(left, 0)
    what = "spend cap" if period in (None, "none") else f"{period} cap"
    when = "" if resets_at is None else f"; it resets at {resets_at.isoformat()}"
    headers = {"x-mesh-user-budget-remaining": format_credits(left)}
    if resets_at is not None:
        headers["x-mesh-budget-resets-at"] = resets_at.isoformat()
    return UserBudgetExceeded(
        f"The API key's {what} for this end user (the request's user) is spent: this request needs at least "
        f"{format_credits(need)} credits (its prompt and one output token) but the cap leaves "
        f"{format_credits(left)}{when}.",
        headers=headers,
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

    async def reverse(
        self, account_id: str, idempotency_key: str, *, target: int, counted: str, ceiling: int, scope: str,
        memo: str | None = None,
    ) -> LedgerEntry | None:
        """Take credit back after a refund or dispute, so that the reversal rows whose keys
        start with ``counted`` add up to ``target`` (cumulative, as Stripe reports refunds:
        a later refund reverses only the difference; an older, smaller one nothing) and
        those under ``scope`` (one checkout) never exceed ``ceiling`` (what it credited).

        Idempotent: a key already used returns None and changes nothing, as does a target
        already reached. The balance may go below zero by the amount reversed (never
        otherwise); a balance at or under what is held then refuses admission (402)."""
        if not idempotency_key.startswith(counted) or not counted.startswith(scope):
            raise ValueError("a reversal's key lies under what it counts, which lies under its scope")

        async def body(conn: AsyncConnection) -> LedgerEntry | None:
            await self._lock_account(conn, account_id)
            if await find_entry(conn, idempotency_key) is not None:
                return None  # the same event again
            done = await reversed_under(conn, account_id, counted)
            room = ceiling - await reversed_under(conn, account_id, scope)
            amount = min(target - done, room)
            if amount <= 0:
                return None
            return await post_reversal(conn, account_id=account_id, amount=amount, idempotency_key=idempotency_key,
                                       memo=memo)

        return await run_idempotent(self.db, idempotency_key, body, lambda _: None, precheck=False)

    async def reinstate(
        self, account_id: str, idempotency_key: str, *, of: str, memo: str | None = None
    ) -> LedgerEntry | None:
        """Give back what the reversal row ``of`` took (a dispute won), once. None when that
        reversal was never written or this key was used before. A reversal not yet written
        (Stripe delivered the win before the dispute) is settled at nothing: a zero row under
        ``of`` makes the late reversal a duplicate."""

        async def body(conn: AsyncConnection) -> LedgerEntry | None:
            await self._lock_account(conn, account_id)
            if await find_entry(conn, idempotency_key) is not None:
                return None
            taken = await find_entry(conn, of)
            if taken is None:
                await post_reversal(conn, account_id=account_id, amount=0, idempotency_key=of, memo=memo)
                return None
            if taken is None or taken.kind != "reversal" or taken.account_id != account_id or taken.amount >= 0:
                return None
            return await post_reversal(conn, account_id=account_id, amount=int(taken.amount),
                                       idempotency_key=idempotency_key, memo=memo)

        return await run_idempotent(self.db, idempotency_key, body, lambda _: None, precheck=False)

    @staticmethod
    async def _lock_account(conn: AsyncConnection, account_id: str) -> None:
        # The account's row first, as every writer of its balance locks it; under the lock
        # the ledger rows read next are the committed truth (PostgreSQL: read committed).
        found = await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id).with_for_update())
        if found.first() is None:
            raise NotFound(f"Account {account_id!r} not found", code="account_not_found")

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

    async def entries(
        self, account_id: str, *, limit: int = 50, after: int | None = None
    ) -> tuple[list[LedgerEntry], bool]:
        """A page of the account's ledger rows, newest first: up to ``limit`` rows older than
        the row ``after`` (a cursor: rows written meanwhile never shift a page), and whether
        older rows remain."""
        q = select(ledger).where(ledger.c.account_id == account_id)
        if after is not None:
            q = q.where(ledger.c.id < after)
        q = q.order_by(ledger.c.id.desc()).limit(limit + 1)
        async with self.db.read() as conn:
            rows = [entry_from_row(r) for r in await conn.execute(q)]
        return rows[:limit], len(rows) > limit

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
        *,
        choices: int = 1,
        end_user: str | None = None,
    ) -> Admission:
        """Hold credit for a request before it is dispatched.

        The hold covers the prompt (priced uncached), ``max_output_tokens`` of output for
        each of ``choices`` choices and the request fee. When the account (and the key's
        spend limit, if any) cannot pay for all of that but can pay for the prompt and at
        least one output token per choice, the returned ``max_output_tokens`` is lowered to
        what it can pay for and that is held. Otherwise raises ``InsufficientCredits``
        (402, not retryable). Free requests touch no database. On a key with a
        ``user_budget``, ``end_user``'s cap this period bounds the hold too
        (``UserBudgetExceeded``, 402).
        """
        if principal.user_budget is None:
            end_user = None
        if max_output_tokens < 1:
            raise InvalidRequest("max_output_tokens must be at least 1", param="max_tokens")
        if choices < 1:
            raise InvalidRequest("n must be at least 1", param="n")
        if hold_cost(pricing, prompt_tokens_estimate, max_output_tokens * choices) == 0:
            return Admission(
                request_id, principal.account_id, principal.key_id, MicroCredits(0), max_output_tokens, choices,
                prompt_tokens_estimate,
            )
        try:
            return await self._hold(
                principal, pricing, request_id, prompt_tokens_estimate, max_output_tokens, choices, end_user
            )
        except IntegrityError:
            raise InvalidRequest(f"request {request_id!r} already holds credit", code="duplicate_request_id") from None

    async def _hold(
        self, principal: Principal, pricing: Pricing, request_id: str, prompt_tokens: int, max_output_tokens: int,
        choices: int, end_user: str | None,
    ) -> Admission:
        # Fast path (the common case, measured as most of a request's CPU): two conditional
        # updates and the hold row, no reads. When the account or the key's spend limit cannot
        # cover the full hold, the careful path below works out what can be afforded.
        amount = hold_cost(pricing, prompt_tokens, max_output_tokens * choices)
        try:
            await self.db.run_write(
                settlement.hold, hold_id=request_id, account_id=principal.account_id, key_id=principal.key_id,
                amount=amount, grow=False, end_user=end_user,
            )
        except settlement.Uncovered:
            return await self._hold_carefully(
                principal, pricing, request_id, prompt_tokens, max_output_tokens, choices, end_user
            )
        return Admission(
            request_id, principal.account_id, principal.key_id, amount, max_output_tokens, choices, prompt_tokens,
            request_id, end_user,
        )

    async def _hold_carefully(
        self, principal: Principal, pricing: Pricing, request_id: str, prompt_tokens: int, max_output_tokens: int,
        choices: int, end_user: str | None,
    ) -> Admission:
        async with self.db.write() as conn:
            acct = (
                await conn.execute(
                    select(accounts.c.balance, accounts.c.held)
                    .where(accounts.c.id == principal.account_id)
                    .with_for_update()
                )
            ).first()
            await conn.run_sync(budgets.roll, principal.key_id)
            key = (
                await conn.execute(
                    select(
                        api_keys.c.spend_limit, api_keys.c.spent, api_keys.c.held, api_keys.c.budget_period,
                        api_keys.c.budget_resets_at,
                    )
                    .where(api_keys.c.id == principal.key_id)
                    .with_for_update()
                )
            ).first()
            if acct is None or key is None:
                raise AuthenticationFailed("Invalid API key")
            floor = hold_cost(pricing, prompt_tokens, choices)
            available = acct.balance - acct.held
            if max_output_tokens_affordable(pricing, available, prompt_tokens) < choices:
                raise _short(floor, available, "the account has")
            limit = available
            if key.spend_limit is not None:
                key_left = key.spend_limit - key.spent - key.held
                if max_output_tokens_affordable(pricing, key_left, prompt_tokens) < choices:
                    raise _over_budget(floor, key_left, key.budget_period, key.budget_resets_at)
                limit = min(limit, key_left)
            user_left = None if end_user is None else await conn.run_sync(
                settlement.user_room, principal.key_id, end_user
            )
            if user_left is None:
                end_user = None
            else:
                if max_output_tokens_affordable(pricing, user_left, prompt_tokens) < choices:
                    raise _over_user_budget(floor, user_left, key.budget_period, key.budget_resets_at)
                limit = min(limit, user_left)
            out = min(max_output_tokens, max_output_tokens_affordable(pricing, limit, prompt_tokens) // choices)
            amount = hold_cost(pricing, prompt_tokens, out * choices)
            try:
                await conn.run_sync(
                    settlement.hold, hold_id=request_id, account_id=principal.account_id, key_id=principal.key_id,
                    amount=amount, grow=False, end_user=end_user,
                )
            except settlement.Uncovered:  # only reachable if the row locks above were missing
                raise _short(floor, limit, "the account has") from None
        return Admission(
            request_id, principal.account_id, principal.key_id, amount, out, choices, prompt_tokens, request_id,
            end_user,
        )

    async def rehold(self, admission: Admission, pricing: Pricing) -> Admission:
        """Make ``admission``'s exact hold cover the same request at ``pricing`` (a fallback
        model dearer than the one it was held for): hold the difference, or raise
        ``InsufficientCredits`` (402) when the balance or the key's limit cannot. The
        admission is returned unchanged when it already covers the new price."""
        need = hold_cost(pricing, admission.prompt_tokens, admission.output_limit)
        if need <= admission.held:
            return admission
        hold_id = admission.hold_id or admission.request_id
        try:
            await self.db.run_write(
                settlement.hold, hold_id=hold_id, account_id=admission.account_id, key_id=admission.key_id,
                amount=need - admission.held, grow=True, end_user=admission.end_user,
            )
        except settlement.Uncovered:
            raise InsufficientCredits(
                f"Insufficient credits: the model that can serve this request needs {format_credits(need)} "
                "credits held",
                should_retry=False,
            ) from None
        return replace(admission, held=MicroCredits(need), hold_id=hold_id)

    async def capture(
        self, admission: Admission, settlements: Sequence[settlement.Settlement], *, close: bool
    ) -> settlement.Captured:
        """:func:`settlement.capture` on the admission's hold in its own transaction, run
        again if it met a concurrent writer of the same ledger rows."""
        hold_id = admission.hold_id or admission.request_id
        for attempt in range(3):
            try:
                return await self.db.run_write(
                    settlement.capture, hold_id=hold_id, account_id=admission.account_id, key_id=admission.key_id,
                    settlements=settlements, close=close,
                )
            except (settlement.LedgerRace, IntegrityError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

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
        attribution: Attribution | None = None,
        finish_reason: str | None = None,
    ) -> MicroCredits:
        """Release the hold and charge the real cost; returns the micro-credits charged.

        ``usage`` None (or all zeros) means nothing was generated: the cost is 0. Output
        beyond what the request could produce is not charged. A cost beyond the hold is
        charged from the account's free balance while it lasts; only what neither covers is
        a shortfall, noted in the ledger row's memo. Settling the same request again
        charges nothing more and returns the first charge. The usage record goes to the
        usage writer after the transaction commits (once).
        """
        due, usage = settlement.priced(pricing, usage, admission.output_limit)
        key = f"usage:{admission.request_id}"
        if admission.held == 0 and due == 0:
            charged, first = 0, True
        else:
            done = await self.capture(admission, [settlement.Settlement(key, admission.request_id, due)], close=True)
            charged, first = done.charged.get(key, 0), key in done.written or due == 0
        if first and self.usage is not None:
            self.usage.enqueue(
                usage_record(
                    admission, usage, MicroCredits(charged), status=status, model=model, replica=replica,
                    protocol=protocol, ttft_ms=ttft_ms, duration_ms=duration_ms, attribution=attribution,
                    finish_reason=finish_reason,
                )
            )
        return MicroCredits(charged)

    async def release_stale_holds(self, older_than: timedelta, *, prefix: str | None = None) -> int:
        """Release holds older than ``older_than`` (left by a crashed process); returns how
        many. A request settled after its hold was swept is still charged, from the balance.
        ``prefix`` limits the sweep to hold ids starting with it (credit leases). Each hold
        goes back in its own transaction, after checking under lock that it is still stale."""
        cutoff = utcnow() - older_than
        stale = holds.c.created_at < cutoff
        if prefix is not None:
            stale = stale & holds.c.request_id.startswith(prefix, autoescape=True)
        async with self.db.read() as conn:
            found = (
                await conn.execute(select(holds.c.request_id, holds.c.account_id, holds.c.key_id).where(stale))
            ).all()
        released = 0
        for r in found:
            async with self.db.write() as conn:
                # The account's row first, as every writer of held credit locks it.
                await conn.execute(select(accounts.c.id).where(accounts.c.id == r.account_id).with_for_update())
                still = (
                    await conn.execute(select(holds.c.amount).where(holds.c.request_id == r.request_id, stale))
                ).first()
                if still is None:
                    continue  # touched or settled meanwhile
                await conn.run_sync(
                    settlement.capture, hold_id=r.request_id, account_id=r.account_id, key_id=r.key_id,
                    settlements=(), close=True,
                )
                released += 1
        return released


def usage_record(
    admission: Admission,
    usage: Usage,
    charged: MicroCredits,
    *,
    status: str,
    model: str,
    replica: str | None,
    protocol: str | None,
    ttft_ms: int | None,
    duration_ms: int | None,
    attribution: Attribution | None = None,
    finish_reason: str | None = None,
    created_at: datetime | None = None,
) -> UsageRecord:
    """The usage row of a settled request (finished at ``created_at``, default now)."""
    who = attribution or _NOBODY
    # Positional, in UsageRecord's field order: one of these is built for every request.
    return UsageRecord(
        admission.request_id, admission.account_id, admission.key_id, model, status, usage.input_tokens,
        usage.cached_tokens, usage.output_tokens, usage.reasoning_tokens, charged, replica, protocol, ttft_ms,
        duration_ms, created_at or utcnow(), who.end_user, who.tags, who.metadata, finish_reason,
    )


_NOBODY = Attribution()
