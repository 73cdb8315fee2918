"""Red-teaming stream resume (issue 20) through a real gateway process.

Found: a continuation that landed on a worker's replica reported usage nobody judged. The
usage guard judged the replica that *started* the answer (the operator's own, trusted),
so a worker that only ever served continuations could bill the customer any prompt it
liked (100 credits for a five-token prompt) and stayed in rotation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from support.rogue_engine import RogueEngine
from testengine.harness import EngineProcess

TOKEN = "worker-token-resume-liar-0123456789abcdef"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str, str]]:
    """``solo``: one replica of the operator's own (workers may join it); ``pair`` and
    ``pair-reasoner``: two, so a dropped stream resumes on the other."""
    work = tmp_path_factory.mktemp("resume-redteam")
    with EngineProcess(models="test-model,test-reasoner", name="own-0") as own, \
            EngineProcess(models="test-model,test-reasoner", name="own-1") as other:
        def engine(e: EngineProcess, model: str = "test-model") -> dict[str, Any]:
            return {"type": "openai", "base_url": e.base_url, "model": model, "name": f"{e.name}-{model}"}

        config = {
            "database": f"sqlite:///{work}/mesh.db",
            "billing": {"leases": False},
            "routing": {"health_interval": 0.2},
            "workers": {"tokens": [{"name": "liar", "token": TOKEN, "models": ["solo"]}],
                        "heartbeat_interval": 0.5, "dead_after": 30, "sync_interval": 0.2},
            "models": [
                {"id": "solo", "context_length": 4096, "pricing": TEST_PRICING,
                 # No usage until the end (llama.cpp's server, or continuous_usage off): a
                 # resumed answer's prompt count is then the continuation's.
                 "engines": [{**engine(own), "continuous_usage": False}],
                 "allow_workers": True},
                {"id": "pair", "context_length": 4096, "pricing": TEST_PRICING,
                 "engines": [engine(own), engine(other)]},
                {"id": "pair-reasoner", "context_length": 4096, "pricing": TEST_PRICING, "reasoning": True,
                 "engines": [engine(own, "test-reasoner"), engine(other, "test-reasoner")]},
            ],
        }
        with GatewayProcess(config, work) as gateway:
            admin = Admin(gateway.url)
            account = admin.account("victim", credits="100")
            key = admin.key(account)["key"]
            admin.close()
            yield gateway, key, account


def replicas(gateway: GatewayProcess, model: str = "solo") -> list[dict[str, Any]]:
    data = httpx.get(gateway.url + "/admin/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    found: list[dict[str, Any]] = next(m for m in data["data"] if m["id"] == model)["replicas"]
    return found


def wait_for(check: Any, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_worker_serving_the_continuation_cannot_bill_the_prompt_again(
    gw: tuple[GatewayProcess, str, str],
) -> None:
    gateway, key, account = gw
    admin = Admin(gateway.url)
    with RogueEngine() as liar:
        # It refuses fresh requests (so the operator's replica starts the answer) and answers
        # the continuation with usage that cannot be true: 100 million prompt tokens.
        liar.behaviour.continuations_only = True
        liar.behaviour.usage = {"prompt_tokens": 100_000_000, "completion_tokens": 5}
        r = httpx.post(gateway.url + "/workers/v1/replicas", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"model": "solo", "engine_url": liar.base_url, "engine_model": "test-model"})
        assert r.status_code == 201, r.text
        try:
            wait_for(lambda: sum(x["healthy"] for x in replicas(gateway)) == 2, "the worker never joined")
            before = Decimal(admin.balance(account)["balance"])
            text = ""
            body = {"model": "solo", "stream": True, "max_tokens": 50,
                    "messages": [{"role": "user", "content": "[tokens:24] [fault:drop] hi"}]}
            with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status_code == 200
                text = resp.read().decode()
            assert "tok0" in text and '"hi"' in text  # the operator's replica, then the worker's continuation
            wait_for(lambda: Decimal(admin.balance(account)["held"]) == 0, "the hold was never released")
            spent = before - Decimal(admin.balance(account)["balance"])
            # A short prompt and 8 output tokens at 1 and 2 credits per million; the liar
            # claimed 100 million prompt tokens (100 credits).
            assert Decimal(0) < spent < Decimal("0.001"), spent
            wait_for(lambda: not any(x["healthy"] for x in replicas(gateway) if not x["name"].startswith("own-")),
                     "the liar stayed in rotation")
        finally:
            httpx.delete(f"{gateway.url}/workers/v1/replicas/{r.json()['id']}",
                         headers={"Authorization": f"Bearer {TOKEN}"})
            admin.close()


WIRE = {  # path, body for a prompt: streamed, with usage asked for where the protocol asks
    "chat": ("/v1/chat/completions", lambda p: {"stream": True, "stream_options": {"include_usage": True},
                                                "messages": [{"role": "user", "content": p}]}),
    "responses": ("/v1/responses", lambda p: {"stream": True, "input": p}),
    "messages": ("/v1/messages", lambda p: {"stream": True, "max_tokens": 300,
                                            "messages": [{"role": "user", "content": p}]}),
}
INDEXES = ("index", "output_index", "content_index", "summary_index", "sequence_number", "type")


def wire(gateway: GatewayProcess, key: str, protocol: str, model: str, prompt: str) -> list[dict[str, Any]]:
    """The stream's events as the client got them: JSON data lines, and a {"done": True} for
    chat's [DONE]."""
    path, body = WIRE[protocol]
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", gateway.url + path, json={"model": model, **body(prompt)}, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                events.append({"done": True})
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def shape(protocol: str, events: list[dict[str, Any]]) -> list[Any]:
    """What a client's state machine reads of each event: its kind, indexes and sequence
    numbers, whether it carries a role, a finish or usage (not ids, texts or counts)."""
    out: list[Any] = []
    for ev in events:
        if protocol == "chat":
            if "done" in ev:
                out.append("[DONE]")
                continue
            assert "error" not in ev, ev
            out.append((tuple((c["index"], "role" in c["delta"], c["finish_reason"]) for c in ev["choices"]),
                        ev.get("usage") is not None))
        else:
            out.append(tuple(ev.get(k) for k in INDEXES))
    return out


def ids(protocol: str, events: list[dict[str, Any]]) -> set[str]:
    if protocol == "chat":
        return {ev["id"] for ev in events if "id" in ev}
    if protocol == "responses":
        return {ev["response"]["id"] for ev in events if "response" in ev}
    return {ev["message"]["id"] for ev in events if ev["type"] == "message_start"}


@pytest.mark.parametrize("model", ["pair", "pair-reasoner"])
@pytest.mark.parametrize("protocol", ["chat", "responses", "messages"])
def test_a_resumed_stream_is_event_for_event_the_stream_an_uninterrupted_run_gives(
    gw: tuple[GatewayProcess, str, str], protocol: str, model: str,
) -> None:
    gateway, key, _ = gw
    clean = wire(gateway, key, protocol, model, f"[tokens:12] think it over wire-{protocol}")
    resumed = wire(gateway, key, protocol, model, f"[tokens:12] think it over [fault:drop] wire-{protocol}")
    assert shape(protocol, resumed) == shape(protocol, clean)  # no second start, role, usage or [DONE]
    assert len(ids(protocol, resumed)) == 1
    if protocol == "responses":
        assert [ev["sequence_number"] for ev in resumed] == list(range(len(resumed)))
