"""Red-team of the settlement core (issue 13) against real gateway processes, SQLite and PostgreSQL.

Each test attacks the money the way a customer, an attacker or a fault would, then checks
the books: balance >= 0, nothing held at rest, the ledger sums to the balance, every served
request charged exactly once at its reported price.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from support.tcpproxy import TcpProxy
from testengine.harness import EngineProcess

MICRO = Decimal("0.000001")
PRICE_IN, PRICE_OUT = 10, 100  # micro-credits per token


@pytest.fixture(scope="module")
def silent_engine() -> Iterator[EngineProcess]:
    """An engine that streams its tokens but reports zero usage for them."""
    with EngineProcess(name="silent", extra_args=["--usage-factor", "0"]) as proc:
        yield proc


def config(engine: EngineProcess, url: str, silent: EngineProcess | None = None) -> dict[str, Any]:
    e = {"type": "openai", "base_url": engine.base_url, "model": "test-model"}
    quiet = [] if silent is None else [
        {"id": "silent", "context_length": 4096, "pricing": {"input": "10", "output": "100"},
         "engines": [{"type": "openai", "base_url": silent.base_url, "model": "test-model"}]},
    ]
    return {
        "database": url,
        "catalog": False,
        "models": [
            {"id": "paid", "context_length": 4096, "pricing": {"input": "10", "output": "100"}, "engines": [e]},
            # No context length known to Mesh: max_tokens reaches the hold as the client sent it.
            {"id": "paid-open", "pricing": {"input": "10", "output": "100"}, "engines": [e]},
            *quiet,
        ],
        "logging": {"level": "INFO"},
        "billing": {"usage_flush_interval": 0.05},
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def books(
    request: pytest.FixtureRequest, engine: EngineProcess, silent_engine: EngineProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp(f"redteam-{request.param}")
    with temporary_database(request, request.param, work) as url, GatewayProcess(
        config(engine, url, silent_engine), work
    ) as gw:
        admin = Admin(gw.url)
        try:
            yield gw, admin
        finally:
            admin.close()


def micro(text: str) -> int:
    return int(Decimal(text) / MICRO)


def cost(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens"]) * PRICE_IN + int(usage["completion_tokens"]) * PRICE_OUT


def entries(admin: Admin, account: str) -> list[dict[str, Any]]:
    return admin.ledger(account)


def at_rest(admin: Admin, account: str, timeout: float = 30.0) -> int:
    """The balance once nothing is held (leases go back after 2 s idle); asserts the books."""
    deadline = time.monotonic() + timeout
    while True:
        acct = admin.balance(account)
        if Decimal(acct["held"]) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    balance, held = micro(acct["balance"]), micro(acct["held"])
    rows = entries(admin, account)
    assert held == 0, f"{held} micro-credits still held"
    assert balance >= 0
    assert sum(micro(e["amount"]) for e in rows) == balance
    keys = [e["idempotency_key"] for e in rows]
    assert len(keys) == len(set(keys))
    return balance


def charged_by_request(admin: Admin, account: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries(admin, account):
        if e["kind"] == "usage":
            out[e["request_id"]] = out.get(e["request_id"], 0) - micro(e["amount"])
    return out


HUGE = 10**18  # a valid JSON integer, beyond what any 64-bit balance could hold for


@pytest.mark.parametrize("n", [1, 16])
def test_a_huge_max_tokens_is_held_down_to_the_balance_not_a_500(books: tuple[GatewayProcess, Admin], n: int) -> None:
    gw, admin = books
    account = admin.account("huge", credits="0.1")  # affords fewer tokens than the context
    key = admin.key(account)["key"]
    headers = {"Authorization": f"Bearer {key}", "x-api-key": key}
    prompt = "[tokens:5] huge"
    calls = [
        ("/chat/completions", {"model": "paid-open", "n": n, "max_tokens": HUGE,
                               "messages": [{"role": "user", "content": prompt}]}),
        ("/chat/completions", {"model": "paid-open", "n": n, "max_completion_tokens": 2**63,
                               "messages": [{"role": "user", "content": prompt}]}),
        ("/messages", {"model": "paid-open", "max_tokens": HUGE, "messages": [{"role": "user", "content": prompt}]}),
        ("/responses", {"model": "paid-open", "max_output_tokens": HUGE, "input": prompt}),
    ]
    spent = 0
    for path, body in calls:
        r = httpx.post(gw.base_url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, (path, r.text)
        usage = r.json()["usage"]
        if "prompt_tokens" in usage:
            spent += cost(usage)
        else:
            spent += usage["input_tokens"] * PRICE_IN + usage["output_tokens"] * PRICE_OUT
    assert at_rest(admin, account) == 100_000 - spent


@pytest.mark.parametrize("n", [1, 4])
def test_an_engine_reporting_no_output_is_billed_for_what_it_streamed(
    books: tuple[GatewayProcess, Admin], n: int
) -> None:
    gw, admin = books
    account = admin.account("silent", credits="1")
    key = admin.key(account)["key"]
    body = {"model": "silent", "n": n, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "[tokens:40] say it all"}]}
    pieces, usage = 0, None
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200
        rid = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                pieces += sum(1 for c in chunk["choices"] if c["delta"].get("content"))
                usage = chunk.get("usage") or usage
    assert pieces == 40 * n
    assert usage is not None and usage["completion_tokens"] == pieces  # what the client is shown is what it pays
    assert at_rest(admin, account) == 1_000_000 - cost(usage)
    assert charged_by_request(admin, account) == {rid: cost(usage)}


@pytest.fixture
def proxied(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, Admin, TcpProxy]]:
    """A gateway whose PostgreSQL connections go through a proxy of the test's own."""
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


