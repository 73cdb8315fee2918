"""Queued streams that end another way than their answer or a hang-up: the request's deadline,
the gateway stopping (gracefully, and past its graceful timeout) and the replica ahead failing,
each on a gateway of its own (``test_queued_streams.py`` has the shared one)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from support.queued import block, chat, events_of, pool, responses_body, settled, streamed, wait_for
from testengine.harness import EngineProcess


@pytest.fixture(scope="module")
def short(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A gateway whose requests have 1.6 s in all (routing.request_timeout)."""
    work = tmp_path_factory.mktemp("queued-deadline")
    engines = [{"type": "openai", "base_url": engine.base_url, "model": "test-model", "name": "solo"}]
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "routing": {"keepalive_interval": 0.2, "request_timeout": 1.6, "max_attempts": 1},
        "models": [{"id": "solo", "context_length": 4096, "pricing": TEST_PRICING, "engines": engines}],
    }
    with GatewayProcess(config, work) as gw:
        admin = Admin(gw.url)
        yield {"gw": gw, "admin": admin}
        admin.close()


@pytest.mark.parametrize("protocol", ["chat", "anthropic", "responses"])
def test_a_request_deadline_past_the_patience_ends_in_the_protocols_error_event(
    short: dict[str, Any], protocol: str,
) -> None:
    gw, admin = short["gw"], short["admin"]
    account = admin.account(f"queued-deadline-{protocol}", credits="10")
    key = admin.key(account)["key"]
    text = "[delay:4] past the deadline"
    if protocol == "chat":
        _, _, lines = streamed(gw.base_url + "/chat/completions", chat("solo", text),
                               {"Authorization": f"Bearer {key}"})
        data = [line.removeprefix("data: ") for _, line in lines if line.startswith("data: ")]
        assert lines[0][1] == ": keep-alive" and len(data) == 1, lines
        message = json.loads(data[0])["error"]["message"]
    elif protocol == "anthropic":
        body = {"model": "solo", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": text}]}
        _, _, lines = streamed(gw.url + "/v1/messages", body, {"x-api-key": key})
        events = events_of(lines)
        names = [name for name, _ in events]
        assert names[0] == "message_start" and names[-1] == "error" and set(names[1:-1]) <= {"ping"}, names
        message = events[-1][1]["error"]["message"]
    else:
        _, _, lines = streamed(gw.base_url + "/responses", responses_body("solo", text),
                               {"Authorization": f"Bearer {key}"})
        events = events_of(lines)
        assert [name for name, _ in events][-1] == "response.failed", events
        message = events[-1][1]["response"]["error"]["message"]
    assert "deadline" in message, message
    after = settled(admin, account, "solo")
    assert (after["held"], after["balance"]) == ("0.000000", "10.000000")


def test_a_gateway_stopped_while_a_stream_is_queued_past_its_patience_answers_it_and_stops(
    engine: EngineProcess, tmp_path: Any,
) -> None:
    engines = [{"type": "openai", "base_url": engine.base_url, "model": "test-model", "name": "solo",
                "capacity": 1}]
    config = {
        "database": f"sqlite:///{tmp_path}/mesh.db",
        "routing": {"keepalive_interval": 0.2, "max_attempts": 1},
        "models": [{"id": "solo", "context_length": 4096, "pricing": TEST_PRICING, "engines": engines}],
    }
    with GatewayProcess(config, tmp_path) as gw:
        admin = Admin(gw.url)
        account = admin.account("stopped-while-queued", credits="10")
        key = admin.key(account)["key"]
        blocker = block(gw, key, 2.5)
        assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
        admin.close()
        got: list[str] = []
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", gw.base_url + "/chat/completions", json=chat("solo", "[tokens:3] queued"),
                          headers={"Authorization": f"Bearer {key}"}) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(lines) == ": keep-alive"
            assert gw.proc is not None
            gw.proc.terminate()  # SIGTERM: a graceful stop, while this one is queued past its patience
            got = [line for line in lines if line]
        blocker.join()
        assert gw.proc.wait(20) in (0, -15), gw.log()  # uvicorn re-raises the SIGTERM once stopped
        assert "Traceback" not in gw.log() and "graceful shutdown exceeded" not in gw.log(), gw.log()
    data = [line.removeprefix("data: ") for line in got if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", got
    with GatewayProcess(config, tmp_path) as again:  # its books, from the database it left
        admin = Admin(again.url)
        after = admin.balance(account)
        admin.close()
    assert after["held"] == "0.000000" and after["balance"] != "10.000000"


def test_a_stream_still_queued_when_the_graceful_stop_runs_out_is_settled_and_the_gateway_stops(
    engine: EngineProcess, tmp_path: Any,
) -> None:
    """uvicorn cancels the requests still running after its graceful timeout (30 s): a
    stream queued past its patience then (not hung up) settles, and the gateway stops."""
    engines = [{"type": "openai", "base_url": engine.base_url, "model": "test-model", "name": "solo",
                "capacity": 1}]
    config = {
        "database": f"sqlite:///{tmp_path}/mesh.db",
        "routing": {"keepalive_interval": 0.5, "max_attempts": 1, "queue_timeout": 120.0},
        "models": [{"id": "solo", "context_length": 4096, "pricing": TEST_PRICING, "engines": engines}],
    }
    with GatewayProcess(config, tmp_path) as gw:
        admin = Admin(gw.url)
        account = admin.account("cancelled-while-queued", credits="10")
        key = admin.key(account, rate_limits={"concurrent": 2})["key"]
        hung = threading.Thread(target=lambda: httpx.post(
            gw.base_url + "/chat/completions", json=chat("solo", "[fault:hang] holds the slot", stream=False),
            headers={"Authorization": f"Bearer {key}"}, timeout=60))
        hung.start()
        assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
        admin.close()
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", gw.base_url + "/chat/completions", json=chat("solo", "[tokens:3] queued"),
                          headers={"Authorization": f"Bearer {key}"}) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(lines) == ": keep-alive"
            assert gw.proc is not None
            gw.proc.terminate()
            got: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):  # cut off when the gateway gives up on it
                got.extend(line for line in lines if line)
        hung.join()
        assert gw.proc.wait(20) in (0, -15), gw.log()
        assert "graceful shutdown exceeded" in gw.log(), gw.log()
    assert set(got) == {": keep-alive"}, got  # cut off, never a half event
    with GatewayProcess(config, tmp_path) as again:
        admin = Admin(again.url)
        after = admin.balance(account)
        admin.close()
    assert after["held"] == "0.000000"


