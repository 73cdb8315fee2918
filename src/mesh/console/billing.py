"""Billing pages: buy credit packs, the test provider's fake checkout, redeem codes, and
the Stripe webhook endpoint (see :mod:`mesh.console.payments` for the flow)."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.billing.money import parse_credits
from mesh.console.display import credits
from mesh.console.payments import Payment, PaymentError, Payments, WebhookRejected, pack_label
from mesh.console.web import PREFIX, Bound, Console, Page
from mesh.errors import MeshError

log = logging.getLogger("mesh.console.billing")

MAX_WEBHOOK_BYTES = 256 * 1024
HISTORY_KINDS = frozenset({"grant", "purchase", "redeem", "refund", "adjustment", "reversal"})


def payments_of(console: Console, bound: Bound) -> Payments:
    return Payments(bound.services.database, bound.services.ledger, console.config.payments, bound.secret,
                    audit=bound.services.audit)


def site_url(page: Page) -> str:
    configured = page.console.settings.server.public_url
    base = configured.rstrip("/").removesuffix("/v1") if configured else str(page.request.base_url).rstrip("/")
    return base


async def billing_page(page: Page) -> Response:
    account_id = page.account_id
    payments = payments_of(page.console, page.bound)
    balance, held = await page.services.ledger.balance(account_id)
    entries = [e for e in (await page.services.ledger.entries(account_id, limit=200))[0] if e.kind in HISTORY_KINDS]
    notice = None
    paid = page.request.query_params.get("paid")
    if paid:
        payment = await payments.get(paid, account_id)
        if payment is not None:
            notice = ("ok", "Payment received: your credits are in.") if payment.status == "paid" else (
                "info", "Payment received. Credits appear as soon as the payment provider confirms it.")
    cancelled = page.request.query_params.get("cancelled")
    if cancelled:
        payment = await payments.get(cancelled, account_id)
        if payment is not None and payment.status == "pending":
            await payments.cancel(payment)
            notice = ("info", "Checkout cancelled: nothing was charged.")
    packs = [(p, pack_label(p), parse_credits(p.credits)) for p in payments.config.packs] if payments.enabled else []
    return page.render(
        "billing.html",
        title="Billing",
        nav="billing",
        balance=balance,
        held=held,
        available=balance - held,
        packs=packs,
        provider=payments.config.provider,
        payments=await payments.recent(account_id),
        pack_names={p.id: pack_label(p) for p in payments.config.packs},
        entries=entries[:20],
        notice=notice,
    )


async def checkout(page: Page) -> Response:
    payments = payments_of(page.console, page.bound)
    try:
        url = await payments.checkout(
            page.account_id, page.user.id, page.user.email, page.field("pack"), site_url(page)
        )
    except PaymentError as err:
        return page.redirect(PREFIX + "/billing", str(err), "error")
    await page.audit("credits.checkout_started", page.field("pack"))
    return page.redirect(url)


async def _test_payment(page: Page) -> tuple[Payments, Payment] | Response:
    payments = payments_of(page.console, page.bound)
    payment = await payments.get(page.request.path_params["payment_id"], page.account_id)
    if payments.config.provider != "test" or payment is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such checkout.")
    return payments, payment


async def test_checkout_page(page: Page) -> Response:
    found = await _test_payment(page)
    if isinstance(found, Response):
        return found
    payments, payment = found
    pack = payments.pack(payment.pack_id)
    return page.render("checkout_test.html", title="Test checkout", nav="billing", payment=payment,
                       pack_name=pack_label(pack) if pack else payment.pack_id)


async def test_checkout_pay(page: Page) -> Response:
    found = await _test_payment(page)
    if isinstance(found, Response):
        return found
    payments, payment = found
    if payment.status not in ("pending", "paid"):
        return page.redirect(PREFIX + "/billing", "This checkout was cancelled; start a new one.", "error")
    payload, signature = payments.test_event(payment)
    outcome = await payments.handle_webhook(payload, signature)
    log.info("test checkout %s: %s", payment.id, outcome)
    return page.redirect(f"{PREFIX}/billing?paid={payment.id}")


async def test_checkout_cancel(page: Page) -> Response:
    found = await _test_payment(page)
    if isinstance(found, Response):
        return found
    payments, payment = found
    await payments.cancel(payment)
    return page.redirect(PREFIX + "/billing", "Checkout cancelled: nothing was charged.", "info")


async def redeem(page: Page) -> Response:
    code = page.field("code")
    try:
        entry = await page.services.redeem.redeem(page.account_id, code)
    except MeshError as err:
        return page.redirect(PREFIX + "/billing", err.message + ".", "error")
    await page.audit("credits.redeemed", None, amount=credits(entry.amount))
    return page.redirect(PREFIX + "/billing", f"Code redeemed: {credits(entry.amount)} credits added.")


def billing_routes(console: Console) -> list[Route]:
    async def stripe_webhook(request: Request) -> Response:
        payload = await request.body()
        if len(payload) > MAX_WEBHOOK_BYTES:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        bound = await console.bind(request)
        payments = payments_of(console, bound)
        if not payments.enabled:
            return JSONResponse({"error": "payments are not enabled"}, status_code=404)
        try:
            outcome = await payments.handle_webhook(payload, request.headers.get("stripe-signature"))
        except WebhookRejected as err:
            log.warning("rejected a webhook: %s", err)
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        return JSONResponse({"received": True, "outcome": outcome})

    r = console.route
    return [
        r("/billing", billing_page, need="billing"),
        r("/billing/checkout", checkout, methods=("POST",), need="billing"),
        r("/billing/checkout/{payment_id}", test_checkout_page, need="billing"),
        r("/billing/checkout/{payment_id}/pay", test_checkout_pay, methods=("POST",), need="billing"),
        r("/billing/checkout/{payment_id}/cancel", test_checkout_cancel, methods=("POST",), need="billing"),
        r("/billing/redeem", redeem, methods=("POST",), need="billing"),
        Route(PREFIX + "/webhooks/stripe", stripe_webhook, methods=["POST"]),
    ]
