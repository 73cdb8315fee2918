"""Buying credits: checkout, the signed webhook (verified, idempotent), the test provider,
Stripe Checkout through the official SDK (against a fake HTTP client), redeem codes."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import stripe
from pydantic import SecretStr
from sqlalchemy import select
from starlette.applications import Starlette

from mesh.billing.money import parse_credits
from mesh.config import PaymentsConfig
from mesh.console.payments import PaymentError, Payments
from mesh.store.tables import ledger

from .conftest import WEBHOOK_SECRET, Browser, account_of

STARTER_MICROS = 5_000_000


def stripe_signature(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """The Stripe-Signature header, computed with stripe's own helper, as Stripe signs."""
    t = int(time.time()) if timestamp is None else timestamp
    v1 = stripe.WebhookSignature._compute_signature(f"{t}.{payload.decode()}", secret)
    return f"t={t},v1={v1}"


def checkout_event(payment_id: str, account_id: str, *, session_id: str | None = None, kind: str =
                   "checkout.session.completed", amount: int = 500, status: str = "paid") -> bytes:
    return json.dumps({
        "id": f"evt_{time.monotonic_ns()}",
        "object": "event",
        "type": kind,
        "data": {"object": {
            "id": session_id or "cs_mesh_test_" + payment_id.removeprefix("pay_"),
            "object": "checkout.session",
            "payment_status": status,
            "amount_total": amount,
            "currency": "usd",
            "metadata": {"payment_id": payment_id, "account_id": account_id},
        }},
    }).encode()


async def start_checkout(b: Browser, pack: str = "starter") -> str:
    r = await b.post("/console/billing/checkout", {"pack": pack}, token_from="/console/billing")
    assert r.status_code == 303, r.text
    location: str = r.headers["location"]
    assert location.startswith("/console/billing/checkout/pay_")
    return location.rsplit("/", 1)[1]


