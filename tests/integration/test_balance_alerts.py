"""Low-balance alerts through a real gateway on SQLite and PostgreSQL: the signed webhook
fires once per crossing (not for an account that was never above the threshold, not again
while it stays under, again after a top-up and a new fall) and carries a valid signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

SECRET = "whsec-test-" + "x" * 24


class Receiver:
    """An operator's webhook endpoint on a free loopback port, keeping what it received."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mesh"

    def events(self, account: str) -> list[dict[str, Any]]:
        out = []
        for headers, body in list(self.received):
            event = json.loads(body)
            if event["data"]["account_id"] == account:
                _verify(headers["mesh-signature"], body)
                out.append(event)
        return out


def _verify(header: str, body: bytes) -> None:
    parts = dict(p.split("=", 1) for p in header.split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected), "bad signature"
    assert abs(time.time() - int(parts["t"])) < 300


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def alerting(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin, Receiver]]:
    work = tmp_path_factory.mktemp(f"alerts-{request.param}")
    receiver = Receiver()
    receiver.thread.start()
    try:
        with temporary_database(request, request.param, work) as url:
            config = {
                "database": url,
                "models": engine_models(engine.base_url),
                "billing": {
                    "usage_flush_interval": 0.05,
                    "alerts": {"webhook_url": receiver.url, "webhook_secret": SECRET, "low_balance": "0.0001",
                               "interval": 0.1},
                },
            }
            with GatewayProcess(config, work) as gw:
                admin = Admin(gw.url)
                try:
                    yield gw, admin, receiver
                finally:
                    admin.close()
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def _wait_for(receiver: Receiver, account: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(receiver.events(account)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return receiver.events(account)


def test_low_balance_webhook_fires_once_per_crossing(alerting: tuple[GatewayProcess, Admin, Receiver]) -> None:
    gw, admin, receiver = alerting
    empty = admin.account("never-funded", credits=None)
    account = admin.account("alerted", credits="0.000150")
    key = admin.key(account)["key"]
    time.sleep(0.5)  # a few checks: the funded account is armed, the empty one is not
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        while Decimal(admin.balance(account)["balance"]) >= Decimal("0.0001"):
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "spend"}])
        first = _wait_for(receiver, account, 1)
        assert len(first) == 1
        event = first[0]
        assert event["type"] == "account.balance_low" and event["data"]["threshold"] == "0.000100"
        assert Decimal(event["data"]["balance"]) < Decimal("0.0001")
        # Still under: more spend, more checks, no second alert.
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "more"}])
        time.sleep(1.0)
        assert len(receiver.events(account)) == 1
    # A top-up re-arms; a fall under the threshold again alerts again, once.
    admin.grant(account, "1")
    time.sleep(0.5)
    assert len(receiver.events(account)) == 1
    r = admin.client.post(f"/admin/v1/accounts/{account}/credits", json={"amount": "-1", "kind": "adjustment"})
    r.raise_for_status()
    assert len(_wait_for(receiver, account, 2)) == 2
    time.sleep(0.5)
    assert len(receiver.events(account)) == 2
    assert receiver.events(empty) == []