def test_an_exact_hold_whose_commit_reply_is_lost_is_released(
    proxied: tuple[GatewayProcess, Admin, TcpProxy],
) -> None:
    """The admission's hold committed but the gateway saw an error (503): the hold must not
    stay for the 2-hour sweeper, locking a small account out with 402s meanwhile."""
    gw, admin, proxy = proxied
    account = admin.account("lost-hold", credits="0.05")  # too little for a lease: exact holds
    key = admin.key(account)["key"]
    body = {"model": "paid", "max_tokens": 400, "messages": [{"role": "user", "content": "[tokens:5] hold"}]}
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text  # the key is cached now: the next COMMIT is the hold's
    spent = cost(r.json()["usage"])
    assert at_rest(admin, account) == 50_000 - spent
    # Background writers (usage records) commit too: arm until the hold's reply is the one lost.
    for _ in range(10):
        before = proxy.dropped_commits
        proxy.drop_commit_replies(1)
        r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers, timeout=30)
        if r.status_code == 200:
            spent += cost(r.json()["usage"])
        else:
            assert r.status_code == 503, r.text
            assert float(r.headers["retry-after"]) > 0
        deadline = time.monotonic() + 5
        while proxy.dropped_commits == before and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.drop_commit_replies(0)
        # Whichever COMMIT lost its reply, the books come right without a restart.
        assert at_rest(admin, account) == 50_000 - spent
        if r.status_code == 503:
            break
    assert r.status_code == 503, "no admission hold lost its COMMIT reply in 10 tries"
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert at_rest(admin, account) == 50_000 - spent - cost(r.json()["usage"])