async def post_webhook(app: Starlette, payload: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["stripe-signature"] = signature
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        return await c.post("/console/webhooks/stripe", content=payload, headers=headers)


async def balance(app: Starlette, account_id: str) -> int:
    return int((await app.state.gateway.services.ledger.balance(account_id))[0])


async def test_signed_webhook_credits_once(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    payment_id = await start_checkout(customer)
    payload = checkout_event(payment_id, account_id)
    first = await post_webhook(console_app, payload, stripe_signature(payload))
    assert first.status_code == 200 and first.json()["outcome"] == "credited"
    replay = await post_webhook(console_app, payload, stripe_signature(payload))
    assert replay.status_code == 200 and replay.json()["outcome"] == "duplicate"
    again = checkout_event(payment_id, account_id, kind="checkout.session.async_payment_succeeded")
    assert (await post_webhook(console_app, again, stripe_signature(again))).status_code == 200
    assert await balance(console_app, account_id) == STARTER_MICROS
    async with console_app.state.gateway.services.database.read() as conn:
        rows = (await conn.execute(select(ledger).where(ledger.c.account_id == account_id))).all()
    assert [(r.kind, r.amount, r.idempotency_key) for r in rows] == [
        ("purchase", STARTER_MICROS, "checkout:cs_mesh_test_" + payment_id.removeprefix("pay_"))
    ]
    page = await customer.get(f"/console/billing?paid={payment_id}")
    assert "your credits are in" in page.text and "5.00" in page.text


@pytest.mark.parametrize("tamper", ["wrong secret", "changed payload", "no header", "old timestamp", "garbage"])
async def test_webhook_without_a_valid_signature_is_rejected(console_app: Starlette, customer: Browser,
                                                             tamper: str) -> None:
    account_id = await account_of(customer)
    payment_id = await start_checkout(customer)
    payload = checkout_event(payment_id, account_id)
    signature: str | None = stripe_signature(payload)
    if tamper == "wrong secret":
        signature = stripe_signature(payload, secret="whsec_someone_else")
    elif tamper == "changed payload":
        payload = payload.replace(b'"amount_total": 500', b'"amount_total": 50000')
    elif tamper == "no header":
        signature = None
    elif tamper == "old timestamp":
        signature = stripe_signature(payload, timestamp=int(time.time()) - 3600)
    else:
        signature = "t=1,v1=deadbeef"
    r = await post_webhook(console_app, payload, signature)
    assert r.status_code == 400
    assert await balance(console_app, account_id) == 0


async def test_webhook_for_an_unknown_session_or_wrong_amount_credits_nothing(
    console_app: Starlette, customer: Browser
) -> None:
    account_id = await account_of(customer)
    payment_id = await start_checkout(customer)
    for payload in (
        checkout_event("pay_000000000000000000000000", account_id),
        checkout_event(payment_id, account_id, session_id="cs_live_not_ours"),
        checkout_event(payment_id, account_id, amount=1),
        checkout_event(payment_id, account_id, status="unpaid"),
    ):
        r = await post_webhook(console_app, payload, stripe_signature(payload))
        assert r.status_code == 200 and r.json()["outcome"] == "ignored"
    assert await balance(console_app, account_id) == 0


async def test_test_provider_checkout_pays_once(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    payment_id = await start_checkout(customer, "builder")
    page = await customer.get(f"/console/billing/checkout/{payment_id}")
    assert page.status_code == 200 and "Test payment provider" in page.text and "20.00 USD" in page.text
    paid = await customer.post(f"/console/billing/checkout/{payment_id}/pay", token_from="/console/billing")
    assert paid.status_code == 303 and paid.headers["location"] == f"/console/billing?paid={payment_id}"
    await customer.post(f"/console/billing/checkout/{payment_id}/pay", token_from="/console/billing")
    assert await balance(console_app, account_id) == 20_000_000
    billing = await customer.get("/console/billing")
    assert "purchase" in billing.text and "paid" in billing.text


async def test_cancelled_checkout_cannot_be_paid(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    payment_id = await start_checkout(customer)
    r = await customer.post(f"/console/billing/checkout/{payment_id}/cancel", token_from="/console/billing")
    assert r.status_code == 303
    r = await customer.post(f"/console/billing/checkout/{payment_id}/pay", token_from="/console/billing")
    assert r.status_code == 303
    assert await balance(console_app, account_id) == 0
    assert "cancelled" in (await customer.get("/console/billing")).text


async def test_unknown_pack_is_not_for_sale(console_app: Starlette, customer: Browser) -> None:
    r = await customer.post("/console/billing/checkout", {"pack": "free-money"}, token_from="/console/billing")
    assert r.status_code == 303 and r.headers["location"] == "/console/billing"
    assert "not for sale" in (await customer.get("/console/billing")).text


async def test_redeem_a_code(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    [minted] = await console_app.state.gateway.services.redeem.mint(parse_credits("7.5"))
    r = await customer.post("/console/billing/redeem", {"code": minted.code.lower()}, token_from="/console/billing")
    assert r.status_code == 303
    page = await customer.get("/console/billing")
    assert "Code redeemed: 7.50 credits added." in page.text
    await customer.post("/console/billing/redeem", {"code": minted.code}, token_from="/console/billing")
    assert "Invalid or already redeemed code" in (await customer.get("/console/billing")).text
    assert await balance(console_app, account_id) == 7_500_000


class FakeStripe(stripe.HTTPClient):
    """Answers the Checkout Session call as Stripe's API does; remembers what was sent."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, Any]] = []

    async def request_async(self, method: str, url: str, headers: Any, post_data: Any = None, *,
                            _usage: Any = None) -> tuple[str, int, dict[str, str]]:
        self.calls.append((method, url, post_data))
        body = {"id": "cs_test_a1b2c3", "object": "checkout.session",
                "url": "https://checkout.stripe.com/c/pay/cs_test_a1b2c3"}
        return json.dumps(body), 200, {}

    async def close_async(self) -> None:
        return None

    def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the console must use the async client")

    def close(self) -> None:
        return None


async def test_stripe_checkout_session_and_its_webhook(console_app: Starlette, customer: Browser) -> None:
    services = console_app.state.gateway.services
    account_id = await account_of(customer)
    fake = FakeStripe()
    config = PaymentsConfig(provider="stripe", stripe_secret_key=SecretStr("sk_test_fake"),
                            stripe_webhook_secret=SecretStr(WEBHOOK_SECRET))
    payments = Payments(services.database, services.ledger, config, b"s" * 32, stripe_http=lambda: fake)
    url = await payments.checkout(account_id, "user_x", customer.email, "builder", "https://mesh.example")
    assert url == "https://checkout.stripe.com/c/pay/cs_test_a1b2c3"
    [(method, endpoint, sent)] = fake.calls
    assert method == "post" and endpoint.endswith("/v1/checkout/sessions")
    assert "line_items[0][price_data][unit_amount]=2000" in sent
    assert "line_items[0][price_data][currency]=usd" in sent
    assert "mode=payment" in sent and "metadata[payment_id]=pay_" in sent
    assert "success_url=https://mesh.example/console/billing?paid=pay_" in sent.replace("%3A", ":").replace(
        "%2F", "/").replace("%3F", "?").replace("%3D", "=")
    [payment] = await payments.recent(account_id)
    assert payment.provider_ref == "cs_test_a1b2c3" and payment.status == "pending"
    payload = checkout_event(payment.id, account_id, session_id="cs_test_a1b2c3", amount=2000)
    assert await payments.handle_webhook(payload, stripe_signature(payload)) == "credited"
    assert await payments.handle_webhook(payload, stripe_signature(payload)) == "duplicate"
    assert await balance(console_app, account_id) == 20_000_000


async def test_no_provider_means_no_checkout(console_app: Starlette) -> None:
    services = console_app.state.gateway.services
    payments = Payments(services.database, services.ledger, PaymentsConfig(), b"s" * 32)
    with pytest.raises(PaymentError):
        await payments.checkout("acct_x", "user_x", "x@example.com", "starter", "https://mesh.example")


class DownStripe(FakeStripe):
    async def request_async(self, method: str, url: str, headers: Any, post_data: Any = None, *,
                            _usage: Any = None) -> tuple[str, int, dict[str, str]]:
        body = {"error": {"type": "api_error", "message": "Stripe is having a bad day"}}
        return json.dumps(body), 500, {}


async def test_stripe_failure_shows_a_message_and_credits_nothing(console_app: Starlette, customer: Browser) -> None:
    services = console_app.state.gateway.services
    account_id = await account_of(customer)
    config = PaymentsConfig(provider="stripe", stripe_secret_key=SecretStr("sk_test_fake"),
                            stripe_webhook_secret=SecretStr(WEBHOOK_SECRET))
    payments = Payments(services.database, services.ledger, config, b"s" * 32, stripe_http=DownStripe)
    with pytest.raises(PaymentError, match="not reachable"):
        await payments.checkout(account_id, "user_x", customer.email, "starter", "https://mesh.example")
    [payment] = await payments.recent(account_id)
    assert payment.status == "failed" and payment.provider_ref is None
