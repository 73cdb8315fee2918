"""Every resource a request takes comes back on every path, against real processes.

One test engine and one gateway per database (SQLite, PostgreSQL). Clients hang up at
each point of a request's life (right after sending it, while it is queued, while it
waits for its first token, after it); breaker probes are poisoned; engines stall after
their first token; requests outlive their deadline. After each: no credit held, no
replica slot, queue place or concurrency slot taken (and the per-test invariant check of
``support.books`` runs on top).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

CONTEXT = 4096


@pytest.fixture(scope="module")
def lc_engine() -> Iterator[EngineProcess]:
    with EngineProcess(models="test-model", name="lifecycle") as proc:
        yield proc


# Streams take the relay path (the default) on both databases, and the canonical path
# (routing.relay: false) once: hang-ups, stalls and deadlines must end the same on both.
@pytest.fixture(
    scope="module",
    params=[("sqlite", True), ("postgresql", True), ("sqlite", False)],
    ids=["sqlite-relay", "postgresql-relay", "sqlite-canonical"],
)
def lc(
    request: pytest.FixtureRequest, lc_engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    backend, relay = request.param
    work = tmp_path_factory.mktemp(f"lifecycle-{backend}")

    def model(model_id: str, **engine: Any) -> dict[str, Any]:
        target = {"type": "openai", "base_url": lc_engine.base_url, "model": "test-model", "name": model_id}
        return {"id": model_id, "context_length": CONTEXT, "pricing": TEST_PRICING, "engines": [{**target, **engine}]}

    with temporary_database(request, backend, work) as url:
        config = {
            "database": url,
            "routing": {
                "health_interval": 2.0, "breaker_cooldown": 0.3, "failure_threshold": 2, "queue_timeout": 3.0,
                "keepalive_interval": 0.2, "request_timeout": 4.0, "relay": relay,
            },
            "models": [
                model("cap3", capacity=3),
                model("plain"),
                model("probed"),
                model("stally", read_timeout=0.5),
            ],
        }
        with GatewayProcess(config, work) as gw:
            admin = Admin(gw.url)
            yield {"gw": gw, "admin": admin, "engine": lc_engine}
            admin.close()


def chat(model: str, content: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}], **extra}


def post(gw: GatewayProcess, key: str, body: dict[str, Any], path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(gw.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def replica(admin: Admin, model: str) -> dict[str, Any]:
    data = admin.client.get("/admin/v1/models").json()["data"]
    pool = next(m for m in data if m["id"] == model)
    found: dict[str, Any] = pool["replicas"][0]
    return {**found, "queued": pool["queued"]}


def settled(admin: Admin, account: str, model: str, timeout: float = 5.0) -> dict[str, Any]:
    """The account once everything is written, after the model's slots came back (or not)."""
    deadline = time.monotonic() + timeout
    while True:
        r = replica(admin, model)
        if (r["in_flight"] == 0 and r["queued"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    admin.client.post("/admin/v1/flush").raise_for_status()
    return {**admin.balance(account), "in_flight": r["in_flight"], "queued": r["queued"]}


def hang_up(gw: GatewayProcess, key: str, body: dict[str, Any], *, after: str) -> list[str]:
    """Send ``body`` and close the connection: at once (``sent``), at the first keep-alive
    (``keepalive``), or at the first content (``content``). Returns the lines read."""
    if after == "sent":
        raw = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {gw.url[7:]}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(head + raw)
        return []
    lines: list[str] = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", gw.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            lines.append(line)
            if after == "keepalive" and line.startswith(":"):
                break
            if after == "content" and '"content":"tok' in line.replace(" ", ""):
                break
    return lines


def test_three_hang_ups_before_the_first_token_leave_nothing_held_and_the_model_serving(
    lc: dict[str, Any],
) -> None:
    gw, admin, engine = lc["gw"], lc["admin"], lc["engine"]
    account = admin.account("hang-ups", credits="0.05")
    key = admin.key(account)["key"]
    cancelled = engine.stats()["cancelled"]
    # The first token takes 3 s, longer than the queue patience (1 s): each response starts
    # with keep-alives while routing goes on, and its client hangs up there.
    with ThreadPoolExecutor(3) as pool:
        done = list(pool.map(lambda i: hang_up(gw, key, chat("cap3", f"[delay:3] {i}", stream=True),
                                               after="keepalive"), range(3)))
    assert all(lines and lines[-1].startswith(":") for lines in done)
    after = settled(admin, account, "cap3")
    assert (after["in_flight"], after["queued"], after["held"]) == (0, 0, "0.000000")
    assert after["balance"] == "0.050000"  # nothing was generated, nothing is charged
    deadline = time.monotonic() + 5
    while engine.stats()["cancelled"] < cancelled + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["cancelled"] >= cancelled + 3  # the engine stopped working on them
    # Capacity 3 serves three more at once (a leak would queue them into 503s).
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda i: post(gw, key, chat("cap3", f"[tokens:2] {i}")), range(3)))
    assert [a.status_code for a in answers] == [200, 200, 200]