@pytest.mark.leaves_state(
    "kill -9 mid-flush: charges the dead process wrote may lack the usage records its usage "
    "writer had not yet written (docs: Money); the test checks holds and balances itself"
)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_leases_of_a_gateway_killed_mid_flush_go_back_without_traffic_elsewhere(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path, backend: str
) -> None:
    """``kill -9`` while short requests settle on a lease every flush interval: a survivor
    that serves nothing itself must still release the dead process's lease (docs: 60-90 s),
    and what the dead process had written must add up."""
    with temporary_database(request, backend, tmp_path) as url:
        victim = GatewayProcess(config(engine, url), tmp_path).start()
        admin = Admin(victim.url)
        account = admin.account("killed-mid-flush", credits="10")
        key = admin.key(account)["key"]
        admin.close()
        served: dict[str, int] = {}

        async def hammer() -> None:
            async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
                async def loop(j: int) -> None:
                    for i in range(10_000):  # until the kill (the books are read page by page)
                        try:
                            r = await client.post(victim.base_url + "/chat/completions", json={
                                "model": "paid", "max_tokens": 5,
                                "messages": [{"role": "user", "content": f"[tokens:5] {j}-{i}"}]})
                        except httpx.HTTPError:
                            return  # the gateway is gone
                        assert r.status_code == 200, r.text
                        served[r.headers["x-request-id"]] = cost(r.json()["usage"])

                await asyncio.gather(*(loop(j) for j in range(4)))

        def kill_soon() -> None:
            time.sleep(2.0)
            assert victim.proc is not None
            victim.proc.kill()  # SIGKILL: no shutdown, no last flush

        killer = threading.Thread(target=kill_soon)
        killer.start()
        asyncio.run(hammer())
        killer.join()
        if victim.proc is not None:
            victim.proc.wait()
        assert len(served) > 20
        with GatewayProcess(config(engine, url), tmp_path) as survivor:
            admin = Admin(survivor.url)
            try:
                assert Decimal(admin.balance(account)["held"]) > 0  # the dead process's lease
                balance = at_rest(admin, account, timeout=120)
                charged = charged_by_request(admin, account)
            finally:
                admin.close()
    assert set(charged) <= set(served)
    assert all(charged[rid] == served[rid] for rid in charged)  # nothing charged twice or wrong
    assert balance == 10_000_000 - sum(charged.values())
    unbilled = [rid for rid in served if rid not in charged]
    print(f"kill -9 mid-flush ({backend}): {len(served)} served, {len(unbilled)} unbilled")
    # The documented loss is the charges of the last flush interval (0.1 s): a handful of
    # these requests, never most of them.
    assert len(unbilled) < len(served) / 4


def test_two_gateways_racing_one_key_with_grants_in_flight_keep_the_books(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path
) -> None:
    """Two gateways on one PostgreSQL race leases and exact holds for the same key (a spend
    limit below the balance), streams and non-streams mixed, some cut by the client, while
    credits are granted: nothing over the limit, nothing held, every request charged once."""
    with temporary_database(request, "postgresql", tmp_path) as url, \
            GatewayProcess(config(engine, url), tmp_path) as one, GatewayProcess(config(engine, url), tmp_path) as two:
        admin = Admin(one.url)
        try:
            account = admin.account("racer", credits="0.1")
            made = admin.key(account, spend_limit="0.3")
            key = made["key"]
            results: dict[str, tuple[int, int | None]] = {}

            async def race() -> None:
                async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
                    async def call(i: int) -> None:
                        gw = (one, two)[i % 2]
                        body: dict[str, Any] = {"model": "paid", "max_tokens": 30, "messages": [
                            {"role": "user", "content": f"[tokens:30] [chunk_delay:0.005] race {i}"}]}
                        if i % 3:
                            r = await client.post(gw.base_url + "/chat/completions", json=body)
                            results[r.headers["x-request-id"]] = (
                                r.status_code, cost(r.json()["usage"]) if r.status_code == 200 else None)
                            return
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                        async with client.stream("POST", gw.base_url + "/chat/completions", json=body) as resp:
                            rid, seen = resp.headers["x-request-id"], None
                            async for line in resp.aiter_lines():
                                if i % 2 and '"content":"tok5' in line:
                                    break  # cut: billed for what was generated, not known here
                                if '"usage":{' in line:
                                    seen = cost(httpx.Response(200, content=line[6:]).json()["usage"])
                            results[rid] = (resp.status_code, seen)

                    async def grants() -> None:
                        for i in range(10):
                            await asyncio.sleep(0.1)
                            await asyncio.to_thread(admin.grant, account, "0.02", f"race-grant-{i}")

                    await asyncio.gather(grants(), *(call(i) for i in range(120)))

            asyncio.run(race())
            assert {status for status, _ in results.values()} <= {200, 402}
            balance = at_rest(admin, account)
            charged = charged_by_request(admin, account)
            keys = admin.client.get(f"/admin/v1/accounts/{account}/keys").json()["data"]
        finally:
            admin.close()
    served = {rid for rid, (status, _) in results.items() if status == 200}
    assert served and set(charged) <= served
    assert all(charged[rid] == c for rid, (_, c) in results.items() if c is not None)  # each at its price, once
    assert balance == 100_000 + 10 * 20_000 - sum(charged.values())
    spent = micro(next(k for k in keys if k["id"] == made["id"])["spent"])
    assert spent == sum(charged.values()) <= 300_000
