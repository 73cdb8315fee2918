"""Streams whose route outlasts the queue patience (1 s), against real processes.

A stream routes in its request's own task; past the patience its response starts from a
task of its own (the head, then keep-alives, or Anthropic's ``message_start`` and pings)
while the route goes on. These check what a client sees then, and that a hang-up at any
point of it gives everything back (the per-test ``support.books`` check runs on top).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from support.queued import (
    PATIENCE,
    Lines,
    block,
    chat,
    events_of,
    pool,
    responses_body,
    settled,
    sse,
    streamed,
    wait_for,
)
from testengine.harness import EngineProcess


@pytest.fixture(scope="module")
def qs(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("queued-streams")

    def model(model_id: str, **target: Any) -> dict[str, Any]:
        engines = [{"type": "openai", "base_url": engine.base_url, "model": "test-model", "name": model_id, **target}]
        return {"id": model_id, "context_length": 4096, "pricing": TEST_PRICING, "engines": engines}

    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "routing": {"keepalive_interval": 0.2, "queue_timeout": 10.0, "max_attempts": 1},
        "models": [
            model("solo", capacity=1), model("slowfail", first_token_timeout=1.6),
            # Past the patience, cheap's replica times out and dear serves it: a re-hold at
            # dear's price that an account with little credit cannot cover.
            {**model("cheap", first_token_timeout=1.2), "fallbacks": ["dear"],
             "pricing": {"input": "0.01", "cached_input": "0.01", "output": "0.01"}},
            {**model("dear"), "pricing": {"input": "1000000", "cached_input": "1000000", "output": "1000000"}},
        ],
    }
    with GatewayProcess(config, work) as gw:
        admin = Admin(gw.url)
        yield {"gw": gw, "admin": admin, "engine": engine}
        admin.close()


def test_a_stream_queued_past_its_patience_gets_keepalives_then_its_answer_with_the_same_headers(
    qs: dict[str, Any],
) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-ok", credits="10")
    key = admin.key(account, rate_limits={"rpm": 100})["key"]
    auth = {"Authorization": f"Bearer {key}"}
    url = gw.base_url + "/chat/completions"
    immediate, _, quick = streamed(url, chat("solo", "[tokens:3] at once"), auth)
    assert quick[0][1].startswith("data: ")  # within its patience: no keep-alive
    blocker = block(gw, key, 2.5)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    queued, head_at, lines = streamed(url, chat("solo", "[tokens:3] after the blocker"), auth)
    blocker.join()
    first_data = next(at for at, line in lines if line.startswith("data: "))
    # The head went out at the patience, well before the route ended (the blocker's end).
    assert PATIENCE - 0.1 < head_at < first_data - 0.5, (head_at, first_data)
    comments = [line for at, line in lines if line.startswith(":")]
    assert lines[0][1] == ": keep-alive" and len(comments) >= 3  # every 0.2 s while queued
    assert all(not line.startswith(":") for at, line in lines if at >= first_data)  # none once it flows
    data = [line.removeprefix("data: ") for _, line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.count("tok") == 3
    # Exactly the headers of a stream answered within its patience, the request ids included.
    assert list(queued.keys()) == list(immediate.keys())
    for name in ("content-type", "cache-control", "x-accel-buffering", "x-ratelimit-limit-requests"):
        assert queued[name] == immediate[name], name
    rid = queued["x-request-id"]
    assert rid and queued["request-id"] == rid != immediate["x-request-id"]
    assert chunks[0]["id"] == "chatcmpl-" + rid.removeprefix("req_")
    after = settled(admin, account, "solo")
    assert after["held"] == "0.000000"


def test_a_stream_whose_route_fails_past_its_patience_ends_in_the_protocols_error_event(
    qs: dict[str, Any],
) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-fails", credits="10")
    key = admin.key(account)["key"]
    headers, head_at, lines = streamed(gw.base_url + "/chat/completions", chat("slowfail", "[delay:4] too slow"),
                                       {"Authorization": f"Bearer {key}"})
    assert head_at < 1.5  # 200 and its head at the patience; the first-token timeout at 1.6 s
    assert lines[0][1] == ": keep-alive"
    data = [line.removeprefix("data: ") for _, line in lines if line.startswith("data: ")]
    assert len(data) == 1 and "[DONE]" not in data, data
    error = json.loads(data[0])["error"]
    assert error["type"] and error["message"], error
    assert headers["x-request-id"] == headers["request-id"]
    after = settled(admin, account, "slowfail")
    assert (after["held"], after["balance"]) == ("0.000000", "10.000000")  # released, nothing charged


def test_a_hang_up_while_queued_past_the_patience_leaves_the_queue_at_once(qs: dict[str, Any]) -> None:
    gw, admin, engine = qs["gw"], qs["admin"], qs["engine"]
    account = admin.account("queued-hang-up", credits="10")
    key = admin.key(account, rate_limits={"concurrent": 2})["key"]
    auth = {"Authorization": f"Bearer {key}"}
    requests = engine.stats()["requests"]
    blocker = block(gw, key, 3.0)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", gw.base_url + "/chat/completions", json=chat("solo", "queued"), headers=auth) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: a generator dropped here would close the connection
        assert next(lines) == ": keep-alive"
        assert pool(admin, "solo") == {"in_flight": 1, "queued": 1}
    # Heard while still queued: the route is cancelled then, not when the blocker ends.
    assert wait_for(lambda: pool(admin, "solo")["queued"] == 0, timeout=1.0)
    assert blocker.is_alive()
    blocker.join()
    after = settled(admin, account, "solo")
    assert after["held"] == "0.000000"
    assert engine.stats()["requests"] == requests + 1  # the queued one never reached the engine
    # Its concurrency slot came back as well: two at once are not refused.
    r = httpx.post(gw.base_url + "/chat/completions", json=chat("solo", "[tokens:2] next", stream=False),
                   headers=auth, timeout=30)
    assert r.status_code == 200


def test_a_hang_up_before_the_patience_ends_the_queued_route_at_the_patience(qs: dict[str, Any]) -> None:
    gw, admin, engine = qs["gw"], qs["admin"], qs["engine"]
    account = admin.account("early-hang-up", credits="10")
    key = admin.key(account)["key"]
    requests = engine.stats()["requests"]
    blocker = block(gw, key, 3.0)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    raw = json.dumps(chat("solo", "gone at once")).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {gw.url[7:]}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
    sent = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(head + raw)
        assert wait_for(lambda: pool(admin, "solo")["queued"] == 1)
    assert wait_for(lambda: pool(admin, "solo")["queued"] == 0, timeout=2.5)
    assert time.monotonic() - sent < 2.5 and blocker.is_alive()  # at the patience, not the blocker's end
    blocker.join()
    after = settled(admin, account, "solo")
    assert after["held"] == "0.000000"
    assert engine.stats()["requests"] == requests + 1


def test_an_anthropic_stream_queued_past_its_patience_gets_message_start_and_pings_first(
    qs: dict[str, Any],
) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-anthropic", credits="10")
    key = admin.key(account)["key"]
    url = gw.url + "/v1/messages"
    body = {"model": "solo", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "[tokens:3] hi"}]}
    immediate, _, quick = streamed(url, body, {"x-api-key": key})
    assert [name for _, name in sse(quick)][:2] == ["message_start", "content_block_start"]
    blocker = block(gw, key, 2.5)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    queued, head_at, lines = streamed(url, body, {"x-api-key": key})
    blocker.join()
    events = sse(lines)
    names = [name for _, name in events]
    assert names[0] == "message_start"
    first_block = names.index("content_block_start")
    assert names[1:first_block].count("ping") >= 3, names  # every 0.2 s idle while queued
    assert events[0][0] < events[first_block][0] - 0.5  # message_start went out long before the answer
    assert PATIENCE - 0.1 < head_at < events[first_block][0] - 0.5
    assert names[-2:] == ["message_delta", "message_stop"]
    assert list(queued.keys()) == list(immediate.keys())
    assert queued["request-id"] == queued["x-request-id"] != immediate["request-id"]
    start = json.loads(next(line[6:] for _, line in lines if line.startswith("data: ")))
    assert start["message"]["id"] == "msg_" + queued["request-id"].removeprefix("req_")
    assert settled(admin, account, "solo")["held"] == "0.000000"


# -- red team: every protocol, every way a queued stream can end ------------------------------


def test_an_anthropic_stream_whose_route_fails_past_its_patience_ends_in_an_error_event(qs: dict[str, Any]) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-anthropic-fails", credits="10")
    key = admin.key(account)["key"]
    body = {"model": "slowfail", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "[delay:4] too slow"}]}
    headers, _, lines = streamed(gw.url + "/v1/messages", body, {"x-api-key": key})
    events = events_of(lines)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "error", names
    assert set(names[1:-1]) <= {"ping"}, names  # nothing but pings between: no block, no message_stop
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["message"], events[-1]
    assert headers["request-id"] == headers["x-request-id"]
    after = settled(admin, account, "slowfail")
    assert (after["held"], after["balance"]) == ("0.000000", "10.000000")


def test_a_responses_stream_queued_past_its_patience_gets_keepalives_then_its_answer(qs: dict[str, Any]) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-responses", credits="10")
    key = admin.key(account)["key"]
    auth = {"Authorization": f"Bearer {key}"}
    url = gw.base_url + "/responses"
    immediate, _, _ = streamed(url, responses_body("solo", "[tokens:3] at once"), auth)
    blocker = block(gw, key, 2.0)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    queued, _, lines = streamed(url, responses_body("solo", "[tokens:3] after the blocker"), auth)
    blocker.join()
    assert lines[0][1] == ": keep-alive", lines[:3]
    names = [name for name, _ in events_of(lines)]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed", names
    final = events_of(lines)[-1][1]["response"]
    assert final["status"] == "completed" and final["id"] == "resp_" + queued["x-request-id"].removeprefix("req_")
    assert list(queued.keys()) == list(immediate.keys())
    assert settled(admin, account, "solo")["held"] == "0.000000"


def test_a_responses_stream_whose_route_fails_past_its_patience_ends_in_response_failed(
    qs: dict[str, Any],
) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-responses-fails", credits="10")
    key = admin.key(account)["key"]
    _, _, lines = streamed(gw.base_url + "/responses", responses_body("slowfail", "[delay:4] too slow"),
                           {"Authorization": f"Bearer {key}"})
    assert lines[0][1] == ": keep-alive"
    events = events_of(lines)
    assert [name for name, _ in events] == ["response.created", "response.in_progress", "response.failed"], events
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"], failed
    after = settled(admin, account, "slowfail")
    assert (after["held"], after["balance"]) == ("0.000000", "10.000000")


def test_a_fallback_whose_re_hold_fails_past_the_patience_ends_in_the_error_event(qs: dict[str, Any]) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-rehold", credits="10")
    key = admin.key(account)["key"]
    body = {**chat("cheap", "[delay:1.5] [tokens:3] served by the dear one"), "max_tokens": 20}
    _, _, lines = streamed(gw.base_url + "/chat/completions", body, {"Authorization": f"Bearer {key}"})
    assert lines[0][1] == ": keep-alive"
    data = [line.removeprefix("data: ") for _, line in lines if line.startswith("data: ")]
    assert len(data) == 1 and "[DONE]" not in data, data
    error = json.loads(data[0])["error"]
    assert "credits" in error["message"].lower(), error
    assert wait_for(lambda: pool(admin, "dear") == {"in_flight": 0, "queued": 0}), pool(admin, "dear")
    after = settled(admin, account, "cheap")
    assert after["held"] == "0.000000"


def test_a_hang_up_after_message_start_while_queued_leaves_the_queue(qs: dict[str, Any]) -> None:
    gw, admin, engine = qs["gw"], qs["admin"], qs["engine"]
    account = admin.account("queued-anthropic-hang-up", credits="10")
    key = admin.key(account, rate_limits={"concurrent": 2})["key"]
    requests = engine.stats()["requests"]
    blocker = block(gw, key, 3.0)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    body = {"model": "solo", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "[tokens:3] queued"}]}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", gw.url + "/v1/messages", json=body, headers={"x-api-key": key}) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines) == "event: message_start"
        assert next(lines).startswith("data: ")
        assert [next(lines) for _ in range(3)] == ["", "event: ping", 'data: {"type":"ping"}']
        assert pool(admin, "solo") == {"in_flight": 1, "queued": 1}
    assert wait_for(lambda: pool(admin, "solo")["queued"] == 0, timeout=1.0)
    assert blocker.is_alive()
    blocker.join()
    assert settled(admin, account, "solo")["held"] == "0.000000"
    assert engine.stats()["requests"] == requests + 1
    r = httpx.post(gw.base_url + "/chat/completions", json=chat("solo", "[tokens:2] next", stream=False),
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200  # its concurrency slot came back


@pytest.mark.parametrize("protocol", ["chat", "anthropic"])
def test_a_hang_up_after_the_first_token_of_a_queued_stream_settles_it(qs: dict[str, Any], protocol: str) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account(f"queued-first-token-{protocol}", credits="10")
    key = admin.key(account, rate_limits={"concurrent": 2})["key"]
    blocker = block(gw, key, 1.8)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    text = "[tokens:40] [chunk_delay:0.1] long"
    if protocol == "chat":
        url, headers = gw.base_url + "/chat/completions", {"Authorization": f"Bearer {key}"}
        body, token = chat("solo", text), "tok"
    else:
        url, headers = gw.url + "/v1/messages", {"x-api-key": key}
        body = {"model": "solo", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": text}]}
        token = "text_delta"
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body, headers=headers) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: a generator dropped here would close the connection
        assert any(token in line for line in lines)
        assert pool(admin, "solo")["in_flight"] == 1  # this one, streaming
    blocker.join()
    after = settled(admin, account, "solo")
    assert after["held"] == "0.000000" and after["balance"] != "10.000000"  # it paid for what it got
    r = httpx.post(gw.base_url + "/chat/completions", json=chat("solo", "[tokens:2] next", stream=False),
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200


def test_two_streams_queued_past_the_patience_at_once_both_get_their_answers(qs: dict[str, Any]) -> None:
    gw, admin = qs["gw"], qs["admin"]
    account = admin.account("queued-two", credits="10")
    key = admin.key(account)["key"]
    blocker = block(gw, key, 1.5)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    results: dict[str, Lines] = {}

    def one(name: str) -> None:
        if name == "chat":
            _, _, results[name] = streamed(gw.base_url + "/chat/completions", chat("solo", "[tokens:3] one"),
                                           {"Authorization": f"Bearer {key}"})
        else:
            body = {"model": "solo", "max_tokens": 50, "stream": True,
                    "messages": [{"role": "user", "content": "[tokens:3] two"}]}
            _, _, results[name] = streamed(gw.url + "/v1/messages", body, {"x-api-key": key})

    threads = [threading.Thread(target=one, args=(name,)) for name in ("chat", "anthropic")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    blocker.join()
    chat_lines = [line for _, line in results["chat"]]
    assert chat_lines[0] == ": keep-alive" and chat_lines[-1] == "data: [DONE]", chat_lines
    names = [name for name, _ in events_of(results["anthropic"])]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert names.count("content_block_delta") == 3
    assert settled(admin, account, "solo")["held"] == "0.000000"


def test_hang_ups_around_the_patience_give_everything_back(qs: dict[str, Any]) -> None:
    """A client gone a little before, at or a little after the patience, while queued."""
    gw, admin, engine = qs["gw"], qs["admin"], qs["engine"]
    account = admin.account("hang-up-around-patience", credits="10")
    key = admin.key(account, rate_limits={"concurrent": 2})["key"]
    requests = engine.stats()["requests"]
    blocker = block(gw, key, 10.0)
    assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
    for path, body in (("/v1/chat/completions", chat("solo", "gone")),
                       ("/v1/messages", {"model": "solo", "max_tokens": 50, "stream": True,
                                         "messages": [{"role": "user", "content": "gone"}]})):
        raw = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {gw.url[7:]}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
        for after in (0.95, 1.0, 1.05):
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(head + raw)
                time.sleep(after)
            assert wait_for(lambda: pool(admin, "solo")["queued"] == 0, timeout=2.0), (path, after)
    assert blocker.is_alive()  # every one heard before the blocker's end
    blocker.join()
    assert settled(admin, account, "solo")["held"] == "0.000000"
    assert engine.stats()["requests"] == requests + 1
    r = httpx.post(gw.base_url + "/chat/completions", json=chat("solo", "[tokens:2] next", stream=False),
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200
