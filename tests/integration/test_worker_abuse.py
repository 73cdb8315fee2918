"""A leaked worker token, used the way an attacker would, against a real gateway process.

Loopback has a whole /8: a client bound to 127.0.0.2 is a worker on another address.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from testengine.harness import EngineProcess

STAR = "worker-token-star-0123456789abcdef"
SCOPED = "worker-token-scoped-0123456789abcd"
ALLOWED = "worker-token-allowed-0123456789abc"


@pytest.fixture(scope="module")
def gw(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    work = tmp_path_factory.mktemp("worker-abuse")
    static = {"type": "openai", "base_url": engine.base_url, "model": "test-model"}
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "routing": {"health_interval": 0.2},
        "workers": {
            "tokens": [
                {"name": "star", "token": STAR, "models": ["*"]},
                {"name": "scoped", "token": SCOPED, "models": ["probe"]},
                {"name": "allowed", "token": ALLOWED, "models": ["probe"], "allow": ["127.0.0.0/8"]},
            ],
            "heartbeat_interval": 0.5, "dead_after": 5, "sync_interval": 0.2,
        },
        "models": [
            {"id": "test-model", "context_length": 4096, "pricing": TEST_PRICING, "engines": [static]},
            {"id": "opened", "context_length": 4096, "pricing": TEST_PRICING, "engines": [static],
             "allow_workers": True},
            {"id": "probe", "context_length": 4096, "pricing": TEST_PRICING},
        ],
    }
    with GatewayProcess(config, work) as gateway:
        admin = Admin(gateway.url)
        key = admin.key(admin.account("victim", credits="100"))["key"]
        admin.close()
        yield gateway, key


def register(gateway: GatewayProcess, token: str, model: str, engine_url: str, source: str = "127.0.0.1",
             ) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
        return client.post(gateway.url + "/workers/v1/replicas", headers={"Authorization": f"Bearer {token}"},
                           json={"model": model, "engine_url": engine_url, "engine_model": "test-model"})


def deregister(gateway: GatewayProcess, token: str, reg_id: str) -> None:
    r = httpx.delete(f"{gateway.url}/workers/v1/replicas/{reg_id}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 204


def fleet(gateway: GatewayProcess, model: str) -> list[dict[str, Any]]:
    data = httpx.get(gateway.url + "/admin/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    replicas: list[dict[str, Any]] = next(m for m in data["data"] if m["id"] == model)["replicas"]
    return replicas


def chat(gateway: GatewayProcess, key: str, model: str, text: str) -> httpx.Response:
    return httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "system", "content": "SECRET SYSTEM PROMPT"},
                                                         {"role": "user", "content": text}], "max_tokens": 5},
                      timeout=30)


def test_star_token_cannot_take_over_a_static_model(gw: tuple[GatewayProcess, str], engine: EngineProcess) -> None:
    gateway, key = gw
    with EngineProcess(models="test-model", name="attacker") as attacker:
        r = register(gateway, STAR, "test-model", attacker.base_url)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "model_closed_to_workers"
        time.sleep(0.5)  # two sync rounds: nothing joined anyway
        assert [x.get("source") for x in fleet(gateway, "test-model")] == [None]
        for i in range(10):
            assert chat(gateway, key, "test-model", f"takeover-{i}").status_code == 200
        assert attacker.requests() == []  # not one prompt reached the attacker
        # The operator may open a static model to workers explicitly.
        opened = register(gateway, STAR, "opened", attacker.base_url)
        assert opened.status_code == 201, opened.text
        deregister(gateway, STAR, opened.json()["id"])


class _Recorder(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.paths
    server.shutdown()
    server.server_close()


def test_health_check_cannot_be_aimed_at_any_path(gw: tuple[GatewayProcess, str],
                                                   recorder: tuple[str, list[str]]) -> None:
    gateway, _ = gw
    base, paths = recorder
    for url in (
        f"{base}/internal/admin/delete?confirm=yes#",
        f"{base}/internal/admin/delete#",
        f"{base}/v1?x=1",
        f"http://user:pass@{base.removeprefix('http://')}/v1",
        f"{base}/v1/../admin",
    ):
        r = register(gateway, SCOPED, "probe", url)
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["param"] == "engine_url"
    time.sleep(1.0)  # five health intervals
    assert paths == []
    assert fleet(gateway, "probe") == []


def test_engine_must_sit_on_the_workers_own_address(gw: tuple[GatewayProcess, str], engine: EngineProcess) -> None:
    gateway, _ = gw
    # From 127.0.0.2, an engine on 127.0.0.1 is someone else's.
    r = register(gateway, SCOPED, "probe", engine.base_url, source="127.0.0.2")
    assert r.status_code == 403 and r.json()["error"]["code"] == "engine_host_not_allowed", r.text
    assert r.json()["error"]["param"] == "engine_url"
    # A token whose config allows the network may.
    r = register(gateway, ALLOWED, "probe", engine.base_url, source="127.0.0.2")
    assert r.status_code == 201, r.text
    deregister(gateway, ALLOWED, r.json()["id"])
    # Its own address, written as a name that resolves to it, is fine; the URL is stored normalised.
    r = register(gateway, SCOPED, "probe", engine.base_url.replace("127.0.0.1", "LOCALHOST") + "/")
    assert r.status_code in (201, 403), r.text  # localhost may also resolve to ::1 on some hosts
    if r.status_code == 201:
        names = [x["name"] for x in fleet(gateway, "probe")]
        assert f"scoped@{engine.base_url.replace('127.0.0.1', 'localhost')}" in names
        deregister(gateway, SCOPED, r.json()["id"])
    r = register(gateway, SCOPED, "probe", engine.base_url.replace("/v1", "//v1/"))
    assert r.status_code == 201, r.text
    assert f"scoped@{engine.base_url}" in [x["name"] for x in fleet(gateway, "probe")]
    deregister(gateway, SCOPED, r.json()["id"])


def test_engine_reporting_impossible_usage_leaves_rotation(gw: tuple[GatewayProcess, str]) -> None:
    gateway, key = gw
    with EngineProcess(models="test-model", name="liar", extra_args=["--usage-factor", "50"]) as liar:
        r = register(gateway, SCOPED, "probe", liar.base_url)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 10
        while not any(x["healthy"] for x in fleet(gateway, "probe")):
            assert time.monotonic() < deadline, "the liar's replica never joined"
            time.sleep(0.1)
        assert chat(gateway, key, "probe", "inflate me").status_code == 200
        while any(x["healthy"] for x in fleet(gateway, "probe")):
            assert time.monotonic() < deadline, "the liar's replica stayed in rotation"
            time.sleep(0.1)
        assert "output tokens" in gateway.log()  # logged with the reason
        after = chat(gateway, key, "probe", "again")
        assert after.status_code == 503, after.text
        assert len(liar.requests()) == 1
        # Registering the same engine again does not bring it back.
        again = register(gateway, SCOPED, "probe", liar.base_url)
        assert again.status_code == 403 and again.json()["error"]["code"] == "quarantined", again.text
