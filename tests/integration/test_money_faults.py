"""Issue 13's money reproductions against real gateway processes (SQLite and PostgreSQL).

Each test is a reproduction of a way money was lost or double-counted: a lease used up by
``n: 16`` requests, ``n`` not held, a free model falling back to a paid one, PostgreSQL
refusing connections, a lost COMMIT reply, a gateway killed with ``kill -9``. The faults
are the test's own (a TCP proxy between the gateway and PostgreSQL, a process it started);
the shared PostgreSQL is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from support.gateway import ADMIN_KEY, Admin, GatewayProcess, free_port
from support.postgres import temporary_database
from support.tcpproxy import TcpProxy
from testengine.harness import EngineProcess

MICRO = Decimal("0.000001")
PRICE_IN, PRICE_OUT = 10, 100  # micro-credits per token (credits per million tokens)
CHECKPOINT_INTERVAL = 0.5
FLUSH_INTERVAL = 0.1


def models(engine: EngineProcess) -> list[dict[str, Any]]:
    paid = {"type": "openai", "base_url": engine.base_url, "model": "test-model"}
    dead = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "test-model"}
    return [
        {"id": "paid", "context_length": 4096, "pricing": {"input": "10", "output": "100"}, "engines": [paid]},
        {"id": "free-down", "context_length": 4096, "pricing": {"input": "0", "output": "0"}, "engines": [dead]},
    ]


def config(engine: EngineProcess, url: str) -> dict[str, Any]:
    return {
        "database": url,
        "catalog": False,
        "models": models(engine),
        "logging": {"level": "INFO"},
        "billing": {
            "usage_flush_interval": 0.05,
            "lease_flush_interval": FLUSH_INTERVAL,
            "checkpoint_interval": CHECKPOINT_INTERVAL,
        },
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def priced(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp(f"money-{request.param}")
    with temporary_database(request, request.param, work) as url, GatewayProcess(config(engine, url), work) as gw:
        admin = Admin(gw.url)
        try:
            yield gw, admin
        finally:
            admin.close()


def chat(gw: GatewayProcess, key: str, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


def cost(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens"]) * PRICE_IN + int(usage["completion_tokens"]) * PRICE_OUT


def billing_metrics(gw: GatewayProcess) -> dict[str, float]:
    r = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    r.raise_for_status()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in r.text.splitlines())
        if name.startswith("mesh_billing_")
    }


def micro(text: str) -> int:
    return int(Decimal(text) / MICRO)


def entries(admin: Admin, account: str) -> list[dict[str, Any]]:
    return admin.ledger(account)


def settled(admin: Admin, account: str, timeout: float = 30.0) -> tuple[int, int]:
    """(balance, held) in micro-credits once nothing is held (leases go back after 2 s idle);
    asserts the ledger sums to the balance."""
    deadline = time.monotonic() + timeout
    while True:
        acct = admin.balance(account)
        if Decimal(acct["held"]) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    balance, held = micro(acct["balance"]), micro(acct["held"])
    assert sum(micro(e["amount"]) for e in entries(admin, account)) == balance
    return balance, held


def charged_by_request(admin: Admin, account: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries(admin, account):
        if e["kind"] == "usage":
            out[e["request_id"]] = out.get(e["request_id"], 0) - micro(e["amount"])
    return out


def test_requests_that_use_up_a_lease_leave_other_accounts_charged_exactly(
    priced: tuple[GatewayProcess, Admin],
) -> None:
    gw, admin = priced
    heavy = admin.account("n16", credits="10")
    heavy_key = admin.key(heavy)["key"]
    paid = 0
    for i in range(3):
        r = chat(gw, heavy_key, {"model": "paid", "n": 16, "max_tokens": 20,
                                 "messages": [{"role": "user", "content": f"[tokens:40] n16 {i}"}]})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 16
        paid += cost(r.json()["usage"])
    other = admin.account("bystander", credits="10")
    other_key = admin.key(other)["key"]
    costs: dict[str, int] = {}
    for i in range(5):
        r = chat(gw, other_key, {"model": "paid", "messages": [{"role": "user", "content": f"after {i}"}]})
        assert r.status_code == 200, r.text
        costs[r.headers["x-request-id"]] = cost(r.json()["usage"])
    assert settled(admin, other) == (10_000_000 - sum(costs.values()), 0)
    assert charged_by_request(admin, other) == costs
    assert settled(admin, heavy) == (10_000_000 - paid, 0)


def test_concurrent_n16_requests_never_stop_another_accounts_billing(priced: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = priced
    heavy, other = admin.account("n16-race", credits="2"), admin.account("next", credits="10")
    heavy_key, other_key = admin.key(heavy)["key"], admin.key(other)["key"]

    async def fire(key: str, n: int, body: dict[str, Any]) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            async def one(i: int) -> tuple[str, int]:
                r = await client.post(gw.base_url + "/chat/completions", json={
                    **body, "messages": [{"role": "user", "content": f"[tokens:30] race {i}"}]})
                return r.headers["x-request-id"], cost(r.json()["usage"]) if r.status_code == 200 else -r.status_code

            return dict(await asyncio.gather(*(one(i) for i in range(n))))

    heavy_costs = asyncio.run(fire(heavy_key, 40, {"model": "paid", "n": 16, "max_tokens": 20}))
    assert set(c for c in heavy_costs.values() if c < 0) <= {-402}
    served = {rid: c for rid, c in heavy_costs.items() if c >= 0}
    assert served
    other_costs = asyncio.run(fire(other_key, 40, {"model": "paid", "max_tokens": 20}))
    assert all(c > 0 for c in other_costs.values())
    assert settled(admin, other) == (10_000_000 - sum(other_costs.values()), 0)
    assert charged_by_request(admin, other) == other_costs
    assert settled(admin, heavy) == (2_000_000 - sum(served.values()), 0)
    assert charged_by_request(admin, heavy) == {rid: c for rid, c in served.items() if c}


def test_n_choices_on_a_small_balance_are_held_and_charged_in_full(priced: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = priced
    account = admin.account("tiny", credits="0.01")
    key = admin.key(account)["key"]
    r = chat(gw, key, {"model": "paid", "n": 16, "max_tokens": 20,
                       "messages": [{"role": "user", "content": "[tokens:40] many choices"}]})
    balance, held = settled(admin, account)
    assert held == 0
    if r.status_code == 402:
        assert balance == 10_000
        return
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 0 < cost(usage) <= 10_000  # max_tokens was lowered so that all 16 choices fit
    assert balance == 10_000 - cost(usage)
    assert not [e for e in entries(admin, account) if "shortfall" in (e["memo"] or "")]


def test_a_free_model_falling_back_to_a_paid_one_on_zero_balance_is_402(
    priced: tuple[GatewayProcess, Admin], engine: EngineProcess
) -> None:
    gw, admin = priced
    broke = admin.account("zero", credits=None)
    key = admin.key(broke)["key"]
    body = {"model": "free-down", "models": ["paid"], "max_tokens": 50,
            "messages": [{"role": "user", "content": "[tokens:200] free lunch?"}]}
    r = chat(gw, key, body)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "insufficient_credits"
    assert settled(admin, broke) == (0, 0)
    assert charged_by_request(admin, broke) == {}
    # With credit, the fallback serves and is billed at the paid model's prices.
    rich = admin.account("fallback", credits="1")
    rich_key = admin.key(rich)["key"]
    r = chat(gw, rich_key, body)
    assert r.status_code == 200, r.text
    assert settled(admin, rich) == (1_000_000 - cost(r.json()["usage"]), 0)


@pytest.mark.parametrize("stream", [False, True])
def test_output_without_max_tokens_is_charged_whatever_the_prompt_estimate(
    priced: tuple[GatewayProcess, Admin], stream: bool
) -> None:
    # A prompt whose high estimate fills the 4,096-token context (8,000 letters: 4,801 by the
    # estimate, 2 words to the engine) and no max_tokens: the engine may write until its
    # context is full. Every token it writes must be held for and charged; the hold used to
    # cover context minus the high estimate (1 token here), and the rest went out free.
    gw, admin = priced
    prompt = "[tokens:300] " + "a" * 8000
    body: dict[str, Any] = {"model": "paid", "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    rich = admin.account("no-max-tokens", credits="1")
    rich_key = admin.key(rich)["key"]

    def usage_of(r: httpx.Response) -> dict[str, Any]:
        if not stream:
            return dict(r.json()["usage"])
        chunks = [httpx.Response(200, content=line[6:]).json() for line in r.text.splitlines()
                  if line.startswith("data: {")]
        return dict(next(c["usage"] for c in chunks if c.get("usage")))

    r = chat(gw, rich_key, body)
    assert r.status_code == 200, r.text
    usage = usage_of(r)
    assert usage["completion_tokens"] == 300
    assert settled(admin, rich) == (1_000_000 - cost(usage), 0)
    assert charged_by_request(admin, rich) == {r.headers["x-request-id"]: cost(usage)}
    # Credit for far less than a full context: the engine is capped at what is held.
    poor = admin.account("no-max-tokens-poor", credits="0.06")  # the prompt (48,010) and ~100 tokens
    poor_key = admin.key(poor)["key"]
    r = chat(gw, poor_key, body)
    assert r.status_code == 200, r.text
    usage = usage_of(r)
    assert 0 < usage["completion_tokens"] < 300
    assert settled(admin, poor) == (60_000 - cost(usage), 0)
    assert charged_by_request(admin, poor) == {r.headers["x-request-id"]: cost(usage)}


# -- faults on PostgreSQL, through a proxy of the test's own ----------------------------------

@pytest.fixture
def proxied(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, Admin, TcpProxy]]:
    with temporary_database(request, "postgresql", tmp_path) as url:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        with TcpProxy(parts.hostname, parts.port) as proxy:
            via = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
            with GatewayProcess(config(engine, via), tmp_path) as gw:
                admin = Admin(gw.url)
                try:
                    yield gw, admin, proxy
                finally:
                    admin.close()


def test_postgres_refusing_connections_fails_closed_and_settles_after(
    proxied: tuple[GatewayProcess, Admin, TcpProxy],
) -> None:
    gw, admin, proxy = proxied
    small = admin.account("exact", credits="0.05")  # too little for a lease: exact holds
    small_key = admin.key(small)["key"]
    fresh = admin.account("fresh", credits="1")
    fresh_key = admin.key(fresh)["key"]  # never used before the outage: not in the key cache
    streamed: dict[str, Any] = {}

    def long_stream() -> None:
        body = {"model": "paid", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 30,
                "messages": [{"role": "user", "content": "[tokens:30] [chunk_delay:0.2]"}]}
        with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {small_key}"}) as resp:
            streamed["status"] = resp.status_code
            streamed["id"] = resp.headers["x-request-id"]
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    streamed["usage"] = httpx.Response(200, content=line[6:]).json()["usage"]

    worker = threading.Thread(target=long_stream)
    worker.start()
    time.sleep(1.0)
    proxy.down()
    outage_started = time.monotonic()
    try:
        r = chat(gw, fresh_key, {"model": "paid", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_error" and float(r.headers["retry-after"]) > 0
        r = httpx.post(gw.url + "/v1/messages", timeout=30, headers={"x-api-key": fresh_key},
                       json={"model": "paid", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 529, r.text
        assert r.json()["error"]["type"] == "overloaded_error" and float(r.headers["retry-after"]) > 0
        r = chat(gw, small_key, {"model": "paid", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503, r.text  # an exact hold needs the database: refused, not a 500
        assert httpx.get(gw.url + "/health").status_code == 200  # alive
        assert httpx.get(gw.url + "/health/ready", timeout=10).status_code == 503  # but not ready
        worker.join(30)
        assert streamed["status"] == 200 and "usage" in streamed  # finished during the outage
        metrics = billing_metrics(gw)
        assert metrics["mesh_billing_ready"] == 0 and metrics["mesh_billing_queued_charges"] >= 1
        time.sleep(max(0.0, 20 - (time.monotonic() - outage_started)))
    finally:
        proxy.up()
    deadline = time.monotonic() + 30
    while httpx.get(gw.url + "/health/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "never ready again"
        time.sleep(0.2)
    # The stream that ended during the outage is charged now, without a restart.
    assert billing_metrics(gw) == {"mesh_billing_ready": 1, "mesh_billing_queued_charges": 0,
                                   "mesh_billing_failed_charges_total": 0}
    assert settled(admin, small) == (50_000 - cost(streamed["usage"]), 0)
    assert charged_by_request(admin, small) == {streamed["id"]: cost(streamed["usage"])}
    r = chat(gw, fresh_key, {"model": "paid", "messages": [{"role": "user", "content": "back"}]})
    assert r.status_code == 200
    assert settled(admin, fresh) == (1_000_000 - cost(r.json()["usage"]), 0)


def test_lost_commit_replies_leave_every_charge_written_once(
    proxied: tuple[GatewayProcess, Admin, TcpProxy],
) -> None:
    gw, admin, proxy = proxied
    account = admin.account("commits", credits="10")
    key = admin.key(account)["key"]

    async def fire(n: int) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
            gate = asyncio.Semaphore(8)

            async def one(i: int) -> tuple[str, int]:
                async with gate:
                    r = await client.post(gw.base_url + "/chat/completions", json={
                        "model": "paid", "max_tokens": 20,
                        "messages": [{"role": "user", "content": f"[tokens:10] [chunk_delay:0.01] {i}"}]})
                    assert r.status_code == 200, r.text
                    return r.headers["x-request-id"], cost(r.json()["usage"])

            return dict(await asyncio.gather(*(one(i) for i in range(n))))

    costs = asyncio.run(fire(10))  # a lease is open
    proxy.drop_commit_replies(6)
    costs |= asyncio.run(fire(60))
    assert proxy.dropped_commits >= 1
    assert settled(admin, account) == (10_000_000 - sum(costs.values()), 0)
    assert charged_by_request(admin, account) == costs
    keys = [e["idempotency_key"] for e in entries(admin, account)]
    assert len(keys) == len(set(keys))
    deadline = time.monotonic() + 10
    while True:  # one usage record per request, not one per attempt
        r = httpx.get(gw.base_url + "/usage", headers={"Authorization": f"Bearer {key}"})
        rows = r.json()["data"]
        if (rows and rows[0]["requests"] >= len(costs)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(row["requests"] for row in rows) == len(costs)


# -- kill -9 ------------------------------------------------------------------------------------

@pytest.mark.leaves_state(
    "kill -9: the dead process's lease stays held until a live process releases it after "
    "billing.stale_after, and its streams' checkpoint charges have no usage record (docs: Money)"
)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_with_long_streams_in_flight_loses_at_most_the_documented_bound(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path, backend: str
) -> None:
    chunk_delay, streams = 0.02, 20
    with temporary_database(request, backend, tmp_path) as url:
        victim = GatewayProcess(config(engine, url), tmp_path).start()
        admin = Admin(victim.url)
        account = admin.account("killed", credits="10")
        key = admin.key(account)["key"]
        admin.close()
        received: dict[str, int] = {}
        lock = threading.Lock()

        def stream(i: int) -> None:
            body = {"model": "paid", "stream": True, "max_tokens": 1000,
                    "messages": [{"role": "user", "content": f"[tokens:1000] [chunk_delay:{chunk_delay}] {i}"}]}
            with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "POST", victim.base_url + "/chat/completions", json=body, timeout=60,
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                rid = resp.headers["x-request-id"]
                for line in resp.iter_lines():
                    if '"content":"' in line:
                        with lock:
                            received[rid] = received.get(rid, 0) + 1

        workers = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for w in workers:
            w.start()
        time.sleep(4.0)
        assert victim.proc is not None
        victim.proc.kill()  # SIGKILL: no shutdown, no last flush
        victim.proc.wait()
        for w in workers:
            w.join(30)
        with GatewayProcess(config(engine, url), tmp_path) as survivor:
            survivor_admin = Admin(survivor.url)
            charged = charged_by_request(survivor_admin, account)
            survivor_admin.close()
    assert len(received) == streams and all(n > 10 for n in received.values()), received
    # Documented bound (docs/architecture.md, "Money"): each stream loses at most the tokens
    # of checkpoint_interval + flush_interval, plus the prompt and scheduling slack.
    rate = 1 / chunk_delay
    bound = int((CHECKPOINT_INTERVAL + FLUSH_INTERVAL) * rate * 2) * PRICE_OUT + 200 * PRICE_IN
    lost = {rid: received[rid] * PRICE_OUT - charged.get(rid, 0) for rid in received}
    print(f"kill -9 ({backend}): lost per stream (micro-credits) {sorted(lost.values())}, bound {bound}")
    assert all(charged.get(rid, 0) > 0 for rid in received), "a stream went wholly unbilled"
    assert max(lost.values()) <= bound, lost
    # Never more than what was generated: the engine may have run a little ahead of the client.
    assert all(charged[rid] <= (received[rid] + rate) * PRICE_OUT + 200 * PRICE_IN for rid in received)

