"""Edge limits, attacked again after issue 14 (red team), over real sockets against a real
gateway process.

Found: once a request's headers were complete nothing timed its body, so a body dripped
a byte a second (or a body still "arriving" after an early 401) held its connection for
ever: a connection cap of N fell to N such sockets, /health included. And a chunked
body's trailer was not a header to the size limit: httptools buffers a trailer field
whole, so one endless trailer grew the process by what was sent (60 MB in 8 s,
unauthenticated). Held: many small headers count like one big one; a pipelined request's
headers are counted too.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 20
MAX_HEADER_BYTES = 8192
MARGIN = 6.0  # seconds beyond a timeout before a test gives up


@pytest.fixture(scope="module")
def gw(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    work = tmp_path_factory.mktemp("edge-redteam")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "server": {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT, "keepalive_timeout": 1.0,
                   "max_connections": MAX_CONNECTIONS, "max_header_bytes": MAX_HEADER_BYTES},
        "models": [{"id": "test-model", "context_length": 4096, "pricing": TEST_PRICING,
                    "engines": [{"type": "openai", "base_url": engine.base_url, "model": "test-model"}]}],
    }
    with GatewayProcess(config, work) as gateway:
        admin = Admin(gateway.url)
        key = admin.key(admin.account("edge", credits="10"))["key"]
        admin.close()
        yield gateway, key


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("path", ["/health", "/v1/chat/completions"])
def test_an_endless_chunked_trailer_is_cut_off_and_does_not_grow_memory(
    gw: tuple[GatewayProcess, str], path: str
) -> None:
    gateway, key = gw
    assert gateway.proc is not None
    before = rss_kb(gateway.proc.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=MARGIN) as sock:
        try:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "2\r\n{}\r\n0\r\nX-Trailer: ".encode())
            chunk = b"a" * 65536
            while sent < 20 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass  # the server closed on us: that is the point
    assert sent < 20 * 1024 * 1024, "the server kept reading an unfinished 20 MB trailer"
    assert rss_kb(gateway.proc.pid) - before < 20_000
    assert "chunked trailers over" in gateway.log()


def test_a_chunked_body_in_small_chunks_still_passes(gw: tuple[GatewayProcess, str]) -> None:
    gateway, key = gw
    body = (b'{"model": "test-model", "max_tokens": 3, "messages": [{"role": "user", "content": "'
            + b"x" * 20000 + b'"}]}')
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4]), body[i:i + 4]) for i in range(0, len(body), 4))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     .encode() + chunks + b"0\r\nX-Fine: 1\r\n\r\n")
        answer = b""
        while part := sock.recv(65536):
            answer += part
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def drip_is_cut(gateway: GatewayProcess, path: str, key: str | None) -> bool:
    """Send headers announcing a body, then a byte a second; True once the server closes."""
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.settimeout(0.05)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    try:
        sock.sendall((head + "\r\n").encode())
        deadline = time.monotonic() + BODY_TIMEOUT + MARGIN
        while time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
                while sock.recv(65536):  # an early answer (401, 405) may come first
                    pass
                return True  # EOF
            except (TimeoutError, BlockingIOError):
                pass
            except (ConnectionResetError, BrokenPipeError):
                return True
            time.sleep(0.5)
        return False
    finally:
        sock.close()


@pytest.mark.parametrize(("path", "authenticated"), [
    ("/v1/chat/completions", True), ("/v1/chat/completions", False), ("/health", False),
], ids=["chat-with-key", "chat-without-key", "health"])
def test_a_dripped_body_is_cut_off(gw: tuple[GatewayProcess, str], path: str, authenticated: bool) -> None:
    gateway, key = gw
    assert drip_is_cut(gateway, path, key if authenticated else None), "a body dripped a byte at a time held on"
    assert "request body incomplete" in gateway.log()


def test_drippers_cannot_starve_health_for_longer_than_the_body_timeout(gw: tuple[GatewayProcess, str]) -> None:
    gateway, _ = gw
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", gateway.port))
            s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            socks.append(s)
        deadline = time.monotonic() + BODY_TIMEOUT + MARGIN
        while True:  # they keep dripping, yet /health comes back once the body timeout cuts them
            for s in socks:
                try:
                    s.sendall(b" ")
                except OSError:
                    pass
            try:
                if httpx.get(gateway.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "/health stayed starved by dripping connections"
            time.sleep(0.5)
    finally:
        for s in socks:
            s.close()


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(HEADER_TIMEOUT + MARGIN)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def test_many_small_headers_count_like_one_big_one(gw: tuple[GatewayProcess, str]) -> None:
    gateway, _ = gw
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        headers = "".join(f"X-H{i}: {'a' * 20}\r\n" for i in range(MAX_HEADER_BYTES // 20))
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        assert _answer(sock).startswith(b"HTTP/1.1 431 ")


def test_a_pipelined_requests_headers_are_counted(gw: tuple[GatewayProcess, str]) -> None:
    gateway, _ = gw
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEADER_BYTES) + b"\r\n\r\n")
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"HTTP/1.1 431 " in answer