POINTS = ["sent", "queued", "before_first_token", "after_first_token"]


@pytest.mark.parametrize("point", POINTS)
def test_a_client_that_hangs_up_leaves_no_hold_slot_or_concurrency(lc: dict[str, Any], point: str) -> None:
    gw, admin = lc["gw"], lc["admin"]
    account = admin.account(f"hang-up-{point}", credits="1")
    key = admin.key(account, rate_limits={"concurrent": 1})["key"]
    blockers: list[threading.Thread] = []
    if point == "queued":
        other = admin.key(admin.account("blocker", credits="1"))["key"]
        blockers = [threading.Thread(target=post, args=(gw, other, chat("cap3", f"[delay:2] {i}"))) for i in range(3)]
        for t in blockers:
            t.start()
        deadline = time.monotonic() + 5
        while replica(admin, "cap3")["in_flight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    body = {
        "sent": chat("cap3", "[delay:0.3] hang up at once", stream=True),
        "queued": chat("cap3", "queued behind three", stream=True),
        "before_first_token": chat("cap3", "[delay:3] slow start", stream=True),
        "after_first_token": chat("cap3", "[tokens:400] [chunk_delay:0.02] long", stream=True),
    }[point]
    if point == "queued":
        assert replica(admin, "cap3")["in_flight"] == 3
    hang_up(gw, key, body, after={"sent": "sent", "after_first_token": "content"}.get(point, "keepalive"))
    for t in blockers:
        t.join()
    after = settled(admin, account, "cap3")
    assert (after["in_flight"], after["queued"], after["held"]) == (0, 0, "0.000000"), after
    if point == "after_first_token":
        assert after["balance"] < "1.000000"  # what was generated is paid for
    elif point != "sent":
        assert after["balance"] == "1.000000"  # nothing was generated
    # The key's one concurrency slot came back: the next request is not a 429.
    assert post(gw, key, chat("cap3", "[tokens:2] next")).status_code == 200


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_a_poisoned_half_open_probe_leaves_the_replica_back_in_rotation(lc: dict[str, Any]) -> None:
    gw, admin = lc["gw"], lc["admin"]
    key = admin.key(admin.account("probe", credits="1"))["key"]
    poison = chat("probed", "poison", tools=[{"type": "function", "function": {
        "name": "deep", "description": "too deep to encode", "parameters": nested_schema(300)}}])
    for _ in range(5):  # a health check may close the breaker first; then open it again
        for i in range(2):  # the threshold: two failures the replica is blamed for
            assert post(gw, key, chat("probed", f"[fault:502] {i}")).status_code == 502
        assert replica(admin, "probed")["breaker"] == "open"
        time.sleep(0.35)  # the cooldown: the next request is the half-open probe
        answer = post(gw, key, poison)
        state = replica(admin, "probed")
        if state["breaker"] == "half_open":
            break
    else:
        pytest.fail("never caught the breaker half-open")
    # The gateway could not encode the request: a 400 in OpenAI's shape, not a 500...
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"
    # ...and the probe went back: the replica may be probed again...
    assert state["healthy"] is True, state
    # ...so the next passing health check (every 2 s) puts it back in rotation.
    deadline = time.monotonic() + 6
    while replica(admin, "probed")["breaker"] != "closed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert replica(admin, "probed")["breaker"] == "closed"
    assert post(gw, key, chat("probed", "[tokens:2] back")).status_code == 200


