"""Server CPU per request with Mesh's edge protocol (http/server.py) against stock uvicorn
httptools: ``python -m bench.edge_limits OLD_SRC`` where OLD_SRC is a copy of ``src/`` whose
``mesh/cli/serve.py`` still calls ``uvicorn.run(..., http="httptools")``.

/health is the cheapest route, so the protocol's own cost shows most; keep-alive requests
on one connection, then one new connection per request. Figures from /proc (utime+stime).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exchange(sock: socket.socket) -> None:
    sock.sendall(REQUEST)
    buf = b""
    while not buf.endswith(b'"ok"}'):
        buf += sock.recv(65536)


def measure(pythonpath: str | None, n: int = 20_000) -> dict[str, float]:
    work = Path(tempfile.mkdtemp())
    port = _free_port()
    config = work / "mesh.yaml"
    config.write_text(yaml.safe_dump({"database": f"sqlite:///{work}/mesh.db", "logging": {"level": "WARNING"},
                                      "console": {"secret_file": str(work / "secret")}}))
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    proc = subprocess.Popen([sys.executable, "-m", "mesh", "--config", str(config), "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        out: dict[str, float] = {}
        with socket.create_connection(("127.0.0.1", port)) as sock:
            start = cpu_seconds(proc.pid)
            for _ in range(n):
                _exchange(sock)
            out["keep-alive us/request"] = (cpu_seconds(proc.pid) - start) / n * 1e6
        start = cpu_seconds(proc.pid)
        for _ in range(n // 4):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                _exchange(sock)
        out["new connection us/request"] = (cpu_seconds(proc.pid) - start) / (n // 4) * 1e6
        return out
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    stock = sys.argv[1]
    for _ in range(2):
        for label, path in (("edge ", None), ("stock", stock)):
            print(label, {k: round(v) for k, v in measure(path).items()}, flush=True)


if __name__ == "__main__":
    main()
