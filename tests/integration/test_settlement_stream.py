"""The settlement webhook stream through real gateways on SQLite and PostgreSQL: every
settled request reaches the operator's receiver in signed batches of at most ``batch_size``,
each record with its idempotency id and cost, at least once: while the receiver fails the
records wait (retried with backoff), survive the gateway being stopped, and are delivered
by the next process on the same database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

from .test_balance_alerts import SECRET, _verify


class Receiver:
    """The operator's endpoint: answers ``status``, keeps every attempt."""

    def __init__(self) -> None:
        self.status = 503
        self.attempts: list[tuple[int, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status = outer.status
                outer.attempts.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/billing"

    def delivered(self) -> dict[str, dict[str, Any]]:
        """Records of batches answered 2xx, by idempotency id (a repeat overwrites)."""
        out: dict[str, dict[str, Any]] = {}
        for status, headers, body in list(self.attempts):
            if status < 300:
                _verify(headers["mesh-signature"], body)
                for record in json.loads(body)["data"]:
                    out[record["id"]] = record
        return out


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp(f"stream-{request.param}")
    with temporary_database(request, request.param, work) as url:
        yield url, work


def _chat(gw: GatewayProcess, key: str, text: str) -> str:
    r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": "test-model", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return "req_" + str(r.json()["id"]).removeprefix("chatcmpl-")


def test_settlements_stream_in_signed_batches_at_least_once_across_a_restart(
    database: tuple[str, Path], engine: EngineProcess
) -> None:
    url, work = database
    receiver = Receiver()
    config = {
        "database": url,
        "models": engine_models(engine.base_url),
        "billing": {
            "usage_flush_interval": 0.05,
            "settlement_stream": {"url": receiver.url, "secret": SECRET, "interval": 0.2, "batch_size": 3,
                                  "max_backoff": 0.5, "claim_seconds": 1},
        },
    }
    (work / "first").mkdir()
    (work / "second").mkdir()
    try:
        with GatewayProcess(config, work / "first") as gw:
            admin = Admin(gw.url)
            account = admin.account("streamed", credits="1")
            key = admin.key(account)["key"]
            first = [_chat(gw, key, f"settle {i}") for i in range(5)]
            deadline = time.monotonic() + 10
            while len(receiver.attempts) < 2 and time.monotonic() < deadline:  # failing, and tried again
                time.sleep(0.05)
            assert len(receiver.attempts) >= 2 and receiver.delivered() == {}
            admin.close()
        # Stopped while the receiver failed: nothing was lost. The next process sends it all.
        receiver.status = 200
        with GatewayProcess(config, work / "second") as gw:
            admin = Admin(gw.url)
            later = [_chat(gw, key, f"after restart {i}") for i in range(2)]
            deadline = time.monotonic() + 15
            while set(receiver.delivered()) != {*first, *later} and time.monotonic() < deadline:
                time.sleep(0.05)
            delivered = receiver.delivered()
            assert set(delivered) == {*first, *later}
            spent = Decimal(1) - Decimal(admin.balance(account)["balance"])
            assert sum(Decimal(r["cost"]) for r in delivered.values()) == spent
            assert all(r["account_id"] == account and r["model"] == "test-model" for r in delivered.values())
            assert all(r["finish_reason"] == "stop" and r["status"] == "ok" for r in delivered.values())
            for _, _, body in receiver.attempts:
                batch = json.loads(body)
                assert batch["type"] == "settlement.batch" and 1 <= len(batch["data"]) <= 3
            # Delivered means gone from the outbox: nothing is sent again.
            sent = sum(1 for status, _, _ in receiver.attempts if status < 300)
            time.sleep(1.0)
            assert sum(1 for status, _, _ in receiver.attempts if status < 300) == sent
            admin.close()
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
