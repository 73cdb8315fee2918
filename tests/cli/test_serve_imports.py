"""What ``mesh serve`` loads: its start is mostly imports (``make bench``'s start to first
answer), so a heavy library the gateway has no use for must stay out of it. aiohttp (a
fifth of the start) is only the worker agent's; the gateway's engine calls, health checks
and token counts go through its own client (``engines/http1.py``)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess


def test_serving_answering_and_checking_engines_never_imports_aiohttp(engine: EngineProcess, tmp_path: Path) -> None:
    config = {"database": f"sqlite:///{tmp_path}/mesh.db", "models": engine_models(engine.base_url),
              "routing": {"health_interval": 0.1}}
    with GatewayProcess(config, tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"}) as gw:
        admin = Admin(gw.url)
        try:
            key = admin.key(admin.account("imports", credits="10"))["key"]
        finally:
            admin.close()
        r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        time.sleep(0.5)  # several health rounds (every 0.1 s) on every replica
        assert gw.in_use() == []
    imported = set(re.findall(r"^import time:.*\|\s+([\w.]+)\s*$", gw.log(), re.MULTILINE))
    assert "mesh.engines.openai_compat" in imported and "mesh.routing.health" in imported  # the log saw them
    assert not {m for m in imported if m.split(".")[0] == "aiohttp"}
