"""Failures no request sees, made visible: each has a metric on a live gateway's /metrics and
one log line per occurrence (with the request id where there is one)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from support.tcpproxy import TcpProxy
from testengine.harness import EngineProcess

TOKEN = "worker-token-scoped-0123456789abcd"


class Setup:
    def __init__(self, gw: GatewayProcess, engine: TcpProxy, key: str) -> None:
        self.gw, self.engine, self.key = gw, engine, key

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if m is None or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.gw.log().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def setup(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work: Path = tmp_path_factory.mktemp("silent")
    parts = urlsplit(engine.base_url)
    assert parts.hostname and parts.port
    with TcpProxy(parts.hostname, parts.port) as proxy:
        config = {
            "database": f"sqlite:///{work}/mesh.db",
            "catalog": False,
            "logging": {"level": "INFO"},  # recoveries are logged at info
            "billing": {"leases": False},  # exact holds: one hold row per request, named by its id
            "routing": {"health_interval": 0.2, "failure_threshold": 2, "breaker_cooldown": 0.5},
            "observability": {"stale_hold_minutes": 0.01, "stale_hold_check_interval": 0.2},
            "workers": {"tokens": [{"name": "scoped", "token": TOKEN, "models": ["other"]}]},
            "models": [{"id": "test-model", "context_length": 4096, "pricing": TEST_PRICING,
                        "engines": [{"type": "openai", "base_url": f"http://127.0.0.1:{proxy.port}/v1",
                                     "model": "test-model"}]}],
        }
        with GatewayProcess(config, work) as gw:
            admin = Admin(gw.url)
            key = admin.key(admin.account("silent", credits="100"))["key"]
            admin.close()
            yield Setup(gw, proxy, key)


def test_refused_worker_registrations_are_counted_and_logged_with_the_request_id(setup: Setup) -> None:
    before = setup.metric("mesh_worker_registrations_refused_total", code="invalid_api_key")
    r = httpx.post(setup.gw.url + "/workers/v1/replicas", headers={"Authorization": "Bearer wrong-token-0123456789"},
                   json={"model": "test-model", "engine_url": "http://127.0.0.1:9/v1"})
    assert r.status_code == 401
    r2 = httpx.post(setup.gw.url + "/workers/v1/replicas", headers={"Authorization": f"Bearer {TOKEN}"},
                    json={"model": "test-model", "engine_url": "http://127.0.0.1:9/v1"})
    assert r2.status_code == 403
    assert setup.metric("mesh_worker_registrations_refused_total", code="invalid_api_key") == before + 1
    assert setup.metric("mesh_worker_registrations_refused_total") >= before + 2
    refused = [e for e in setup.logs() if e["msg"].startswith("worker registration refused")]
    ids = [e["request_id"] for e in refused]
    assert ids.count(r.headers["x-request-id"]) == 1 and ids.count(r2.headers["x-request-id"]) == 1


def test_breaker_transitions_are_counted_and_logged(setup: Setup) -> None:
    opened = setup.metric("mesh_breaker_transitions_total", model="test-model", state="open")
    closed = setup.metric("mesh_breaker_transitions_total", model="test-model", state="closed")
    setup.engine.down()
    try:
        deadline = time.monotonic() + 20
        while setup.metric("mesh_breaker_transitions_total", model="test-model", state="open") == opened:
            assert time.monotonic() < deadline, "the breaker never opened"
            time.sleep(0.2)
    finally:
        setup.engine.up()
    deadline = time.monotonic() + 20
    while setup.metric("mesh_breaker_transitions_total", model="test-model", state="closed") == closed:
        assert time.monotonic() < deadline, "the breaker never closed again"
        time.sleep(0.2)
    assert setup.metric("mesh_breaker_transitions_total", model="test-model", state="half_open") >= 1
    changes = [e for e in setup.logs() if e["msg"].startswith("breaker of replica")]
    assert any(e["breaker"] == "open" and e["level"] == "warning" for e in changes)
    assert any(e["breaker"] == "closed" for e in changes)


def test_a_hold_older_than_the_limit_is_counted_and_logged_once_with_its_request_id(setup: Setup) -> None:
    assert setup.metric("mesh_stale_holds") == 0
    got: dict[str, Any] = {}

    def slow() -> None:
        body = {"model": "test-model", "stream": True, "max_tokens": 20,
                "messages": [{"role": "user", "content": "[tokens:20] [chunk_delay:0.2]"}]}
        with httpx.stream("POST", setup.gw.base_url + "/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {setup.key}"}) as resp:
            got["id"] = resp.headers["x-request-id"]
            for _ in resp.iter_lines():
                pass

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while setup.metric("mesh_stale_holds") < 1:
            assert time.monotonic() < deadline, "the open stream's hold was never counted"
            time.sleep(0.1)
    finally:
        worker.join(60)
    deadline = time.monotonic() + 10
    while setup.metric("mesh_stale_holds") != 0:
        assert time.monotonic() < deadline, "the settled hold is still counted"
        time.sleep(0.1)
    stale = [e for e in setup.logs() if e["msg"].startswith("hold ") and e.get("request_id") == got["id"]]
    assert len(stale) == 1, stale


def test_usage_backlog_and_settlement_failures_are_exported(setup: Setup) -> None:
    assert setup.metric("mesh_usage_pending_records") >= 0
    for name in ("mesh_usage_pending_records", "mesh_usage_dropped_records_total", "mesh_settlement_failures_total",
                 "mesh_stale_holds"):
        assert re.search(rf"^{name} \S+$", httpx.get(setup.gw.url + "/metrics", headers={
            "Authorization": f"Bearer {ADMIN_KEY}"}).text, re.M), name


def test_requests_refused_before_anything_was_held_get_one_access_line_with_the_error(setup: Setup) -> None:
    secret = "prompt-text-that-must-never-reach-the-log"
    body = {"model": "test-model", "max_tokens": 5, "messages": [{"role": "user", "content": secret}]}
    bad_key = httpx.post(setup.gw.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": "Bearer sk-mesh-not-a-key-0123456789abcdef"})
    assert bad_key.status_code == 401
    unknown = httpx.post(setup.gw.url + "/v1/chat/completions", json={**body, "model": "no-such-model"},
                         headers={"Authorization": f"Bearer {setup.key}"})
    assert unknown.status_code == 404
    served = httpx.post(setup.gw.url + "/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {setup.key}"})
    assert served.status_code == 200
    deadline = time.monotonic() + 10
    ids = {r.headers["x-request-id"] for r in (bad_key, unknown, served)}
    while True:
        lines = {e["request_id"]: e for e in setup.logs() if e["msg"] == "request" and e.get("request_id") in ids}
        if len(lines) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    one = lines[bad_key.headers["x-request-id"]]
    assert (one["status"], one["error"], one["account_id"]) == ("error", "authentication", None)
    two = lines[unknown.headers["x-request-id"]]
    # A name that no model has is not logged: it is the client's text.
    assert (two["status"], two["error"], two["model"]) == ("error", "not_found", None)
    assert two["account_id"] is not None
    ok = lines[served.headers["x-request-id"]]
    assert ok["status"] == "ok" and "error" not in ok
    assert secret not in setup.gw.log()
    # Each request has exactly one line, however many times it was finished.
    assert sum(1 for e in setup.logs() if e["msg"] == "request" and e.get("request_id") in ids) == 3
