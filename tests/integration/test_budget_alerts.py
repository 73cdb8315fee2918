"""Budget-threshold alerts through a real gateway on SQLite and PostgreSQL: a key's spend
reaching each configured share of its budget sends one signed webhook and one email (to a
real SMTP server on loopback) per crossing, not again while it stays there, and again in a
new budget period; the low-balance alert goes by both channels too."""

from __future__ import annotations

import email
import time
from collections.abc import Iterator
from decimal import Decimal
from email.message import Message
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from conftest import engine_models
from support.gateway import Admin, GatewayProcess, free_port
from support.postgres import temporary_database
from testengine.harness import EngineProcess

from .test_balance_alerts import SECRET, Receiver, _verify


class Mailbox:
    """An SMTP server's handler: keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def alerting(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin, Receiver, Mailbox]]:
    work = tmp_path_factory.mktemp(f"budget-alerts-{request.param}")
    receiver = Receiver()
    receiver.thread.start()
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with temporary_database(request, request.param, work) as url:
            config = {
                "database": url,
                "models": engine_models(engine.base_url),
                "billing": {
                    "usage_flush_interval": 0.05,
                    "alerts": {
                        "webhook_url": receiver.url, "webhook_secret": SECRET, "budget_thresholds": [50, 90],
                        "low_balance": "0.5",
                        "email_to": ["ops@example.com"], "email_from": "mesh@example.com",
                        "smtp": {"host": "127.0.0.1", "port": smtp.port, "tls": "none"}, "interval": 0.1,
                    },
                },
            }
            # The password reaches the process only through its environment, never a file or the database.
            with GatewayProcess(config, work, env={"MESH_BILLING__ALERTS__SMTP__PASSWORD": "unused"}) as gw:
                admin = Admin(gw.url)
                try:
                    yield gw, admin, receiver, mailbox
                finally:
                    admin.close()
    finally:
        smtp.stop()
        receiver.server.shutdown()
        receiver.server.server_close()


def _key_events(receiver: Receiver, account: str) -> list[dict[str, Any]]:
    return [e for e in receiver.events(account) if e["type"] == "key.budget_threshold"]


def _wait(what: Any, count: int, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while len(what()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return what()


def _spend_until_refused(gw: GatewayProcess, key: str) -> None:
    for i in range(200):
        r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "test-model", "messages": [{"role": "user", "content": f"spend {i}"}],
                             "max_tokens": 8})
        if r.status_code == 402:
            assert r.json()["error"]["code"] == "key_budget_exceeded"
            return
        assert r.status_code == 200, r.text
    raise AssertionError("the budget never ran out")


def test_budget_thresholds_alert_once_per_crossing(
    alerting: tuple[GatewayProcess, Admin, Receiver, Mailbox],
) -> None:
    gw, admin, receiver, mailbox = alerting
    account = admin.account("budgeted-alerts", credits="1")
    created = admin.key(account, name="ci", spend_limit="0.001")
    quiet = admin.key(account, name="unbudgeted")["key"]
    mine = lambda: [m for m in mailbox.messages if created["id"] in str(m.get_payload())]  # noqa: E731

    _spend_until_refused(gw, created["key"])
    events = _wait(lambda: _key_events(receiver, account), 2)
    assert [e["data"]["threshold_percent"] for e in events] == [50, 90]
    for e in events:
        assert e["data"]["key_id"] == created["id"] and e["data"]["limit"] == "0.001000"
        assert e["data"]["period"] == "none" and e["data"]["resets_at"] is None
    assert Decimal(events[0]["data"]["spent"]) >= Decimal("0.0005")
    assert Decimal(events[1]["data"]["spent"]) >= Decimal("0.0009")
    mails = _wait(mine, 2)
    assert sorted(str(m["Subject"]) for m in mails) == [
        "Mesh: key ci reached 50% of its budget", "Mesh: key ci reached 90% of its budget",
    ]
    assert all(m["To"] == "ops@example.com" and m["From"] == "mesh@example.com" for m in mails)
    # Still over both thresholds; more checks, spend on another key: nothing more.
    httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {quiet}"}, timeout=30,
               json={"model": "test-model", "messages": [{"role": "user", "content": "other"}]}).raise_for_status()
    time.sleep(1.0)
    assert len(_key_events(receiver, account)) == 2 and len(mine()) == 2

    # A new period (changing the period starts one now): spend crosses again, alerts again.
    r = admin.client.patch(f"/admin/v1/keys/{created['id']}", json={"budget_period": "daily"})
    r.raise_for_status()
    _spend_until_refused(gw, created["key"])
    events = _wait(lambda: _key_events(receiver, account), 4)
    assert [e["data"]["threshold_percent"] for e in events] == [50, 90, 50, 90]
    assert events[2]["data"]["period"] == "daily" and events[2]["data"]["resets_at"] is not None
    assert len(_wait(mine, 4)) == 4
    time.sleep(0.5)
    assert len(_key_events(receiver, account)) == 4
    assert [e for e in receiver.events(account) if e["type"] != "key.budget_threshold"] == []
    # The low-balance alert goes by the same channels: webhook and email.
    r = admin.client.post(f"/admin/v1/accounts/{account}/credits", json={"amount": "-0.9", "kind": "adjustment"})
    r.raise_for_status()
    low = _wait(lambda: [e for e in receiver.events(account) if e["type"] == "account.balance_low"], 1)
    assert len(low) == 1 and low[0]["data"]["threshold"] == "0.500000"
    mails = _wait(lambda: [m for m in mailbox.messages if account in str(m.get_payload())
                           and "low on credits" in str(m["Subject"])], 1)
    assert len(mails) == 1 and mails[0]["Subject"] == "Mesh: budgeted-alerts is low on credits"
    for headers, body in receiver.received:
        _verify(headers["mesh-signature"], body)