def test_a_replica_failing_ahead_of_a_stream_queued_past_its_patience_leaves_it_well_formed(
    engine: EngineProcess, tmp_path: Any,
) -> None:
    """The request ahead fails on the one replica (its breaker at threshold 1) while a
    stream waits for that replica's slot past its patience: the stream is answered or ends
    in its error event (the routing policy's choice), whole either way, with its books
    balanced."""
    engines = [{"type": "openai", "base_url": engine.base_url, "model": "test-model", "name": "solo",
                "capacity": 1}]
    config = {
        "database": f"sqlite:///{tmp_path}/mesh.db",
        "routing": {"keepalive_interval": 0.2, "max_attempts": 1, "failure_threshold": 1,
                    "breaker_cooldown": 60.0, "health_interval": 60.0},
        "models": [{"id": "solo", "context_length": 4096, "pricing": TEST_PRICING, "engines": engines}],
    }
    with GatewayProcess(config, tmp_path) as gw:
        admin = Admin(gw.url)
        account = admin.account("failing-ahead", credits="10")
        key = admin.key(account, rate_limits={"concurrent": 2})["key"]
        auth = {"Authorization": f"Bearer {key}"}
        ahead = threading.Thread(target=lambda: httpx.post(
            gw.base_url + "/chat/completions", json=chat("solo", "[delay:1.8] [fault:500] fails", stream=False),
            headers=auth, timeout=30))
        ahead.start()
        assert wait_for(lambda: pool(admin, "solo")["in_flight"] == 1)
        _, _, lines = streamed(gw.base_url + "/chat/completions", chat("solo", "[tokens:3] queued"), auth)
        ahead.join()
        assert lines[0][1] == ": keep-alive", lines
        data = [line.removeprefix("data: ") for _, line in lines if line.startswith("data: ")]
        if data[-1] == "[DONE]":
            text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                           for d in data[:-1] if json.loads(d)["choices"])
            assert text.count("tok") == 3, data
        else:
            assert len(data) == 1 and json.loads(data[0])["error"]["message"], data
        after = settled(admin, account, "solo")
        assert after["held"] == "0.000000"
        admin.close()
