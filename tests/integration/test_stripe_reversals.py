"""Stripe refunds and disputes through a real gateway on SQLite and PostgreSQL: a checkout
paid on the console (the test provider, credited by its signed webhook), then Stripe's
signed ``charge.refunded`` / ``charge.dispute.*`` events posted to the webhook endpoint.

A refund reverses once however often it is sent; a later, larger refund only the
difference (``amount_refunded`` is cumulative); a dispute lost stays reversed, one won gives
the credits back; a balance a reversal took below zero refuses requests with 402 until
credit comes back; unsigned events change nothing. The books fixture then checks the ledger
sums to the balance and ``accounts.reversed`` equals what the reversal rows took."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

WEBHOOK_SECRET = "whsec_reversal_tests_0123456789abcdef"
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_ACCOUNT = re.compile(r"<code>(acct_[0-9a-f]+)</code>")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shop(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp(f"reversals-{request.param}")
    with temporary_database(request, request.param, work) as url:
        config = {
            "database": url,
            "models": engine_models(engine.base_url),
            "billing": {"usage_flush_interval": 0.05},
            "console": {
                "secret": "s" * 48,
                "payments": {"provider": "test", "stripe_webhook_secret": WEBHOOK_SECRET},
                "signups_per_ip_per_hour": 10_000,
                "verify_email": False,  # these customers sign in at once; verification has its own tests
            },
        }
        with GatewayProcess(config, work) as gw, Admin(gw.url) as admin:
            yield gw, admin


class Customer:
    """A person on the console over real HTTP: signs up, buys a pack on the test checkout."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.http = httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30)
        self.email = f"buyer-{secrets.token_hex(6)}@example.com"

    def _token(self, path: str) -> str:
        page = self.http.get(path, follow_redirects=True)
        found = _CSRF.search(page.text)
        assert found, f"no CSRF token on {path}: {page.status_code}"
        return found.group(1)

    def post(self, path: str, form_page: str, **fields: str) -> httpx.Response:
        return self.http.post(path, data={**fields, "csrf_token": self._token(form_page)})

    def sign_up(self) -> str:
        r = self.post("/console/signup", "/console/signup", email=self.email, password=PASSWORD,
                      password_confirm=PASSWORD)
        assert r.status_code == 303, r.text
        r = self.post("/console/signin", "/console/signin", email=self.email, password=PASSWORD)
        assert r.status_code == 303, r.text
        found = _ACCOUNT.search(self.http.get("/console/settings").text)
        assert found
        return found.group(1)

    def buy(self, pack: str = "starter") -> str:
        """Check out and pay; returns the payment id."""
        r = self.post("/console/billing/checkout", "/console/billing", pack=pack)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/billing/checkout/pay_"), r.text
        payment = r.headers["location"].rsplit("/", 1)[1]
        r = self.post(f"/console/billing/checkout/{payment}/pay", f"/console/billing/checkout/{payment}")
        assert r.status_code == 303, r.text
        return payment

    def close(self) -> None:
        self.http.close()


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[bytes, str]:
    payload = json.dumps(event).encode()
    t = int(time.time())
    return payload, f"t={t},v1={stripe.WebhookSignature._compute_signature(f'{t}.{payload.decode()}', secret)}"


def send(gw: GatewayProcess, event: dict[str, Any], *, secret: str = WEBHOOK_SECRET) -> httpx.Response:
    payload, signature = signed(event, secret)
    return httpx.post(gw.url + "/console/webhooks/stripe", content=payload,
                      headers={"content-type": "application/json", "stripe-signature": signature})


def intent(payment: str) -> str:
    return "pi_mesh_test_" + payment.removeprefix("pay_")


def refunded(payment: str, amount_refunded: int) -> dict[str, Any]:
    return {"id": f"evt_{secrets.token_hex(8)}", "object": "event", "type": "charge.refunded", "data": {"object": {
        "id": "ch_" + payment, "object": "charge", "payment_intent": intent(payment), "amount": 500,
        "amount_refunded": amount_refunded, "currency": "usd", "refunded": amount_refunded == 500,
    }}}


def dispute(payment: str, dispute_id: str, kind: str, status: str, amount: int = 500) -> dict[str, Any]:
    return {"id": f"evt_{secrets.token_hex(8)}", "object": "event", "type": kind, "data": {"object": {
        "id": dispute_id, "object": "dispute", "charge": "ch_" + payment, "payment_intent": intent(payment),
        "amount": amount, "currency": "usd", "status": status,
    }}}


