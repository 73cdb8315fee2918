"""Automatic top-ups: when an account's balance falls under its threshold, charge its saved
card (a Stripe customer and payment method) for a credit pack, off session.

Every ``console.payments.auto_topup.interval`` seconds each gateway process looks for
enabled accounts under their threshold with no attempt in flight, and claims one by a
conditional update of ``pending_payment`` (so one process, one attempt at a time). The
attempt is a ``console_payments`` row and a PaymentIntent created through the official SDK
with ``confirm`` and ``off_session``, under the idempotency key
``mesh-topup:<account>:<attempt>``: a create whose answer was lost and is retried cannot
charge twice. **Credits are granted only by the signed ``payment_intent.succeeded``
webhook** (:meth:`mesh.console.payments.Payments.handle_webhook`, ledger idempotency key
``topup:<payment intent>``), which also ends the attempt; ``payment_intent.payment_failed``
or a refusal from Stripe ends it as a failure, and ``max_failures`` in a row turn the
account's top-up off. An attempt whose webhook never comes stays in flight (no second
charge) until an operator looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import insert, select, update

from mesh.accounts.keys import new_id
from mesh.billing.money import MicroCredits, parse_credits
from mesh.config import PaymentsConfig
from mesh.console.tables import auto_topups, console_payments
from mesh.errors import InvalidRequest, NotFound
from mesh.store import Database, utcnow
from mesh.store.tables import accounts

if TYPE_CHECKING:
    import stripe  # imported when a top-up runs: a gateway starts without the SDK

log = logging.getLogger("mesh.console.topups")


@dataclass(frozen=True, slots=True)
class AutoTopup:
    account_id: str
    customer: str
    payment_method: str
    threshold: MicroCredits
    pack_id: str
    enabled: bool
    attempts: int
    failures: int
    pending_payment: str | None


def stripe_client(config: PaymentsConfig, http: stripe.HTTPClient) -> stripe.StripeClient:
    import stripe

    key = config.stripe_secret_key
    assert key is not None
    if config.stripe_api_base is None:
        return stripe.StripeClient(key.get_secret_value(), http_client=http)
    return stripe.StripeClient(key.get_secret_value(), http_client=http,
                               base_addresses={"api": config.stripe_api_base})


async def configure(
    db: Database, config: PaymentsConfig, account_id: str, *, customer: str, payment_method: str,
    threshold: MicroCredits, pack_id: str, enabled: bool = True,
) -> AutoTopup:
    """Set (or replace) the account's automatic top-up. ``InvalidRequest`` for an unknown
    pack or ids that are not Stripe's; ``NotFound`` for an unknown account."""
    if not any(p.id == pack_id for p in config.packs):
        raise InvalidRequest("pack is not one of console.payments.packs", param="pack")
    if not customer.startswith("cus_") or not payment_method.startswith(("pm_", "card_", "src_")):
        raise InvalidRequest("customer must be a Stripe customer id (cus_…) and payment_method a payment "
                             "method id (pm_…)", param="payment_method")
    if threshold < 0:
        raise InvalidRequest("threshold cannot be negative", param="threshold")
    values = {"customer": customer, "payment_method": payment_method, "threshold": threshold,
              "pack_id": pack_id, "enabled": enabled, "failures": 0, "updated_at": utcnow()}
    async with db.write() as conn:
        if (await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))).first() is None:
            raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
        changed = await conn.execute(update(auto_topups).where(auto_topups.c.account_id == account_id)
                                     .values(**values))
        if changed.rowcount == 0:
            await conn.execute(insert(auto_topups).values(account_id=account_id, attempts=0, pending_payment=None,
                                                          **values))
    found = await get(db, account_id)
    assert found is not None
    return found


async def get(db: Database, account_id: str) -> AutoTopup | None:
    async with db.read() as conn:
        row = (await conn.execute(select(auto_topups).where(auto_topups.c.account_id == account_id))).first()
    if row is None:
        return None
    return AutoTopup(row.account_id, row.customer, row.payment_method, MicroCredits(row.threshold), row.pack_id,
                     bool(row.enabled), int(row.attempts), int(row.failures), row.pending_payment)


