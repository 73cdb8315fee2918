"""Buying credits: checkout, then crediting by a verified webhook only.

Flow, for both providers::

    POST /console/billing/checkout {pack}  → console_payments row (pending)
        stripe: a Stripe Checkout Session (official SDK, async) → redirect to Stripe
        test:   redirect to the fake checkout page /console/billing/checkout/{id}
    POST /console/webhooks/stripe          ← Stripe, signed with the webhook secret
        test:   the fake page's "Pay" builds the same event, signs it the same way,
                and hands it to the same handler (no network)
    handle_webhook: stripe.Webhook.construct_event checks the signature and its age;
        checkout.session.completed (paid) → Ledger.grant(kind="purchase",
        idempotency_key="checkout:<session id>"), so a replayed or duplicated webhook
        credits once. The amount credited is the one recorded at checkout, never one
        read from the browser. The session's PaymentIntent is recorded with it.
    Money going back (signed the same way, tied to the checkout by its PaymentIntent):
        charge.refunded → Ledger.reverse: Stripe's amount_refunded is cumulative, so the
            key is "reversal:<payment>:refund:<amount_refunded>" and only what the rows so
            far do not cover is taken (the same event twice, or an older one, takes nothing);
        charge.dispute.created → reverse the disputed part ("...:dispute:<dispute id>";
            an inquiry, status warning_*, moves no money and is ignored);
        charge.dispute.closed → won: Ledger.reinstate gives it back ("...:dispute-won:<id>"; won
            before created arrived: a zero row under the dispute's key, so the late one takes nothing);
            lost: stays reversed (reversed now if the created event never came).
    A checkout's reversals never exceed the credits it bought.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update

from mesh.accounts.audit_log import Actor, AuditLog
from mesh.accounts.keys import new_id
from mesh.billing.ledger import Ledger
from mesh.billing.money import MicroCredits, format_credits, parse_credits
from mesh.config import CreditPack, PaymentsConfig
from mesh.console import topups
from mesh.console.display import credits as show_credits
from mesh.console.secrets import derive
from mesh.console.tables import console_payments
from mesh.store import Database, utcnow

# The Stripe SDK (and the requests library it brings) is imported where a payment needs it:
# a gateway starts without it.
if TYPE_CHECKING:
    import stripe

log = logging.getLogger("mesh.console.payments")

PAID_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
REVERSAL_EVENTS = ("charge.refunded", "charge.dispute.created", "charge.dispute.closed")
TOPUP_EVENTS = ("payment_intent.succeeded", "payment_intent.payment_failed")
FAILED_EVENTS = ("checkout.session.expired", "checkout.session.async_payment_failed")
TEST_SESSION_PREFIX = "cs_mesh_test_"
TEST_INTENT_PREFIX = "pi_mesh_test_"
_DISPUTE_ID = re.compile(r"d[pu]_[A-Za-z0-9_]{1,100}")


class PaymentError(Exception):
    """Checkout could not start; the message is safe to show."""


class WebhookRejected(Exception):
    """The webhook is not authentic (bad signature, too old) or not parseable: answer 400."""


@dataclass(frozen=True, slots=True)
class Payment:
    id: str
    account_id: str
    provider: str
    provider_ref: str | None
    pack_id: str
    credits: MicroCredits
    amount_minor: int
    currency: str
    status: str
    created_at: datetime
    completed_at: datetime | None
    payment_intent: str | None = None


def _payment(row: Any) -> Payment:
    return Payment(
        id=row.id,
        account_id=row.account_id,
        provider=row.provider,
        provider_ref=row.provider_ref,
        pack_id=row.pack_id,
        credits=MicroCredits(row.credits),
        amount_minor=row.amount_minor,
        currency=row.currency,
        status=row.status,
        created_at=row.created_at,
        completed_at=row.completed_at,
        payment_intent=row.payment_intent,
    )


def pack_label(pack: CreditPack) -> str:
    return pack.name or f"{show_credits(parse_credits(pack.credits))} credits"


def sign_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``payload``, computed exactly as Stripe does."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class Payments:
    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        config: PaymentsConfig,
        secret: bytes,
        stripe_http: Callable[[], stripe.HTTPClient] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit
        self.db = db
        self.ledger = ledger
        self.config = config
        self._secret = secret
        self._stripe_http = stripe_http or _aiohttp_client

    @property
    def enabled(self) -> bool:
        return self.config.provider != "none"

    def pack(self, pack_id: str) -> CreditPack | None:
        return next((p for p in self.config.packs if p.id == pack_id), None)

    def webhook_secret(self) -> str:
        configured = self.config.stripe_webhook_secret
        if configured is not None:
            return configured.get_secret_value()
        return "whsec_" + derive(self._secret, "test-webhook").hex()

    async def checkout(self, account_id: str, user_id: str, email: str, pack_id: str, site: str) -> str:
        """Record a pending payment and return where to send the browser to pay."""
        pack = self.pack(pack_id)
        if not self.enabled or pack is None:
            raise PaymentError("That credit pack is not for sale.")
        payment_id = new_id("pay")
        amount_minor = int(pack.price * 100)
        credits = parse_credits(pack.credits)
        row = {
            "id": payment_id, "account_id": account_id, "user_id": user_id, "provider": self.config.provider,
            "provider_ref": None, "pack_id": pack.id, "credits": credits, "amount_minor": amount_minor,
            "currency": pack.currency, "status": "pending", "created_at": utcnow(), "completed_at": None,
        }
        if self.config.provider == "test":
            row["provider_ref"] = TEST_SESSION_PREFIX + payment_id.removeprefix("pay_")
            async with self.db.write() as conn:
                await conn.execute(insert(console_payments).values(**row))
            return f"/console/billing/checkout/{payment_id}"
        async with self.db.write() as conn:
            await conn.execute(insert(console_payments).values(**row))
        try:
            session = await self._stripe_session(row, pack, email, site)
        except PaymentError:
            await self._set_status(payment_id, "failed", only_pending=True)
            raise
        async with self.db.write() as conn:
            await conn.execute(
                update(console_payments).where(console_payments.c.id == payment_id).values(provider_ref=session["id"])
            )
        url: str = session["url"]
        return url

    async def _stripe_session(self, row: dict[str, Any], pack: CreditPack, email: str, site: str) -> Any:
        import stripe

        key = self.config.stripe_secret_key
        assert key is not None
        http = self._stripe_http()
        client = stripe.StripeClient(key.get_secret_value(), http_client=http)
        params: Any = {
            "mode": "payment",
            "line_items": [{
                "quantity": 1,
                "price_data": {
                    "currency": pack.currency,
                    "unit_amount": row["amount_minor"],
                    "product_data": {"name": f"Mesh: {pack_label(pack)}"},
                },
            }],
            "success_url": f"{site}/console/billing?paid={row['id']}",
            "cancel_url": f"{site}/console/billing?cancelled={row['id']}",
            "client_reference_id": row["account_id"],
            "customer_email": email,
            "metadata": {"payment_id": row["id"], "account_id": row["account_id"]},
        }
        try:
            return await client.v1.checkout.sessions.create_async(params)
        except stripe.StripeError as exc:
            log.error("Stripe refused the checkout session: %s", exc)
            raise PaymentError("The payment provider is not reachable right now. Please try again.") from None
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated

    async def get(self, payment_id: str, account_id: str | None = None) -> Payment | None:
        q = select(console_payments).where(console_payments.c.id == payment_id)
        if account_id is not None:
            q = q.where(console_payments.c.account_id == account_id)
        async with self.db.read() as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else _payment(row)

    async def recent(self, account_id: str, limit: int = 10) -> list[Payment]:
        q = (
            select(console_payments)
            .where(console_payments.c.account_id == account_id)
            .order_by(console_payments.c.created_at.desc())
            .limit(limit)
        )
        async with self.db.read() as conn:
            return [_payment(r) for r in await conn.execute(q)]

    async def cancel(self, payment: Payment) -> None:
        await self._set_status(payment.id, "cancelled", only_pending=True)

    async def _set_status(self, payment_id: str, status: str, *, only_pending: bool = False) -> None:
        stmt = update(console_payments).where(console_payments.c.id == payment_id)
        if only_pending:
            stmt = stmt.where(console_payments.c.status == "pending")
        async with self.db.write() as conn:
            await conn.execute(stmt.values(status=status, completed_at=utcnow()))

    def test_event(self, payment: Payment) -> tuple[bytes, str]:
        """The signed ``checkout.session.completed`` event that Stripe would send for it."""
        event = {
            "id": "evt_mesh_test_" + payment.id.removeprefix("pay_"),
            "object": "event",
            "type": "checkout.session.completed",
            "data": {"object": {
                "id": payment.provider_ref,
                "object": "checkout.session",
                "payment_intent": TEST_INTENT_PREFIX + payment.id.removeprefix("pay_"),
                "payment_status": "paid",
                "amount_total": payment.amount_minor,
                "currency": payment.currency,
                "client_reference_id": payment.account_id,
                "metadata": {"payment_id": payment.id, "account_id": payment.account_id},
            }},
        }
        payload = json.dumps(event).encode()
        return payload, sign_payload(payload, self.webhook_secret())

    async def handle_webhook(self, payload: bytes, signature: str | None) -> str:
        """Verify and apply one webhook; returns what happened (``credited``, ``duplicate``,
        ``ignored``, ``cancelled``). Raises :class:`WebhookRejected` if it is not authentic."""
        import stripe

        try:
            stripe.Webhook.construct_event(payload, signature or "", self.webhook_secret())
            event = json.loads(payload)  # the verified bytes, read as plain JSON
            kind = str(event["type"])
            obj = event["data"]["object"]
            if not isinstance(obj, dict):
                raise ValueError("data.object is not an object")
        except (stripe.SignatureVerificationError, ValueError, KeyError, TypeError) as exc:
            raise WebhookRejected(str(exc) or "invalid signature") from None
        if kind in REVERSAL_EVENTS:
            return await self._reversal(kind, obj)
        if kind in TOPUP_EVENTS:
            return await self._topup(kind, obj)
        session_id = str(obj.get("id") or "")
        payment_id = str((obj.get("metadata") or {}).get("payment_id") or "")
        payment = await self.get(payment_id) if payment_id else None
        if payment is None or payment.provider_ref != session_id:
            log.warning("webhook %s for unknown checkout session %s ignored", kind, session_id)
            return "ignored"
        if kind in FAILED_EVENTS:
            await self._set_status(payment.id, "failed" if "failed" in kind else "expired", only_pending=True)
            return "cancelled"
        if kind not in PAID_EVENTS or obj.get("payment_status") not in ("paid", "no_payment_required"):
            return "ignored"
        if obj.get("amount_total") != payment.amount_minor or obj.get("currency") != payment.currency:
            log.error("checkout session %s paid %s %s, expected %s %s: not credited", session_id,
                      obj.get("amount_total"), obj.get("currency"), payment.amount_minor, payment.currency)
            return "ignored"
        await self.ledger.grant(
            payment.account_id, payment.credits, idempotency_key=f"checkout:{session_id}", kind="purchase",
            memo=f"{payment.provider} checkout {payment.id}",
        )
        await self._set_status(payment.id, "paid")
        intent = obj.get("payment_intent")
        if isinstance(intent, str) and intent and payment.payment_intent is None:
            async with self.db.write() as conn:
                await conn.execute(
                    update(console_payments).where(console_payments.c.id == payment.id).values(payment_intent=intent)
                )
        if payment.status == "paid":
            return "duplicate"
        if self.audit is not None:
            actor = Actor(name=f"{payment.provider} checkout", id=None, ip=None, request_id=session_id)
            await self.audit.record(actor, "credits.purchased", account_id=payment.account_id, target=payment.id,
                                    detail={"credits": format_credits(payment.credits), "pack": payment.pack_id})
        return "credited"

    async def _topup(self, kind: str, obj: dict[str, Any]) -> str:
        """An automatic top-up's PaymentIntent (console/topups.py) succeeded or failed: credit
        it once (ledger key ``topup:<payment intent>``) or end the attempt. Returns
        ``credited``, ``duplicate``, ``failed`` or ``ignored`` (other PaymentIntents, e.g.
        a checkout's, which is credited by its session's event)."""
        meta = obj.get("metadata") or {}
        intent = str(obj.get("id") or "")
        if not isinstance(meta, dict) or meta.get("auto_topup") != "1" or not intent.startswith("pi_"):
            return "ignored"
        payment = await self.get(str(meta.get("payment_id") or ""))
        if (
            payment is None or payment.provider != "stripe" or payment.account_id != meta.get("account_id")
            or payment.payment_intent not in (None, intent)
        ):
            log.warning("%s for unknown top-up %s ignored", kind, intent)
            return "ignored"
        if kind == "payment_intent.payment_failed":
            if payment.status == "pending":
                await self._set_status(payment.id, "failed", only_pending=True)
                await topups.finish(self.db, payment.id, ok=False, max_failures=self.config.auto_topup.max_failures)
                return "failed"
            return "duplicate"
        if obj.get("amount_received", obj.get("amount")) != payment.amount_minor or obj.get("currency") != \
                payment.currency:
            log.error("top-up %s paid %s %s, expected %s %s: not credited", intent, obj.get("amount_received"),
                      obj.get("currency"), payment.amount_minor, payment.currency)
            return "ignored"
        await self.ledger.grant(
            payment.account_id, payment.credits, idempotency_key=f"topup:{intent}", kind="purchase",
            memo=f"automatic top-up {payment.id}",
        )
        async with self.db.write() as conn:
            await conn.execute(
                update(console_payments).where(console_payments.c.id == payment.id)
                .values(status="paid", completed_at=utcnow(), payment_intent=intent, provider_ref=intent)
            )
        await topups.finish(self.db, payment.id, ok=True, max_failures=self.config.auto_topup.max_failures)
        return "duplicate" if payment.status == "paid" else "credited"

    async def _reversal(self, kind: str, obj: dict[str, Any]) -> str:
        """A refund or dispute of a checkout's charge: take its credits back (or, for a
        dispute won, give them back). Returns ``reversed``, ``reinstated``, ``duplicate``
        or ``ignored``."""
        intent = obj.get("payment_intent")
        payment = None
        if isinstance(intent, str) and intent:
            async with self.db.read() as conn:
                row = (
                    await conn.execute(select(console_payments).where(console_payments.c.payment_intent == intent))
                ).first()
            payment = None if row is None else _payment(row)
        if payment is None or payment.amount_minor <= 0:
            log.warning("webhook %s for unknown payment intent %s ignored", kind, intent)
            return "ignored"
        if obj.get("currency") != payment.currency:
            log.error("%s for payment %s in %s, paid in %s: ignored", kind, payment.id, obj.get("currency"),
                      payment.currency)
            return "ignored"
        scope = f"reversal:{payment.id}:"

        def share(minor: Any) -> int:
            """The credits ``minor`` units of the payment bought (rounded down)."""
            if isinstance(minor, bool) or not isinstance(minor, int) or minor < 0:
                raise WebhookRejected(f"{kind}: amount is not a whole number of minor units")
            return payment.credits * min(minor, payment.amount_minor) // payment.amount_minor

        memo = f"{kind} of {payment.provider} checkout {payment.id}"
        if kind == "charge.refunded":
            refunded: Any = obj.get("amount_refunded")
            target = share(refunded)  # checks it is a whole number; the key holds no more than was paid
            entry = await self.ledger.reverse(
                payment.account_id, f"{scope}refund:{min(refunded, payment.amount_minor)}", target=target,
                counted=f"{scope}refund:",
                ceiling=payment.credits, scope=scope, memo=memo,
            )
            await self._audit_reversal(entry is not None, "credits.refunded", payment, kind)
            return "duplicate" if entry is None else "reversed"
        dispute = str(obj.get("id") or "")
        status = str(obj.get("status") or "")
        if not _DISPUTE_ID.fullmatch(dispute):  # and short enough for a ledger key
            raise WebhookRejected(f"{kind}: not a dispute id")
        taken = f"{scope}dispute:{dispute}"
        if status.startswith("warning_"):
            return "ignored"  # an inquiry: Stripe moves no money
        if kind == "charge.dispute.closed" and status == "won":
            back = await self.ledger.reinstate(payment.account_id, f"{scope}dispute-won:{dispute}", of=taken,
                                               memo=memo + " (won)")
            await self._audit_reversal(back is not None, "credits.reinstated", payment, kind)
            return "duplicate" if back is None else "reinstated"
        if kind == "charge.dispute.closed" and status != "lost":
            return "ignored"
        entry = await self.ledger.reverse(
            payment.account_id, taken, target=share(obj.get("amount")), counted=taken, ceiling=payment.credits,
            scope=scope, memo=memo,
        )
        await self._audit_reversal(entry is not None, "credits.disputed", payment, kind)
        return "duplicate" if entry is None else "reversed"

    async def _audit_reversal(self, moved: bool, action: str, payment: Any, kind: str) -> None:
        """A refund or dispute that moved credit, in the organization's audit log."""
        if moved and self.audit is not None:
            actor = Actor(name=f"{payment.provider} webhook", id=None, ip=None, request_id=None)
            await self.audit.record(actor, action, account_id=payment.account_id, target=payment.id,
                                    detail={"event": kind})


def _aiohttp_client() -> stripe.HTTPClient:
    import stripe

    return stripe.AIOHTTPClient()
