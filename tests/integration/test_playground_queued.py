"""The console playground's stream queued past its patience, on a real gateway.

Under Mesh's server a stream still queued after its patience (1 s) starts its response from
a task of its own, with the request's own ``send``. The playground hands the API endpoint a
request of its own making: without the connection's ``send`` that start failed and the
playground answered 500 whenever its model's replicas were all busy for a second (one
embedded model answering someone else, with ``make run``)."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from support.queued import PATIENCE, block, pool, settled, wait_for
from testengine.harness import EngineProcess

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
_ACCOUNT = re.compile(r"<code>(acct_[0-9a-f]+)</code>")


@pytest.fixture(scope="module")
def console_gw(
    engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp("playground-queued")
    engines = [{"type": "openai", "base_url": engine.base_url, "model": "test-model", "name": "solo", "capacity": 1}]
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "routing": {"keepalive_interval": 0.2, "queue_timeout": 10.0, "max_attempts": 1},
        "models": [{"id": "solo", "context_length": 4096, "pricing": TEST_PRICING, "engines": engines}],
        "console": {"secret": "s" * 48, "signups_per_ip_per_hour": 10_000, "verify_email": False},
    }
    with GatewayProcess(config, work) as gw, Admin(gw.url) as admin:
        yield gw, admin


def signed_in(gw: GatewayProcess) -> tuple[httpx.Client, str]:
    """A console user over real HTTP, signed in; with the account's id."""
    http = httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30)
    email = f"player-{secrets.token_hex(6)}@example.com"

    def token(path: str) -> str:
        page = http.get(path, follow_redirects=True)
        found = _CSRF.search(page.text) or _META.search(page.text)
        assert found, f"no CSRF token on {path}: {page.status_code}"
        return found.group(1)

    r = http.post("/console/signup", data={"email": email, "password": PASSWORD, "password_confirm": PASSWORD,
                                           "csrf_token": token("/console/signup")})
    assert r.status_code == 303, r.text
    r = http.post("/console/signin", data={"email": email, "password": PASSWORD,
                                           "csrf_token": token("/console/signin")})
    assert r.status_code == 303, r.text
    found = _ACCOUNT.search(http.get("/console/settings").text)
    assert found
    http.headers["X-CSRF-Token"] = token("/console/playground")
    return http, found.group(1)


def test_a_playground_stream_queued_past_its_patience_gets_its_answer(
    console_gw: tuple[GatewayProcess, Admin],
) -> None:
    gw, admin = console_gw
    http, account = signed_in(gw)
    admin.grant(account, "10")
    blocker_account = admin.account("blocker", credits="10")
    blocker = block(gw, admin.key(blocker_account)["key"], 2.0)  # solo's one slot, for 2 s
    try:
        assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
        body = {"model": "solo", "messages": [{"role": "user", "content": "[tokens:3] queued playground"}]}
        start = time.monotonic()
        lines: list[tuple[float, str]] = []
        with http.stream("POST", "/console/playground/chat", json=body) as resp:
            assert resp.status_code == 200, resp.read()
            head_at = time.monotonic() - start
            lines = [(time.monotonic() - start, line) for line in resp.iter_lines() if line]
    finally:
        blocker.join()
        http.close()
    # The head went out at the patience, keep-alives while queued, then the whole answer.
    assert head_at < 1.9, head_at
    first_data = next(at for at, line in lines if line.startswith("data: "))
    assert first_data >= PATIENCE
    assert any(line.startswith(":") for _, line in lines)  # an SSE comment kept it alive
    data = [line[6:] for _, line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text  # the engine's answer reached the playground
    assert any(c.get("usage") for c in chunks)
    after = settled(admin, account, "solo")
    assert after["held"] == "0.000000" and after["balance"] != "10.000000"  # released, and billed