async def finish(db: Database, payment_id: str, *, ok: bool, max_failures: int) -> None:
    """End the attempt ``payment_id`` (if it is the one in flight)."""
    t = auto_topups.c
    async with db.write() as conn:
        if ok:
            values = {"pending_payment": None, "failures": 0, "updated_at": utcnow()}
        else:
            row = (await conn.execute(select(t.failures).where(t.pending_payment == payment_id))).first()
            failures = 1 + (0 if row is None else int(row.failures))
            values = {"pending_payment": None, "failures": failures, "updated_at": utcnow()}
            if failures >= max_failures:
                values["enabled"] = False
                log.warning("automatic top-up turned off after %d failures (payment %s)", failures, payment_id)
        await conn.execute(update(auto_topups).where(t.pending_payment == payment_id).values(**values))


class AutoTopups:
    """One background task per process between :meth:`start` and :meth:`aclose`."""

    def __init__(self, db: Database, config: PaymentsConfig,
                 stripe_http: Callable[[], stripe.HTTPClient] | None = None) -> None:
        self.db = db
        self.config = config
        self._stripe_http = stripe_http or _aiohttp_client
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.config.provider == "stripe" and self.config.auto_topup.enabled

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mesh-auto-topups")

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("automatic top-up check failed")
            await asyncio.sleep(self.config.auto_topup.interval)

    async def check(self) -> int:
        """Start an attempt for every enabled account under its threshold with none in
        flight; returns how many this process started."""
        t = auto_topups.c
        q = (
            select(t.account_id)
            .select_from(auto_topups.join(accounts, accounts.c.id == t.account_id))
            .where(t.enabled.is_(True), t.pending_payment.is_(None), accounts.c.balance < t.threshold)
        )
        async with self.db.read() as conn:
            due = (await conn.execute(q)).scalars().all()
        started = 0
        for account_id in due:
            if await self._attempt(account_id):
                started += 1
        return started

    async def _attempt(self, account_id: str) -> bool:
        t = auto_topups.c
        payment_id = new_id("pay")
        async with self.db.write() as conn:
            claimed = (
                await conn.execute(
                    update(auto_topups)
                    .where(t.account_id == account_id, t.enabled.is_(True), t.pending_payment.is_(None))
                    .values(pending_payment=payment_id, attempts=t.attempts + 1, updated_at=utcnow())
                    .returning(t.attempts, t.customer, t.payment_method, t.pack_id)
                )
            ).first()
            if claimed is None:
                return False  # another process took it
            pack = next((p for p in self.config.packs if p.id == claimed.pack_id), None)
            if pack is None:
                log.error("automatic top-up of %s names pack %r, which is not for sale", account_id, claimed.pack_id)
                await conn.execute(update(auto_topups).where(t.account_id == account_id)
                                   .values(pending_payment=None, enabled=False))
                return False
            amount_minor = int(pack.price * 100)
            await conn.execute(insert(console_payments).values(
                id=payment_id, account_id=account_id, user_id=None, provider="stripe", provider_ref=None,
                pack_id=pack.id, credits=parse_credits(pack.credits), amount_minor=amount_minor,
                currency=pack.currency, status="pending", created_at=utcnow(), completed_at=None,
            ))
        params = {
            "amount": amount_minor, "currency": pack.currency, "customer": claimed.customer,
            "payment_method": claimed.payment_method, "off_session": True, "confirm": True,
            "description": f"Mesh automatic top-up ({pack.id})",
            "metadata": {"payment_id": payment_id, "account_id": account_id, "auto_topup": "1"},
        }
        import stripe

        http = self._stripe_http()
        try:
            intent = await stripe_client(self.config, http).v1.payment_intents.create_async(
                params,  # type: ignore[arg-type]  # the SDK's TypedDict, built as a plain dict
                {"idempotency_key": f"mesh-topup:{account_id}:{claimed.attempts}"},
            )
        except stripe.StripeError as exc:
            log.warning("automatic top-up of %s refused by Stripe: %s", account_id, exc)
            async with self.db.write() as conn:
                await conn.execute(update(console_payments).where(console_payments.c.id == payment_id)
                                   .values(status="failed", completed_at=utcnow()))
            await finish(self.db, payment_id, ok=False, max_failures=self.config.auto_topup.max_failures)
            return True
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated
        async with self.db.write() as conn:
            await conn.execute(
                update(console_payments)
                .where(console_payments.c.id == payment_id, console_payments.c.payment_intent.is_(None))
                .values(payment_intent=intent.id, provider_ref=intent.id)
            )
        log.info("automatic top-up of %s started: %s (%s)", account_id, intent.id, intent.status)
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _aiohttp_client() -> stripe.HTTPClient:
    import stripe

    return stripe.AIOHTTPClient()