def balance(admin: Admin, account: str) -> Decimal:
    return Decimal(admin.balance(account)["balance"])


def ledger(admin: Admin, account: str) -> list[dict[str, Any]]:
    return admin.ledger(account)


def chat(gw: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                      timeout=30)


def test_refunds_reverse_once_and_only_the_difference(shop: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = shop
    buyer = Customer(gw)
    try:
        account = buyer.sign_up()
        payment = buyer.buy()
        assert balance(admin, account) == Decimal(5)
        key = admin.key(account)["key"]
        assert chat(gw, key).status_code == 200
        gw.admin_call("POST", "/admin/v1/flush")
        spent = Decimal(5) - balance(admin, account)
        assert spent > 0

        # A forged or unsigned refund changes nothing.
        assert send(gw, refunded(payment, 500), secret="whsec_wrong").status_code == 400
        r = httpx.post(gw.url + "/console/webhooks/stripe", content=json.dumps(refunded(payment, 500)).encode())
        assert r.status_code == 400
        assert balance(admin, account) == 5 - spent

        # $1 of $5 refunded, the event delivered eight times at once: 1 credit back, once.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: send(gw, refunded(payment, 100)), range(8)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert sorted(r.json()["outcome"] for r in answers) == ["duplicate"] * 7 + ["reversed"]
        assert balance(admin, account) == 4 - spent
        # Then $3 in all: 2 more; a late copy of the first changes nothing.
        assert send(gw, refunded(payment, 300)).json()["outcome"] == "reversed"
        assert send(gw, refunded(payment, 100)).json()["outcome"] == "duplicate"
        assert balance(admin, account) == 2 - spent
        # Then all of it: the balance goes below zero by what was spent, and no further.
        assert send(gw, refunded(payment, 500)).json()["outcome"] == "reversed"
        assert send(gw, refunded(payment, 500)).json()["outcome"] == "duplicate"
        assert balance(admin, account) == -spent
        reversals = [e for e in ledger(admin, account) if e["kind"] == "reversal"]
        assert sorted(Decimal(e["amount"]) for e in reversals) == [-2, -2, -1]

        # Below zero: refused before any engine sees it, with the protocol's 402.
        r = chat(gw, key)
        assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"
        # Nothing but a reversal goes below zero: a debit is refused, whatever its size.
        r = admin.client.post(f"/admin/v1/accounts/{account}/credits",
                              json={"amount": "-0.000001", "kind": "adjustment"})
        assert r.status_code == 402, r.text
        assert balance(admin, account) == -spent
        # Credit brought back above zero admits again.
        admin.grant(account, "1")
        assert balance(admin, account) == 1 - spent
        assert chat(gw, key).status_code == 200
    finally:
        buyer.close()


def test_disputes_lost_stay_reversed_and_won_come_back(shop: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = shop
    buyer = Customer(gw)
    try:
        account = buyer.sign_up()
        first = buyer.buy()
        second = buyer.buy()
        assert balance(admin, account) == 10

        # An inquiry moves no money.
        assert send(gw, dispute(first, "dp_inquiry", "charge.dispute.created", "warning_needs_response")).json()[
            "outcome"] == "ignored"
        # Disputed, twice over: 5 taken once; won: 5 back, once.
        for _ in range(2):
            send(gw, dispute(first, "dp_won", "charge.dispute.created", "needs_response"))
        assert balance(admin, account) == 5
        for _ in range(2):
            r = send(gw, dispute(first, "dp_won", "charge.dispute.closed", "won"))
        assert r.json()["outcome"] == "duplicate"
        assert balance(admin, account) == 10

        # Lost, without the created event ever arriving: taken then, once.
        assert send(gw, dispute(second, "dp_lost", "charge.dispute.closed", "lost")).json()["outcome"] == "reversed"
        assert send(gw, dispute(second, "dp_lost", "charge.dispute.created", "needs_response")).json()[
            "outcome"] == "duplicate"
        assert balance(admin, account) == 5
        # A refund of the disputed charge cannot take more than the checkout bought.
        assert send(gw, refunded(second, 500)).json()["outcome"] == "duplicate"
        assert balance(admin, account) == 5
        # An unknown charge is nobody's.
        assert send(gw, refunded("pay_unknown", 500)).json()["outcome"] == "ignored"
    finally:
        buyer.close()
