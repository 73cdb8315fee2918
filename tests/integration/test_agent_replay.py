"""Agent sessions keep their replica: a replay of coding-agent traffic through two gateways.

Ten agent sessions of twenty turns each (a ~4,000-character preamble of system prompt and
tools, a history that grows by a tool call, its result and a new instruction per turn)
run interleaved, each turn through one of two gateway processes that share PostgreSQL and
Redis, over three test-engine replicas. Each replica imitates vLLM's prefix cache and
reports the cached part of each prompt, so the hit rate shows in ``GET /v1/usage`` and in
``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from support.postgres import temporary_database
from support.redis import require_redis, unique_prefix
from testengine.harness import EngineProcess

SESSIONS = 10
TURNS = 20
RULES = "\n".join(f"{i}. Keep edits small, run the tests, and explain each change briefly." for i in range(1, 56))
TOOLS = [
    {"type": "function", "function": {"name": "Bash", "description": "Run a shell command in the repository.",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
    {"type": "function", "function": {"name": "Read", "description": "Read a file.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]


@pytest.fixture(scope="module")
def replay_fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[GatewayProcess], list[EngineProcess], str]]:
    work = tmp_path_factory.mktemp("replay")
    redis_url = require_redis(request)
    replicas = [EngineProcess(models="test-model", name=f"replica-{i}", max_model_len=32768) for i in range(3)]
    for r in replicas:
        r.start()
    try:
        with temporary_database(request, "postgresql", work) as url:
            config = {
                "database": url,
                "redis": redis_url,
                "redis_prefix": unique_prefix(),
                "billing": {"usage_flush_interval": 0.05},
                "models": [{
                    "id": "agent-model", "context_length": 32768, "pricing": TEST_PRICING,
                    "engines": [{"type": "openai", "base_url": r.base_url, "model": "test-model", "name": r.name}
                                for r in replicas],
                }],
            }
            with GatewayProcess(config, work) as a, GatewayProcess(config, work) as b:
                admin = Admin(a.url)
                key = admin.key(admin.account("agents", credits="1000"))["key"]
                admin.close()
                yield [a, b], replicas, key
    finally:
        for r in replicas:
            r.stop()


async def _session(s: int, clients: list[httpx.AsyncClient]) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = [
        {"role": "system", "content": f"You are a coding agent.\n{RULES}"},
        {"role": "user", "content": f"[tokens:12] session {s} turn 0: fix the failing test"},
    ]
    usages = []
    for turn in range(TURNS):
        client = clients[(s + turn) % 2]  # every turn through the other gateway
        body = {"model": "agent-model", "messages": history, "tools": TOOLS}
        r = await client.post("/chat/completions", json=body)
        assert r.status_code == 200, r.text
        body = r.json()
        usages.append(body["usage"])
        message = body["choices"][0]["message"]
        history.append({k: v for k, v in message.items() if v is not None})
        for call in message.get("tool_calls") or []:
            history.append({"role": "tool", "tool_call_id": call["id"], "content": f"output of turn {turn}"})
        history.append({"role": "user", "content": f"[tokens:12] session {s} turn {turn + 1}: go on"})
    return usages


def test_agent_sessions_keep_their_replica_across_two_gateways(
    replay_fleet: tuple[list[GatewayProcess], list[EngineProcess], str],
) -> None:
    gateways, replicas, key = replay_fleet
    assert len(f"You are a coding agent.\n{RULES}") + len(str(TOOLS)) > 4000

    async def run() -> list[list[dict[str, Any]]]:
        clients = [httpx.AsyncClient(base_url=g.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                   for g in gateways]
        try:
            return await asyncio.gather(*(_session(s, clients) for s in range(SESSIONS)))
        finally:
            for c in clients:
                await c.aclose()

    usages = asyncio.run(run())
    # Which replica served each turn, from each replica's own request log.
    served: dict[tuple[int, int], str] = {}
    for replica in replicas:
        for body in replica.requests():
            last = body["messages"][-1]["content"]
            words = last.split()
            s, t = int(words[words.index("session") + 1]), int(words[words.index("turn") + 1].rstrip(":"))
            served[(s, t)] = replica.name
    assert len(served) == SESSIONS * TURNS
    stayed = sum(served[(s, t)] == served[(s, t - 1)] for s in range(SESSIONS) for t in range(1, TURNS))
    homes = Counter(served[(s, 0)] for s in range(SESSIONS))
    print(f"turns on their session's replica: {stayed}/{SESSIONS * (TURNS - 1)}; sessions per replica: {dict(homes)}")
    assert stayed >= 0.95 * SESSIONS * (TURNS - 1)
    assert set(homes) == {r.name for r in replicas}  # the sessions spread over all three

    # The engines reported the prefix they had cached; the gateways show the rate.
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for us in usages for u in us)
    prompt = sum(u["prompt_tokens"] for us in usages for u in us)
    assert cached > 0.7 * prompt
    report = None
    for _ in range(100):
        report = httpx.get(gateways[0].base_url + "/usage", headers={"Authorization": f"Bearer {key}"}).json()
        if report["cache"]["by_model"] and report["cache"]["by_model"][0]["requests"] == SESSIONS * TURNS:
            break
        time.sleep(0.1)
    assert report is not None
    [by_model] = report["cache"]["by_model"]
    assert by_model["cached_tokens"] == cached and by_model["input_tokens"] == prompt
    assert by_model["cache_hit_rate"] > 0.7
    ratios = []
    for g in gateways:
        text = httpx.get(g.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        name = 'mesh_prompt_cache_hit_ratio{model="agent-model"}'
        line = next(x for x in text.splitlines() if x.startswith(name))
        ratios.append(float(line.split()[-1]))
    assert all(r > 0.7 for r in ratios), ratios
