"""A worker's engine is the attacker's: what it answers must not steer the gateway.

Found by red-teaming issue 14 against a real gateway process: the gateway followed the
engine's redirects (health checks and chat requests went to any URL the engine named), an
engine reporting negative usage made settlement fail (500, the customer's hold stuck), a
quarantined engine came back under another port or another spelling of its host, usage
out of bounds was billed in full (100 credits for a five-token prompt), also when the
engine failed right after reporting it, and a worker that deregistered the moment its
engine lied escaped the quarantine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from support.rogue_engine import RogueEngine

TOKEN = "worker-token-rogue-0123456789abcdef"
# One token per test that gets its engine quarantined (quarantine is per token and host).
LIARS = ("quarantine", "bill", "broken", "race")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str, str]]:
    work = tmp_path_factory.mktemp("worker-redteam")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "billing": {"leases": False},
        "routing": {"health_interval": 0.2},
        "workers": {"tokens": [{"name": "rogue", "token": TOKEN, "models": ["probe"]},
                               *({"name": n, "token": liar_token(n), "models": ["probe"]} for n in LIARS)],
                    "heartbeat_interval": 0.5, "dead_after": 30, "sync_interval": 0.2},
        "models": [{"id": "probe", "context_length": 4096, "pricing": TEST_PRICING}],
    }
    with GatewayProcess(config, work) as gateway:
        admin = Admin(gateway.url)
        account = admin.account("victim", credits="100")
        key = admin.key(account)["key"]
        admin.close()
        yield gateway, key, account


def liar_token(name: str) -> str:
    return f"worker-token-{name}-0123456789abcdef"


def register(gateway: GatewayProcess, engine_url: str, token: str = TOKEN) -> httpx.Response:
    return httpx.post(gateway.url + "/workers/v1/replicas", headers={"Authorization": f"Bearer {token}"},
                      json={"model": "probe", "engine_url": engine_url, "engine_model": "test-model"})


def deregister(gateway: GatewayProcess, reg_id: str, token: str = TOKEN) -> None:
    httpx.delete(f"{gateway.url}/workers/v1/replicas/{reg_id}", headers={"Authorization": f"Bearer {token}"})


def replicas(gateway: GatewayProcess) -> list[dict[str, Any]]:
    data = httpx.get(gateway.url + "/admin/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    found: list[dict[str, Any]] = next(m for m in data["data"] if m["id"] == "probe")["replicas"]
    return found


def chat(gateway: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "probe", "max_tokens": 5,
                            "messages": [{"role": "user", "content": "CUSTOMER PROMPT"}]}, timeout=30)


def wait_for(check: Any, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_health_checks_do_not_follow_an_engines_redirect(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    with RogueEngine() as victim, RogueEngine() as rogue:
        rogue.behaviour.redirect_to = victim.base_url.removesuffix("/v1") + "/internal/admin/delete?confirm=yes"
        r = register(gateway, rogue.base_url)
        assert r.status_code == 201, r.text
        try:
            wait_for(lambda: len(rogue.behaviour.requests) >= 5, "the rogue engine was never health-checked")
            assert victim.behaviour.requests == []  # the gateway went nowhere the rogue pointed it
            wait_for(lambda: not any(x["healthy"] for x in replicas(gateway)), "a redirecting engine stayed healthy")
        finally:
            deregister(gateway, r.json()["id"])


def test_chat_requests_do_not_follow_an_engines_redirect(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, key, _ = gw
    with RogueEngine() as victim, RogueEngine() as rogue:
        rogue.behaviour.redirect_to = victim.base_url + "/chat/completions"
        rogue.behaviour.redirect_methods = ("POST",)  # healthy to probes, redirects the real work
        r = register(gateway, rogue.base_url)
        assert r.status_code == 201, r.text
        try:
            wait_for(lambda: any(x["healthy"] for x in replicas(gateway)), "the rogue replica never joined")
            answer = chat(gateway, key)
            assert ("POST", "/v1/chat/completions") in rogue.behaviour.requests
            assert answer.status_code >= 500, answer.text  # the engine failed; nobody answered in its place
            assert [req for req in victim.behaviour.requests if req[0] == "POST"] == []
        finally:
            deregister(gateway, r.json()["id"])


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1_000_000, "completion_tokens": 1},
    {"prompt_tokens": 10, "completion_tokens": -5},
    {"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": -1_000_000}},
    {"prompt_tokens": "1e9", "completion_tokens": None},
], ids=["negative-prompt", "negative-output", "negative-cached", "not-numbers"])
def test_garbage_usage_from_an_engine_neither_fails_nor_strands_the_hold(
    gw: tuple[GatewayProcess, str, str], usage: dict[str, Any]
) -> None:
    gateway, key, account = gw
    admin = Admin(gateway.url)
    with RogueEngine() as rogue:
        rogue.behaviour.usage = usage
        r = register(gateway, rogue.base_url)
        assert r.status_code == 201, r.text
        try:
            wait_for(lambda: any(x["healthy"] for x in replicas(gateway)), "the rogue replica never joined")
            before = Decimal(admin.balance(account)["balance"])
            answer = chat(gateway, key)
            assert answer.status_code == 200, answer.text
            wait_for(lambda: Decimal(admin.balance(account)["held"]) == 0, "the request's hold was never released")
            after = Decimal(admin.balance(account)["balance"])
            assert after <= before  # no credit minted by a negative count
        finally:
            deregister(gateway, r.json()["id"])
            admin.close()


def test_quarantine_holds_for_another_port_or_spelling_of_the_host(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, key, _ = gw
    with RogueEngine() as liar, RogueEngine() as second:
        liar.behaviour.usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1}
        token = liar_token("quarantine")
        r = register(gateway, liar.base_url, token)
        assert r.status_code == 201, r.text
        try:
            wait_for(lambda: any(x["healthy"] for x in replicas(gateway)), "the liar's replica never joined")
            assert chat(gateway, key).status_code == 200
            wait_for(lambda: not any(x["healthy"] for x in replicas(gateway)), "the liar stayed in rotation")
        finally:
            deregister(gateway, r.json()["id"], token)
        port = liar.base_url.split(":")[2].split("/")[0]
        for url in (liar.base_url, f"http://[::ffff:127.0.0.1]:{port}/v1", liar.base_url + "/",
                    second.base_url):  # the same node, another port
            again = register(gateway, url, token)
            assert again.status_code == 403, (url, again.text)
            assert again.json()["error"]["code"] == "quarantined", (url, again.text)


@pytest.mark.parametrize("broken", [False, True], ids=["clean-end", "fails-after-usage"])
def test_usage_out_of_bounds_is_billed_only_as_far_as_mesh_can_bound_it(
    gw: tuple[GatewayProcess, str, str], broken: bool
) -> None:
    gateway, key, account = gw
    admin = Admin(gateway.url)
    token = liar_token("broken" if broken else "bill")
    with RogueEngine() as liar:
        liar.behaviour.usage = {"prompt_tokens": 100_000_000, "completion_tokens": 5}
        liar.behaviour.break_after_usage = broken
        r = register(gateway, liar.base_url, token)
        assert r.status_code == 201, r.text
        try:
            wait_for(lambda: any(x["healthy"] for x in replicas(gateway)), "the liar's replica never joined")
            before = Decimal(admin.balance(account)["balance"])
            chat(gateway, key)  # answered or failed mid-stream: either way, what does it cost?
            wait_for(lambda: Decimal(admin.balance(account)["held"]) == 0, "the hold was never released")
            spent = before - Decimal(admin.balance(account)["balance"])
            # A five-token prompt and five output tokens at 1 and 2 credits per million; the
            # liar claimed 100 million prompt tokens (100 credits).
            assert Decimal(0) <= spent < Decimal("0.001"), spent
            wait_for(lambda: not any(x["healthy"] for x in replicas(gateway)), "the liar stayed in rotation")
        finally:
            deregister(gateway, r.json()["id"], token)
            admin.close()


def test_deregistering_as_the_engine_lies_does_not_escape_quarantine(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, key, _ = gw
    token = liar_token("race")
    with RogueEngine() as liar:
        liar.behaviour.usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1}
        r = register(gateway, liar.base_url, token)
        assert r.status_code == 201, r.text
        reg_id = r.json()["id"]
        liar.behaviour.on_answer = lambda: deregister(gateway, reg_id, token)
        wait_for(lambda: any(x["healthy"] for x in replicas(gateway)), "the liar's replica never joined")
        assert chat(gateway, key).status_code == 200
        wait_for(lambda: replicas(gateway) == [], "the deregistered replica stayed")
        liar.behaviour.on_answer = None
        again = register(gateway, liar.base_url, token)
        assert again.status_code == 403 and again.json()["error"]["code"] == "quarantined", again.text
