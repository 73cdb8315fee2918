"""/health/live and /health/ready of a real gateway whose PostgreSQL, Redis and engine each sit
behind a TCP proxy of the test's own: faulting a proxy makes the gateway unready (503, the
failing check named, the ``mesh_ready_check`` gauge at 0) and restoring it makes it ready again.
The shared services are never touched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from conftest import engine_models
from support.gateway import ADMIN_KEY, GatewayProcess
from support.postgres import temporary_database
from support.redis import require_redis, unique_prefix
from support.tcpproxy import TcpProxy
from testengine.harness import EngineProcess


class Proxied:
    def __init__(self, gw: GatewayProcess, postgres: TcpProxy, redis: TcpProxy, engine: TcpProxy) -> None:
        self.gw, self.postgres, self.redis, self.engine = gw, postgres, redis, engine

    def ready(self) -> tuple[int, dict[str, bool]]:
        r = httpx.get(self.gw.url + "/health/ready", timeout=15)
        checks: dict[str, bool] = r.json()["checks"]
        return r.status_code, checks

    def gauge(self) -> dict[str, float]:
        text = httpx.get(self.gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("mesh_ready_check{"):
                name = line.split('check="', 1)[1].split('"', 1)[0]
                out[name] = float(line.rsplit(" ", 1)[1])
        return out

    def wait_ready(self, timeout: float = 30) -> dict[str, bool]:
        deadline = time.monotonic() + timeout
        while True:
            status, checks = self.ready()
            if status == 200:
                return checks
            assert time.monotonic() < deadline, f"never ready again: {checks}"
            time.sleep(0.2)

    def wait_unready(self, check: str, timeout: float = 30) -> dict[str, bool]:
        deadline = time.monotonic() + timeout
        while True:
            status, checks = self.ready()
            if status == 503 and not checks[check]:
                return checks
            assert time.monotonic() < deadline, f"still ready: {checks}"
            time.sleep(0.2)


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


@pytest.fixture
def proxied(request: pytest.FixtureRequest, engine: EngineProcess, tmp_path: Path) -> Iterator[Proxied]:
    redis_url = require_redis(request)
    with temporary_database(request, "postgresql", tmp_path) as db_url:
        pg, rd, en = urlsplit(db_url), urlsplit(redis_url), urlsplit(engine.base_url)
        assert pg.hostname and pg.port and rd.hostname and rd.port and en.hostname and en.port
        with TcpProxy(pg.hostname, pg.port) as pg_proxy, TcpProxy(rd.hostname, rd.port) as redis_proxy, \
                TcpProxy(en.hostname, en.port) as engine_proxy:
            config: dict[str, Any] = {
                "database": _via(db_url, pg_proxy.port),
                "redis": _via(redis_url, redis_proxy.port),
                "redis_prefix": unique_prefix(),
                "catalog": False,
                "models": engine_models(_via(engine.base_url, engine_proxy.port))[:1],
                "routing": {"health_interval": 0.2, "breaker_cooldown": 1.0, "failure_threshold": 2},
            }
            with GatewayProcess(config, tmp_path) as gw:
                yield Proxied(gw, pg_proxy, redis_proxy, engine_proxy)


def test_ready_names_every_check_and_live_needs_nothing(proxied: Proxied) -> None:
    checks = proxied.wait_ready()
    assert checks == {"database": True, "redis": True, "billing": True, "replicas": True}
    assert proxied.gauge() == {"database": 1.0, "redis": 1.0, "billing": 1.0, "replicas": 1.0}
    proxied.postgres.down()
    proxied.redis.down()
    proxied.engine.down()
    try:
        assert httpx.get(proxied.gw.url + "/health/live").json() == {"status": "ok"}
        assert httpx.get(proxied.gw.url + "/health/live").status_code == 200
    finally:
        proxied.postgres.up()
        proxied.redis.up()
        proxied.engine.up()


def test_ready_turns_false_while_postgres_is_unreachable_and_true_after(proxied: Proxied) -> None:
    proxied.wait_ready()
    proxied.postgres.down()
    try:
        checks = proxied.wait_unready("database")
        assert checks["redis"] and checks["replicas"]
        assert proxied.gauge()["database"] == 0.0
    finally:
        proxied.postgres.up()
    assert proxied.wait_ready()["database"]
    assert proxied.gauge()["database"] == 1.0
    assert "readiness check database fails" in proxied.gw.log()


def test_ready_turns_false_while_redis_is_unreachable_and_true_after(proxied: Proxied) -> None:
    proxied.wait_ready()
    proxied.redis.down()
    try:
        checks = proxied.wait_unready("redis")
        assert checks["database"] and checks["replicas"]
        assert proxied.gauge()["redis"] == 0.0
    finally:
        proxied.redis.up()
    assert proxied.wait_ready()["redis"]
    assert proxied.gauge()["redis"] == 1.0


def test_ready_turns_false_while_no_replica_is_healthy_and_true_after(proxied: Proxied) -> None:
    proxied.wait_ready()
    proxied.engine.down()
    try:
        checks = proxied.wait_unready("replicas")
        assert checks["database"] and checks["redis"]
    finally:
        proxied.engine.up()
    assert proxied.wait_ready()["replicas"]
