"""The things measured: the engine itself, the minimal proxy, Mesh (SQLite or PostgreSQL,
1 or 2 workers, everything on) and LiteLLM's proxy, each a :class:`Target` with its URL, the
API key clients send and the processes whose CPU and RSS count."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import Server, http_json

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
MODEL = "bench-model"
# Generous limits: the limiter runs on every request but never refuses one.
LIMITS = {"key": {"rpm": 10**9, "tpm": 10**12, "concurrent": 10**6}}
PG_HOST, PG_PORT, PG_ADMIN_DB, PG_ROLES = "127.0.0.1", 5432, "test", ("postgres", "root")


@dataclass
class Target:
    name: str
    label: str
    server: Server
    key: str = "none"
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_engine(work: Path, *args: str, name: str = "engine") -> Target:
    server = Server(name, [sys.executable, "-m", "bench.engine", *args], work / f"{name}.log", cwd=ROOT)
    return Target(name, "engine (direct)", server.start_ready_line())


def start_proxy(work: Path, upstream: str) -> Target:
    argv = [sys.executable, "-m", "bench.proxy", "--upstream", upstream]
    server = Server("proxy", argv, work / "proxy.log", cwd=ROOT)
    return Target("proxy", "minimal proxy", server.start_ready_line())


def start_floor(work: Path, upstream: str, *, stream_upstream: bool = False) -> Target:
    """Mesh's HTTP server and engine client passing requests through (``bench.floor``)."""
    name = "floor-streamed" if stream_upstream else "floor"
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor", "--upstream", upstream, "--port", str(port)]
    server = Server(name, argv + (["--stream-upstream"] if stream_upstream else []), work / f"{name}.log", cwd=ROOT)
    server.start_health(f"http://127.0.0.1:{port}", "/health", timeout=30)
    label = "floor, streamed upstream" if stream_upstream else "floor (Mesh's HTTP layers)"
    return Target(name, label, server)


def mesh_config(database: str, engine_url: str | None) -> dict[str, Any]:
    """Everything on: keys, billing with real prices, rate limits, metrics, one log line per
    request at the default INFO level (to the log file)."""
    config: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "database": database,
        "logging": {"level": "INFO"},
        "limits": LIMITS,
    }
    if engine_url is not None:
        config["models"] = [
            {
                "id": MODEL,
                "pricing": {"input": "0.30", "cached_input": "0.03", "output": "1.20"},
                "engines": [{"type": "openai", "base_url": engine_url + "/v1", "model": MODEL}],
            }
        ]
    return config


def start_mesh(name: str, label: str, work: Path, config: dict[str, Any], *, workers: int = 1,
               key: str | None = None, timeout: float = 90.0,
               command: Callable[[Path, int], list[str]] | None = None, env: dict[str, str] | None = None) -> Target:
    """A Mesh gateway process; creates an account with credits and a key unless given one.
    ``command(config path, port)``: another way to serve the app than ``mesh serve``."""
    port = free_port()
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "mesh", "--config", str(path), "serve", "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    if command is not None:
        argv = command(path, port)
    env = {"OMP_WAIT_POLICY": "PASSIVE", "MESH_CONFIG": "", **(env or {})}
    server = Server(name, argv, work / f"{name}.log", env=env, cwd=work)
    server.start_health(f"http://127.0.0.1:{port}", "/health", timeout=timeout)
    target = Target(name, label, server)
    target.key = key or create_key(target.url)
    return target


def create_key(url: str) -> str:
    """An account with a million credits and one API key, through the admin API."""
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    account = http_json(url + "/admin/v1/accounts", {"name": "bench"}, auth)["id"]
    http_json(f"{url}/admin/v1/accounts/{account}/credits", {"amount": "1000000"}, auth)
    key: str = http_json(f"{url}/admin/v1/accounts/{account}/keys", {"name": "bench"}, auth)["key"]
    return key


def start_litellm(work: Path, python: Path, engine_url: str) -> Target:
    """LiteLLM's proxy with one model in front of the engine, no database, its own defaults."""
    port = free_port()
    path = work / "litellm.yaml"
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": engine_url + "/v1", "api_key": "none"},
            }
        ]
    }
    path.write_text(yaml.safe_dump(config))
    litellm = python.parent / "litellm"
    argv = [str(litellm), "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--telemetry", "False"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    server = Server("litellm", argv, work / "litellm.log", env=env, cwd=work)
    server.start_health(f"http://127.0.0.1:{port}", "/health/liveliness", timeout=120)
    return Target("litellm", "LiteLLM proxy", server)


# -- PostgreSQL: a fresh database per run, as tests/support/postgres.py does -------------------------
async def _pg_execute(sql: str) -> str | None:
    import asyncpg

    for user in PG_ROLES:
        try:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=PG_ADMIN_DB, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            continue
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return user
    return None


def create_pg_database() -> tuple[str, str] | None:
    """(url, name) of a new empty database, or None when PostgreSQL is unreachable."""
    name = f"mesh_bench_{secrets.token_hex(6)}"
    user = asyncio.run(_pg_execute(f'CREATE DATABASE "{name}"'))
    if user is None:
        return None
    return f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}", name


async def _pg_stats(name: str) -> dict[str, int]:
    import asyncpg

    for user in PG_ROLES:
        try:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=PG_ADMIN_DB, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            continue
        try:
            row = await conn.fetchrow(
                "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted"
                " FROM pg_stat_database WHERE datname = $1", name)
        finally:
            await conn.close()
        return dict(row) if row else {}
    return {}


def pg_stats(name: str) -> dict[str, int]:
    """The database's cumulative counters (transactions, rows) from pg_stat_database."""
    return asyncio.run(_pg_stats(name))


def drop_pg_database(name: str) -> None:
    asyncio.run(_pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
