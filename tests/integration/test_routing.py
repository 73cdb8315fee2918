"""Routing across real engine processes: failover, health, affinity, queueing, fallbacks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess, free_port
from testengine.harness import EngineProcess


def _model(model_id: str, engines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "context_length": 4096, "pricing": TEST_PRICING, "engines": engines, **extra}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with contextlib.ExitStack() as stack:  # whatever fails, every process started is stopped
        replicas = [stack.enter_context(EngineProcess(models="test-model", name=f"replica-{i}")) for i in range(3)]
        solo = stack.enter_context(EngineProcess(models="test-model", name="solo"))
        dead = f"http://127.0.0.1:{free_port()}/v1"
        work = tmp_path_factory.mktemp("routing")
        pooled = [
            {"type": "openai", "base_url": r.base_url, "model": "test-model", "name": r.name, "connect_timeout": 1}
            for r in replicas
        ]
        config = {
            "database": f"sqlite:///{work}/mesh.db",
            "routing": {
                "health_interval": 0.3, "breaker_cooldown": 1.0, "failure_threshold": 2, "queue_timeout": 2.5,
                "keepalive_interval": 0.2, "affinity_min_prefix_chars": 100,
            },
            "models": [
                _model("pooled", pooled),
                _model("solo", [{"type": "openai", "base_url": solo.base_url, "model": "test-model", "capacity": 1}]),
                _model("primary", [{"type": "openai", "base_url": dead, "connect_timeout": 1}], fallbacks=["pooled"]),
                _model("lonely", [{"type": "openai", "base_url": dead, "connect_timeout": 1}]),
            ],
        }
        gw = stack.enter_context(GatewayProcess(config, work))
        admin = Admin(gw.url)
        stack.callback(admin.close)
        account = admin.account("fleet", credits="100")
        yield {"gw": gw, "admin": admin, "replicas": replicas, "solo": solo, "key": admin.key(account)["key"],
               "account": account}


def served(replicas: list[EngineProcess]) -> list[int]:
    return [int(r.stats()["requests"]) if r.running else 0 for r in replicas]


def replica_states(admin: Admin) -> dict[str, str]:
    data = admin.client.get("/admin/v1/models").json()["data"]
    pooled = next(m for m in data if m["id"] == "pooled")
    return {r["name"]: r["breaker"] for r in pooled["replicas"]}


def test_prefix_affinity_keeps_each_conversation_on_one_replica_and_spreads_the_rest(fleet: dict[str, Any]) -> None:
    gw, replicas = fleet["gw"], fleet["replicas"]
    system = "You are Mesh's support assistant. Answer briefly, cite the manual, never guess. " * 3
    histories: list[list[dict[str, Any]]] = [
        [{"role": "system", "content": system}, {"role": "user", "content": f"conversation {c} begins"}]
        for c in range(3)
    ]
    homes: list[set[str]] = [set() for _ in histories]
    with openai.OpenAI(base_url=gw.base_url, api_key=fleet["key"], max_retries=0) as client:
        for turn in range(4):
            for c, history in enumerate(histories):  # interleaved, as concurrent users are
                before = served(replicas)
                out = client.chat.completions.create(model="pooled", messages=history)  # type: ignore[arg-type]  # plain dicts
                after = served(replicas)
                homes[c] |= {r.name for r, a, b in zip(replicas, after, before, strict=True) if a > b}
                history += [{"role": "assistant", "content": out.choices[0].message.content or ""},
                            {"role": "user", "content": f"turn {turn} follow-up"}]
        before = served(replicas)
        for i in range(12):
            client.chat.completions.create(model="pooled", messages=[{"role": "user", "content": f"unrelated {i}"}])
        spread = [a - b for a, b in zip(served(replicas), before, strict=True)]
    assert all(len(h) == 1 for h in homes), homes  # every turn of a conversation on its replica
    assert set.union(*homes) == {r.name for r in replicas}, homes  # one conversation on each
    assert spread == [4, 4, 4], spread


def test_a_session_header_keeps_unrelated_prompts_together(fleet: dict[str, Any]) -> None:
    gw, replicas = fleet["gw"], fleet["replicas"]
    before = served(replicas)
    for i in range(6):
        r = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"Authorization": f"Bearer {fleet['key']}", "x-session-id": "ticket-4711"},
            json={"model": "pooled", "messages": [{"role": "user", "content": f"short {i}"}]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    moved = [a - b for a, b in zip(served(replicas), before, strict=True)]
    assert sorted(moved) == [0, 0, 6], moved


def _load(gw: GatewayProcess, key: str, stop: threading.Event, outcomes: list[str]) -> None:
    """Streams requests until ``stop``; records 'ok', 'early' (failed before the first byte)
    or 'late' (failed after it)."""

    async def worker() -> None:
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30) as client:
            while not stop.is_set():
                got_first = False
                try:
                    stream = await client.chat.completions.create(
                        model="pooled", messages=[{"role": "user", "content": "[tokens:8]"}], stream=True
                    )
                    async for _ in stream:
                        got_first = True
                    outcomes.append("ok")
                except openai.APIError:
                    outcomes.append("late" if got_first else "early")

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(6)))

    asyncio.run(main())


def test_killed_replica_causes_no_early_errors_and_returns_after_restart(fleet: dict[str, Any]) -> None:
    gw, admin, replicas = fleet["gw"], fleet["admin"], fleet["replicas"]
    victim = replicas[1]
    stop, outcomes = threading.Event(), []
    load = threading.Thread(target=_load, args=(gw, fleet["key"], stop, outcomes))
    load.start()
    try:
        time.sleep(1.0)
        victim.kill()
        killed_at = time.monotonic()
        while replica_states(admin)[victim.name] == "closed":
            assert time.monotonic() - killed_at < 5, "the dead replica stayed in rotation"
            time.sleep(0.05)
        out_after = time.monotonic() - killed_at
        time.sleep(1.5)
        victim.restart()
        restarted_at = time.monotonic()
        while replica_states(admin)[victim.name] != "closed":
            assert time.monotonic() - restarted_at < 8, "the restarted replica did not come back"
            time.sleep(0.05)
        back_after = time.monotonic() - restarted_at
        before = victim.stats()["requests"]
        time.sleep(1.0)
        assert victim.stats()["requests"] > before, "the restarted replica gets traffic again"
    finally:
        stop.set()
        load.join()
    assert outcomes.count("ok") > 50
    assert outcomes.count("early") == 0, outcomes
    print(f"out of rotation after {out_after:.2f}s, back {back_after:.2f}s after restart; "
          f"{outcomes.count('ok')} ok, {outcomes.count('late')} failed mid-stream")


def test_fallback_models_and_request_models_list(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    with openai.OpenAI(base_url=gw.base_url, api_key=fleet["key"], max_retries=0) as client:
        c = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "fall back"}])
        assert c.model == "pooled" and c.choices[0].message.content == "Hello! You said: fall back"
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="lonely", messages=[{"role": "user", "content": "nobody"}])
        assert err.value.status_code in (502, 503)
        c = client.chat.completions.create(
            model="lonely", messages=[{"role": "user", "content": "rescued"}], extra_body={"models": ["pooled"]}
        )
        assert c.model == "pooled"


def test_full_replica_queues_fairly_then_refuses_past_the_deadline(fleet: dict[str, Any]) -> None:
    gw, admin = fleet["gw"], fleet["admin"]
    heavy, light = fleet["key"], admin.key(admin.account("light", credits="10"))["key"]
    finished: list[str] = []

    async def call(client: openai.AsyncOpenAI, tag: str) -> str:
        try:
            await client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "[delay:0.4]"}])
            finished.append(tag)
            return "ok"
        except openai.APIStatusError as err:
            return f"{err.status_code}:{err.response.headers.get('retry-after')}"

    async def main() -> list[str]:
        async with (
            openai.AsyncOpenAI(base_url=gw.base_url, api_key=heavy, max_retries=0, timeout=30) as h,
            openai.AsyncOpenAI(base_url=gw.base_url, api_key=light, max_retries=0, timeout=30) as lt,
        ):
            tasks = [asyncio.create_task(call(h, f"heavy{i}")) for i in range(8)]
            await asyncio.sleep(0.1)
            tasks.append(asyncio.create_task(call(lt, "light")))
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(main())
    assert results.count("ok") >= 3
    refused = [r for r in results if r != "ok"]
    assert refused and all(r.startswith("503:") and r.split(":")[1] for r in refused), results
    # The light account's one request overtakes the heavy account's queue.
    assert "light" in finished[:3], finished


def test_queued_stream_gets_keepalives_then_its_answer(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    headers = {"Authorization": f"Bearer {fleet['key']}"}

    def slow(content: str) -> dict[str, Any]:
        return {"model": "solo", "stream": True, "messages": [{"role": "user", "content": content}]}

    with httpx.Client(timeout=30) as client:
        blocker = threading.Thread(
            target=lambda: client.post(gw.base_url + "/chat/completions", json=slow("[delay:1.8]") | {"stream": False},
                                       headers=headers)
        )
        blocker.start()
        time.sleep(0.2)
        with client.stream("POST", gw.base_url + "/chat/completions", json=slow("after the blocker"),
                           headers=headers) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line]
        blocker.join()
    assert lines[0] == ": keep-alive"
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, data[:-1]) if c["choices"])
    assert text == "Hello! You said: after the blocker"
