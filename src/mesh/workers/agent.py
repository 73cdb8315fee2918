"""``mesh worker``: runs on a GPU node next to an engine and keeps it registered with a gateway.

Optionally starts the engine process (and restarts it when it dies), waits until it is
healthy, registers the replica over the worker API, then heartbeats every few seconds with
the engine's load read from its Prometheus metrics (vLLM's running/waiting requests and KV
cache use; SGLang's equivalents). A 404 on a heartbeat (the gateway restarted or expired the
registration) makes it register again. On SIGTERM/SIGINT it deregisters and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from mesh.workers.engine_process import EngineProcess
from mesh.workers.load import EngineLoad, parse_load

log = logging.getLogger("mesh.worker")

DEFAULT_STARTUP_TIMEOUT = 900.0  # big models take minutes to load onto GPUs


@dataclass(frozen=True, slots=True)
class AgentConfig:
    gateway: str
    token: str
    engine_url: str  # where this node reaches the engine, e.g. http://127.0.0.1:8000/v1
    model: str  # the gateway's public model name
    engine_model: str | None = None  # the engine's own name; discovered from /v1/models if None
    launch: str | None = None
    capacity: int | None = None
    advertise_url: str | None = None  # where the gateway reaches the engine (default engine_url)
    reasoning_field: str = "reasoning_content"  # recent vLLM reads "reasoning"
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT


class WorkerAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.engine_root = config.engine_url.rstrip("/").removesuffix("/v1")
        self.process = EngineProcess(config.launch) if config.launch else None
        self.registration: str | None = None
        self.interval = 5.0
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            if self.process is not None:
                await self.process.start()
            await self._wait_healthy()
            engine_model = self.config.engine_model or await self._discover_model()
            while not self._stop.is_set():
                healthy = await self._engine_healthy()
                if self.registration is None:
                    if healthy:
                        await self._register(engine_model)
                else:
                    load = await self._load() if healthy else EngineLoad()
                    await self._heartbeat(healthy, load)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
        finally:
            await self._deregister()
            if self.process is not None:
                await self.process.stop()
            await self.session.close()

    async def _wait_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.startup_timeout
        while not await self._engine_healthy():
            if self._stop.is_set():
                return
            if loop.time() > deadline:
                raise TimeoutError(f"the engine at {self.config.engine_url} did not become healthy")
            await asyncio.sleep(0.5)
        log.info("engine at %s is healthy", self.config.engine_url)

    async def _engine_healthy(self) -> bool:
        for url in (self.engine_root + "/health", self.config.engine_url.rstrip("/") + "/models"):
            try:
                async with self.session.get(url) as resp:
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
        return False

    async def _discover_model(self) -> str | None:
        try:
            async with self.session.get(self.config.engine_url.rstrip("/") + "/models") as resp:
                data = orjson.loads(await resp.read())
            name = data["data"][0]["id"]
            return str(name)
        except (aiohttp.ClientError, TimeoutError, OSError, KeyError, IndexError, orjson.JSONDecodeError):
            return None

    async def _load(self) -> EngineLoad:
        try:
            async with self.session.get(self.engine_root + "/metrics") as resp:
                if resp.status == 200:
                    return parse_load(await resp.text())
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        return EngineLoad()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.token}", "Content-Type": "application/json"}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        url = self.config.gateway.rstrip("/") + path
        try:
            async with self.session.request(
                method, url, data=orjson.dumps(body) if body is not None else None, headers=self._headers()
            ) as resp:
                raw = await resp.read()
                return resp.status, (orjson.loads(raw) if raw else None)
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            log.warning("gateway call %s %s failed: %s", method, path, type(exc).__name__)
            return 0, None

    async def _register(self, engine_model: str | None) -> None:
        body: dict[str, Any] = {
            "model": self.config.model,
            "engine_url": self.config.advertise_url or self.config.engine_url,
            "engine_model": engine_model,
            "capacity": self.config.capacity,
            "reasoning_field": self.config.reasoning_field,
        }
        status, data = await self._call("POST", "/workers/v1/replicas", body)
        if status == 201 and isinstance(data, dict):
            self.registration = str(data["id"])
            self.interval = float(data.get("heartbeat_interval", self.interval))
            log.info("registered %s for model %s as %s", body["engine_url"], self.config.model, self.registration)
        elif status in (401, 403, 404):
            message = data.get("error", {}).get("message") if isinstance(data, dict) else data
            raise PermissionError(f"the gateway refused the registration ({status}): {message}")

    async def _heartbeat(self, healthy: bool, load: EngineLoad) -> None:
        assert self.registration is not None
        body = {"healthy": healthy, "running": load.running, "waiting": load.waiting,
                "kv_cache_usage": load.kv_cache_usage}
        status, _ = await self._call("POST", f"/workers/v1/replicas/{self.registration}/heartbeat", body)
        if status == 404:
            log.info("the gateway forgot registration %s; registering again", self.registration)
            self.registration = None

    async def _deregister(self) -> None:
        if self.registration is not None and self._session is not None and not self._session.closed:
            await self._call("DELETE", f"/workers/v1/replicas/{self.registration}")
            self.registration = None
