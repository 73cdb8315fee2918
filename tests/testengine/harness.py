"""Run the test engine as a real subprocess (synchronous; meant for pytest fixtures).

with EngineProcess(name="replica-a") as engine:
    client = openai.OpenAI(base_url=engine.base_url, api_key="x")
    ...
    engine.kill()      # SIGKILL: prove failover
    engine.restart()   # same port again
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

SERVER = Path(__file__).resolve().parent / "server.py"


class EngineProcess:
    def __init__(
        self,
        *,
        models: list[str] | str | None = None,
        name: str = "testengine",
        chunk_delay_ms: float = 0.0,
        max_model_len: int = 4096,
        host: str = "127.0.0.1",
        port: int = 0,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.models = models.split(",") if isinstance(models, str) else models
        self.name = name
        self.chunk_delay_ms = chunk_delay_ms
        self.max_model_len = max_model_len
        self.host = host
        self.port = port
        self.extra_args = list(extra_args or [])
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._last_stderr = ""
        self._lines: queue.Queue[str | None] = queue.Queue()

    # -- addresses -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("engine not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [sys.executable, str(SERVER), "--host", self.host, "--port", str(self.port), "--name", self.name]
        if self.models:
            cmd += ["--models", ",".join(self.models)]
        cmd += ["--chunk-delay-ms", str(self.chunk_delay_ms), "--max-model-len", str(self.max_model_len)]
        return cmd + self.extra_args

    def start(self, timeout: float = 20.0) -> EngineProcess:
        if self.running:
            return self
        self._stderr = tempfile.TemporaryFile()
        self._lines = queue.Queue()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        threading.Thread(target=self._pump, args=(self.proc, self._lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"test engine not ready after {timeout}s:\n{self.stderr()}") from None
            if line is None:
                self.stop()
                raise RuntimeError(f"test engine exited before READY:\n{self.stderr()}")
            if line.startswith("READY "):
                self.port = int(line.split()[1].rsplit(":", 1)[1])
                return self

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # keep draining so the pipe never fills up
            lines.put(line.strip())
        lines.put(None)

    def stderr(self) -> str:
        """What the engine wrote to stderr (of the last run once it has stopped)."""
        if self._stderr is None:
            return self._last_stderr
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL: the replica vanishes without closing anything gracefully."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def restart(self, timeout: float = 20.0) -> EngineProcess:
        """Stop (if needed) and start again on the same port."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                if time.monotonic() >= deadline or "Address already in use" not in self.stderr():
                    raise
                time.sleep(0.2)

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        if self._stderr is not None:
            self._last_stderr = self.stderr()
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control API helpers ---------------------------------------------------------------------
    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def requests(self) -> list[dict[str, Any]]:
        """Bodies received on /v1/chat/completions (last 1000, newest last)."""
        return list(self.call("GET", "/control/requests"))

    def clear_requests(self) -> None:
        self.call("DELETE", "/control/requests")

    def headers(self) -> list[dict[str, str]]:
        return list(self.call("GET", "/control/headers"))

    def fault(self, mode: str, count: int = 1, delay: float | None = None) -> None:
        """Inject ``mode`` (500, 429, drop, hang, slow_first_token) into the next ``count`` requests."""
        body: dict[str, Any] = {"mode": str(mode), "count": count}
        if delay is not None:
            body["delay"] = delay
        self.call("POST", "/control/faults", body)

    def clear_faults(self) -> None:
        self.call("DELETE", "/control/faults")

    def stats(self) -> dict[str, Any]:
        return dict(self.call("GET", "/control/stats"))

    def set_load(self, model: str | None = None, **values: float) -> None:
        """Pretend load in /metrics, e.g. ``set_load(waiting=10, kv_cache_usage=0.9)``."""
        self.call("POST", "/control/load", {"model": model, **values})

    def reset(self) -> None:
        """Forget recorded requests, faults, pretend load, the prefix cache and the counters."""
        self.call("POST", "/control/reset")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())
