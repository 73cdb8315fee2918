"""Non-streamed answers on the relay path (the default: the engine's chunks folded as they
are) and on the canonical path (``routing.relay: false``: chunks decoded into events), through
two real gateways in front of one test engine: every protocol's body, usage and cost come out
the same on both, and the money is charged once (the books are checked after every test)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

Pair = dict[bool, tuple[GatewayProcess, str, str]]  # relay -> (gateway, key, account)

# Ids, times and signatures are each gateway's own; everything else must match.
_OWN = {"id", "call_id", "created", "created_at", "completed_at", "signature", "system_fingerprint", "tool_use_id"}

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "Time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}


@pytest.fixture(scope="module")
def pair(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    out: Pair = {}
    gateways = []
    try:
        for relay in (True, False):
            work = tmp_path_factory.mktemp(f"nonstreamed-{'relay' if relay else 'canonical'}")
            gw = GatewayProcess({"database": f"sqlite:///{work}/mesh.db", "models": engine_models(engine.base_url),
                                 "routing": {"relay": relay}}, work).start()
            gateways.append(gw)
            admin = Admin(gw.url)
            account = admin.account("nonstreamed", credits="100")
            out[relay] = (gw, admin.key(account)["key"], account)
            admin.close()
        yield out
    finally:
        for gw in gateways:
            gw.stop()


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in _OWN}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def both(pair: Pair, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    answers = []
    for relay in (True, False):
        gw, key, _ = pair[relay]
        r = httpx.post(gw.base_url.removesuffix("/v1") + path, json=body, timeout=30,
                       headers={"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"})
        assert r.status_code == 200, r.text
        answers.append((r.json(), r.headers.get("x-mesh-cost")))
    (relayed, relayed_cost), (canonical, canonical_cost) = answers
    assert relayed_cost is not None and relayed_cost == canonical_cost
    return relayed, canonical


CHAT = {
    "two_tools": {"model": "test-model", "messages": [{"role": "user", "content": "[parallel] weather and time"}],
                  "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]},
    "two_choices_logprobs": {"model": "test-model", "n": 2, "logprobs": True, "top_logprobs": 2,
                             "messages": [{"role": "user", "content": "[tokens:6] count"}]},
    "stop_and_length": {"model": "test-model", "max_tokens": 4, "stop": ["never"],
                        "messages": [{"role": "user", "content": "[tokens:9] count"}]},
    "reasoning": {"model": "test-reasoner", "messages": [{"role": "user", "content": "[tokens:5] think"}]},
}


@pytest.mark.parametrize("name", sorted(CHAT))
def test_chat_completions(pair: Pair, name: str) -> None:
    relayed, canonical = both(pair, "/v1/chat/completions", CHAT[name])
    assert relayed["choices"] and relayed["usage"]["completion_tokens"] > 0
    assert scrub(relayed) == scrub(canonical)


MESSAGES = {
    "tools_with_thinking": {"model": "test-reasoner", "max_tokens": 2048,
                            "thinking": {"type": "enabled", "budget_tokens": 1024},
                            "messages": [{"role": "user", "content": "[parallel] weather and time"}],
                            "tools": [{"name": t["name"], "description": t["description"],
                                       "input_schema": t["parameters"]} for t in (WEATHER, TIME)]},
    "cut_off": {"model": "test-model", "max_tokens": 3,
                "messages": [{"role": "user", "content": "[tokens:9] count"}]},
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_anthropic_messages(pair: Pair, name: str) -> None:
    relayed, canonical = both(pair, "/v1/messages", MESSAGES[name])
    assert relayed["content"] and relayed["usage"]["output_tokens"] > 0
    assert scrub(relayed) == scrub(canonical)


def test_responses(pair: Pair) -> None:
    body = {"model": "test-model", "input": "[tool:get_time] what time is it",
            "tools": [{"type": "function", **WEATHER}, {"type": "function", **TIME}]}
    relayed, canonical = both(pair, "/v1/responses", body)
    assert any(item["type"] == "function_call" and item["name"] == "get_time" for item in relayed["output"])
    assert scrub(relayed) == scrub(canonical)


def test_both_paths_charged_the_same(pair: Pair) -> None:
    spent = []
    for relay in (True, False):
        gw, _, account = pair[relay]
        admin = Admin(gw.url)
        try:
            spent.append(Decimal("100") - Decimal(admin.balance(account)["balance"]))
        finally:
            admin.close()
    assert spent[0] > 0 and spent[0] == spent[1]
