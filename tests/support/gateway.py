"""Runs a real Mesh gateway process on a free loopback port, from a YAML config."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ADMIN_KEY = "admin-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``running`` lists the processes up now and ``stopped`` those stopped since the
    invariant check (``support.books``) last looked, with their audit just before the stop."""

    running: list[GatewayProcess] = []
    stopped: list[tuple[GatewayProcess, dict[str, Any]]] = []

    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.config = {"admin_key": ADMIN_KEY, "logging": {"level": "WARNING"}, **config}
        self.workdir = workdir
        self.env = env or {}
        self.args = args  # more `mesh serve` options, e.g. ("--workers", "2")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / f"mesh-{self.port}.yaml"
        self.log_path = workdir / f"mesh-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **self.env}
        env.pop("MESH_CONFIG", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "--config", str(self.config_path), "serve", "--port", str(self.port),
                 *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    GatewayProcess.running.append(self)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def database(self) -> str:
        return str(self.config["database"])

    def admin_call(self, method: str, path: str) -> Any:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as c:
            r = c.request(method, path)
            r.raise_for_status()
            return r.json()

    def audit(self, settle_for: float = 5.0) -> dict[str, Any]:
        """Flush, then ``GET /admin/v1/audit``; while slots are still in use, retry for up
        to ``settle_for`` seconds (requests that just ended let go in the background)."""
        deadline = time.monotonic() + settle_for
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as c:
            while True:
                c.post("/admin/v1/flush").raise_for_status()
                r = c.get("/admin/v1/audit")
                r.raise_for_status()
                found: dict[str, Any] = r.json()
                if not found["in_flight"] or time.monotonic() >= deadline:
                    return found
                time.sleep(0.1)

    def in_use(self, settle_for: float = 5.0) -> list[dict[str, Any]]:
        """Replica slots, queue places and reserved slots still taken on this process."""
        found: list[dict[str, Any]] = self.audit(settle_for)["in_flight"]
        return found

    def stop(self) -> None:
        if self in GatewayProcess.running:
            GatewayProcess.running.remove(self)
            if self.proc is not None and self.proc.poll() is None and self.config.get("admin_key"):
                # The last look at its books: with every gateway on its database flushed,
                # nothing is held by leases, so what is held is left behind.
                try:
                    for peer in GatewayProcess.running:
                        if peer.database == self.database and peer.proc is not None and peer.proc.poll() is None:
                            peer.admin_call("POST", "/admin/v1/flush")
                    found = self.audit()
                except httpx.HTTPError as exc:
                    found = {"audit": [{"failed": repr(exc)}]}
                GatewayProcess.stopped.append((self, found))
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Admin:
    """The operator API, used by tests to make accounts, credits and keys."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)

    def account(self, name: str = "test", credits: str | None = "100") -> str:
        r = self.client.post("/admin/v1/accounts", json={"name": name})
        r.raise_for_status()
        account_id: str = r.json()["id"]
        if credits is not None:
            self.grant(account_id, credits)
        return account_id

    def grant(self, account_id: str, amount: str, idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"amount": amount}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        r = self.client.post(f"/admin/v1/accounts/{account_id}/credits", json=body)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def key(self, account_id: str, **fields: Any) -> dict[str, Any]:
        r = self.client.post(f"/admin/v1/accounts/{account_id}/keys", json=fields)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def balance(self, account_id: str) -> dict[str, Any]:
        r = self.client.get(f"/admin/v1/accounts/{account_id}")
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def ledger(self, account_id: str, page: int = 1000) -> list[dict[str, Any]]:
        """Every ledger row of the account, newest first, page by page (``after`` cursor)."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": page}
        while True:
            r = self.client.get(f"/admin/v1/accounts/{account_id}/ledger", params=params)
            r.raise_for_status()
            body = r.json()
            rows += body["data"]
            if not body["has_more"]:
                return rows
            params["after"] = body["last_id"]

    def revoke(self, key_id: str) -> None:
        self.client.delete(f"/admin/v1/keys/{key_id}").raise_for_status()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
