"""What `mesh serve` refuses before it binds, and revocation across the processes of
`mesh serve --workers 2` (the systemd unit's command line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from support.redis import require_redis, unique_prefix
from testengine.harness import EngineProcess


def serve(tmp_path: Path, config: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "mesh", "--config", str(path), "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_several_processes_without_redis_are_refused(tmp_path: Path) -> None:
    done = serve(tmp_path, {"database": f"sqlite:///{tmp_path}/mesh.db"}, "--workers", "2", "--port", "0")
    assert done.returncode == 2
    assert "--workers 2 needs Redis" in done.stderr


def test_test_payments_on_a_public_address_are_refused(tmp_path: Path) -> None:
    config = {"database": f"sqlite:///{tmp_path}/mesh.db", "console": {"payments": {"provider": "test"}}}
    done = serve(tmp_path, config, "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert "allow_test_provider" in done.stderr


def chat(gw: GatewayProcess, key: str) -> int:
    r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                   timeout=30)
    return r.status_code


@pytest.mark.leaves_state(
    "two gateway processes share the port: the audit's flush reaches one of them, and the other "
    "returns its credit lease only when it stops or goes idle"
)
def test_revocation_reaches_every_process_at_once(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path
) -> None:
    redis_url = require_redis(request)
    with temporary_database(request, "postgresql", tmp_path) as url:
        config = {"database": url, "redis": redis_url, "redis_prefix": unique_prefix(),
                  "models": engine_models(engine.base_url)}
        with GatewayProcess(config, tmp_path, args=("--workers", "2")) as gw:
            admin = Admin(gw.url)
            try:
                created = admin.key(admin.account("revoke", credits="10"))
                # Fresh connections spread over both processes: each caches the key.
                assert all(chat(gw, created["key"]) == 200 for _ in range(20))
                admin.revoke(created["id"])
                statuses = [chat(gw, created["key"]) for _ in range(20)]
            finally:
                admin.close()
            assert statuses == [401] * 20, statuses  # not one answer from a stale cache
