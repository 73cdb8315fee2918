"""Engine connections are kept alive: a finished answer is read to its end, never cut off.

A real gateway process in front of its own test-engine process; the engine counts the TCP
connections clients opened and the finished answers whose client hung up before the
response ended (vLLM counts each of those as an abort).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

SEQUENTIAL = 1000

HANDFUL = 4

Own = tuple[GatewayProcess, EngineProcess, str]


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Own]:
    work: Path = tmp_path_factory.mktemp("connections")
    with EngineProcess(name="keepalive") as engine:
        config = {"database": f"sqlite:///{work}/mesh.db", "models": engine_models(engine.base_url)}
        with GatewayProcess(config, work) as gw:
            admin = Admin(gw.url)
            key = admin.key(admin.account("keepalive", credits="1000"))["key"]
            admin.close()
            yield gw, engine, key


def test_sequential_requests_reuse_a_handful_of_engine_connections(own: Own) -> None:
    gw, engine, key = own
    engine.reset()
    with httpx.Client(base_url=gw.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for i in range(SEQUENTIAL):
            body = {
                "model": "test-model",
                "messages": [{"role": "user", "content": f"[tokens:3] turn {i}"}],
                "max_tokens": 5,
                "stream": i % 2 == 0,  # both paths: the gateway always streams from the engine
            }
            r = client.post("/chat/completions", json=body)
            assert r.status_code == 200, r.text
    # The gateway answers at [DONE] and reads the body's end in the background: the engine
    # counts its last answer finished a moment after the client had it.
    deadline = time.monotonic() + 2.0
    while (stats := engine.stats())["completed"] < SEQUENTIAL and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["completed"] == SEQUENTIAL
    assert stats["cut_off"] == 0
    assert stats["cancelled"] == 0
    assert 1 <= stats["connections"] <= HANDFUL, stats


def test_a_client_that_leaves_mid_stream_still_cancels_the_engine(own: Own) -> None:
    gw, engine, key = own
    engine.reset()
    body = {
        "model": "test-model",
        "messages": [{"role": "user", "content": "[tokens:200] [chunk_delay:0.02] long"}],
        "stream": True,
    }
    with httpx.Client(base_url=gw.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        with client.stream("POST", "/chat/completions", json=body) as r:
            assert r.status_code == 200
            for _ in zip(range(3), r.iter_lines(), strict=False):
                pass
    for _ in range(100):
        if engine.stats()["cancelled"] == 1:
            break
        time.sleep(0.1)
    stats = engine.stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 0, stats