def test_count_tokens_counts_against_the_rate_limit_and_has_a_size_cap(lc: dict[str, Any]) -> None:
    gw, admin = lc["gw"], lc["admin"]
    account = admin.account("counter", credits="1")
    limited = admin.key(account, rate_limits={"rpm": 2})["key"]
    body = {"model": "plain", "messages": [{"role": "user", "content": "count me"}]}
    answers = [post(gw, limited, body, "/messages/count_tokens") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].json()["input_tokens"] > 0
    assert answers[0].headers["anthropic-ratelimit-requests-limit"] == "2"
    refused = answers[2]
    assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1
    # The same limit covers the inference endpoint: the key's minute is spent.
    assert post(gw, limited, chat("plain", "[tokens:1] one more")).status_code == 429
    free = admin.key(account)["key"]
    huge = {"model": "plain", "messages": [{"role": "user", "content": "word " * (CONTEXT * 4)}]}
    refused = post(gw, free, huge, "/messages/count_tokens")
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert "too long" in refused.json()["error"]["message"]


def test_an_engine_that_stalls_after_one_token_leaves_rotation(lc: dict[str, Any]) -> None:
    gw, admin = lc["gw"], lc["admin"]
    account = admin.account("stalls", credits="1")
    key = admin.key(account)["key"]
    # Not streamed: a 504, and nothing is charged (the client got nothing but the error).
    timed_out = post(gw, key, chat("stally", "[stall:1] [tokens:5] one"))
    assert timed_out.status_code == 504, timed_out.text
    assert replica(admin, "stally")["breaker"] == "closed"  # one timeout of two
    time.sleep(2.3)  # a health check passes meanwhile: it must not clear the count
    assert replica(admin, "stally")["breaker"] == "closed"
    lines = hang_up(gw, key, chat("stally", "[stall:1] [tokens:5] two", stream=True), after="end")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert any("error" in e for e in events), lines  # the stream ended with the error event
    assert replica(admin, "stally")["breaker"] == "open"
    after = settled(admin, account, "stally")
    assert after["held"] == "0.000000"
    delivered = 1_000_000 - int(after["balance"].replace(".", ""))
    assert 0 < delivered < 100  # the streamed one pays for its prompt and its one token


def test_a_request_past_its_deadline_is_a_504_that_bills_only_what_was_delivered(lc: dict[str, Any]) -> None:
    gw, admin = lc["gw"], lc["admin"]
    account = admin.account("deadline", credits="1")
    key = admin.key(account)["key"]
    long = "[tokens:200] [chunk_delay:0.05] long"  # 10 s; the deadline is 4 s
    answer = post(gw, key, chat("plain", long))
    assert answer.status_code == 504, answer.text
    assert "deadline" in answer.json()["error"]["message"]
    assert settled(admin, account, "plain")["balance"] == "1.000000"
    lines = hang_up(gw, key, chat("plain", long, stream=True), after="end")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "deadline" in events[-1]["error"]["message"]
    streamed = sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content"))
    assert 10 < streamed < 200
    after = settled(admin, account, "plain")
    paid = 1_000_000 - int(after["balance"].replace(".", ""))
    assert paid >= streamed * 2  # 2 micro-credits per output token: every delivered token
    assert paid < 200 * 2 + 100  # not the whole answer
