"""Automatic top-ups through a real gateway on SQLite and PostgreSQL, against a local fake of
Stripe's PaymentIntents API served over real HTTP (no network) and called through the
official SDK: an account under its threshold is charged on its saved card once, with an
idempotency key per attempt, and credited only by the signed ``payment_intent.succeeded``
webhook, once, although the fake sends it twice; a declined card is not credited, and
turns the top-up off after ``max_failures``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import stripe

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

WEBHOOK_SECRET = "whsec_topup_tests_0123456789abcdef"
API_KEY = "sk_test_mesh_fake_0123456789"


class FakeStripe:
    """POST /v1/payment_intents as Stripe answers it (idempotent replays included); a
    created PaymentIntent's ``payment_intent.succeeded`` is then posted, signed, twice to
    ``webhook_url``. Customers listed in ``declines`` get a card_error instead."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, str]]] = []  # (idempotency key, form)
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.declines: set[str] = set()
        self.webhook_url = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
                if self.path != "/v1/payment_intents" or self.headers.get("authorization") != f"Bearer {API_KEY}":
                    return self._send(404, {"error": {"type": "invalid_request_error", "message": "no"}})
                key = self.headers.get("idempotency-key") or ""
                if key in outer.answers:
                    status, raw = outer.answers[key]
                    return self._send(status, json.loads(raw), replayed=True)
                form = dict(parse_qsl(body))
                outer.created.append((key, form))
                if form["customer"] in outer.declines:
                    answer: dict[str, Any] = {"error": {"type": "card_error", "code": "card_declined",
                                                        "message": "Your card was declined."}}
                    status = 402
                else:
                    answer = {
                        "id": f"pi_fake_{len(outer.created)}", "object": "payment_intent",
                        "amount": int(form["amount"]), "amount_received": int(form["amount"]),
                        "currency": form["currency"], "customer": form["customer"],
                        "payment_method": form["payment_method"], "status": "succeeded",
                        "metadata": {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
                    }
                    status = 200
                    threading.Thread(target=outer.notify, args=(answer,), daemon=True).start()
                outer.answers[key] = (status, json.dumps(answer).encode())
                self._send(status, answer)

            def _send(self, status: int, data: dict[str, Any], replayed: bool = False) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.send_header("request-id", "req_fake")
                if replayed:
                    self.send_header("idempotent-replayed", "true")
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def notify(self, intent: dict[str, Any]) -> None:
        event = {"id": f"evt_{intent['id']}", "object": "event", "type": "payment_intent.succeeded",
                 "data": {"object": intent}}
        payload = json.dumps(event).encode()
        for _ in range(2):  # Stripe may deliver an event more than once
            t = int(time.time())
            signature = stripe.WebhookSignature._compute_signature(f"{t}.{payload.decode()}", WEBHOOK_SECRET)
            httpx.post(self.webhook_url, content=payload, timeout=10,
                       headers={"content-type": "application/json", "stripe-signature": f"t={t},v1={signature}"})


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shop(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin, FakeStripe]]:
    work = tmp_path_factory.mktemp(f"topup-{request.param}")
    fake = FakeStripe()
    try:
        with temporary_database(request, request.param, work) as url:
            config = {
                "database": url,
                "models": engine_models(engine.base_url),
                "billing": {"usage_flush_interval": 0.05},
                "console": {
                    "secret": "s" * 48,
                    "payments": {
                        "provider": "stripe", "stripe_secret_key": API_KEY, "stripe_webhook_secret": WEBHOOK_SECRET,
                        "stripe_api_base": fake.url, "auto_topup": {"interval": 0.2, "max_failures": 2},
                    },
                },
            }
            with GatewayProcess(config, work) as gw:
                fake.webhook_url = gw.url + "/console/webhooks/stripe"
                admin = Admin(gw.url)
                try:
                    yield gw, admin, fake
                finally:
                    admin.close()
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def _ledger(admin: Admin, account: str) -> list[dict[str, Any]]:
    return admin.ledger(account)


def _until(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_balance_under_the_threshold_is_topped_up_once(shop: tuple[GatewayProcess, Admin, FakeStripe]) -> None:
    _, admin, fake = shop
    account = admin.account("topped-up", credits="0.0003")
    r = admin.client.put(f"/admin/v1/accounts/{account}/auto_topup", json={
        "customer": "cus_topped", "payment_method": "pm_card_visa", "threshold": "0.0004", "pack": "starter"})
    assert r.status_code == 200, r.text
    _until(lambda: Decimal(admin.balance(account)["balance"]) > 1)
    assert Decimal(admin.balance(account)["balance"]) == Decimal("5.0003")
    mine = [(k, f) for k, f in fake.created if f["customer"] == "cus_topped"]
    assert len(mine) == 1
    key, form = mine[0]
    assert key == f"mesh-topup:{account}:1"
    assert (form["amount"], form["currency"], form["payment_method"]) == ("500", "usd", "pm_card_visa")
    assert (form["off_session"], form["confirm"], form["metadata[account_id]"]) == ("true", "true", account)
    # Credited once, by the webhook (sent twice); above the threshold now: no second charge.
    time.sleep(1.0)
    purchases = [e for e in _ledger(admin, account) if e["kind"] == "purchase"]
    assert [(e["amount"], e["idempotency_key"]) for e in purchases] == [("5.000000", "topup:pi_fake_" +
                                                                          str(fake.created.index(mine[0]) + 1))]
    assert len([f for _, f in fake.created if f["customer"] == "cus_topped"]) == 1
    state = admin.client.get(f"/admin/v1/accounts/{account}/auto_topup").json()
    assert (state["attempts"], state["failures"], state["pending_payment"], state["enabled"]) == (1, 0, None, True)


def test_a_declined_card_credits_nothing_and_turns_off(shop: tuple[GatewayProcess, Admin, FakeStripe]) -> None:
    _, admin, fake = shop
    fake.declines.add("cus_declined")
    account = admin.account("declined", credits="0.0001")
    r = admin.client.put(f"/admin/v1/accounts/{account}/auto_topup", json={
        "customer": "cus_declined", "payment_method": "pm_card_chargeDeclined", "threshold": "1", "pack": "starter"})
    assert r.status_code == 200, r.text
    _until(lambda: not admin.client.get(f"/admin/v1/accounts/{account}/auto_topup").json()["enabled"])
    state = admin.client.get(f"/admin/v1/accounts/{account}/auto_topup").json()
    assert (state["enabled"], state["attempts"], state["failures"], state["pending_payment"]) == (False, 2, 2, None)
    keys = [k for k, f in fake.created if f["customer"] == "cus_declined"]
    assert keys == [f"mesh-topup:{account}:1", f"mesh-topup:{account}:2"]  # a new key per attempt
    assert Decimal(admin.balance(account)["balance"]) == Decimal("0.0001")
    # Bad settings are refused in the API's error shape.
    for body in ({"customer": "nope", "payment_method": "pm_1", "threshold": "1", "pack": "starter"},
                 {"customer": "cus_1", "payment_method": "pm_1", "threshold": "1", "pack": "gold"}):
        assert admin.client.put(f"/admin/v1/accounts/{account}/auto_topup", json=body).status_code == 400
