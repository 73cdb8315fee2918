"""Connection limits at the edge, attacked over real sockets against a real gateway process:
huge headers, idle and slowloris connections, a connection flood, a client that stops reading.

The deadlines below are the configured timeouts with a wide margin: they check that a
limit acts at all, not how fast (speed goes to bench/).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

HEADER_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 1.0
WRITE_TIMEOUT = 2.0
MAX_CONNECTIONS = 40
MARGIN = 5.0  # seconds beyond a timeout before a test gives up


@pytest.fixture(scope="module")
def long_engine() -> Iterator[EngineProcess]:
    with EngineProcess(models="test-model", name="long", max_model_len=400_000) as engine:
        yield engine


@pytest.fixture(scope="module")
def gw(
    long_engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, str, str]]:
    work = tmp_path_factory.mktemp("edge")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "server": {"header_timeout": HEADER_TIMEOUT, "keepalive_timeout": KEEPALIVE_TIMEOUT,
                   "write_timeout": WRITE_TIMEOUT, "max_connections": MAX_CONNECTIONS},
        "billing": {"leases": False},
        "models": [{"id": "test-model", "context_length": 400_000, "pricing": TEST_PRICING,
                    "engines": [{"type": "openai", "base_url": long_engine.base_url, "model": "test-model"}]}],
    }
    with GatewayProcess(config, work) as gateway:
        admin = Admin(gateway.url)
        account = admin.account("edge", credits="1000")
        key = admin.key(account)["key"]
        admin.close()
        yield gateway, key, account


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect(gateway: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=HEADER_TIMEOUT + MARGIN)


def closed_by_server(sock: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the server to close; True on EOF or reset."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def test_oversized_headers_get_431(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b"request_header_fields_too_large" in answer
    # Headers just under the limit still work, and so does a large body behind small headers.
    ok = httpx.get(gateway.url + "/health", headers={"x-pad": "a" * 30_000})
    assert ok.status_code == 200


def test_twenty_megabyte_headers_do_not_grow_memory(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    assert gateway.proc is not None
    before = rss_kb(gateway.proc.pid)
    socks = []
    chunk = b"a" * 65536
    for _ in range(10):
        sock = connect(gateway)
        socks.append(sock)
        sent = 0
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent < 20 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass  # the server closed on us: that is the point
        assert sent < 20 * 1024 * 1024, "the server kept reading an unfinished 20 MB header"
    after = rss_kb(gateway.proc.pid)
    for sock in socks:
        sock.close()
    assert after - before < 20_000, f"RSS grew from {before} to {after} kB"
    assert httpx.get(gateway.url + "/health").status_code == 200


def test_idle_connections_are_closed(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    socks = [connect(gateway) for _ in range(30)]
    try:
        assert all(closed_by_server(s) for s in socks)
    finally:
        for s in socks:
            s.close()


def test_slowloris_is_closed_within_the_header_timeout(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    socks = [connect(gateway) for _ in range(20)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        s.setblocking(False)
    open_ = set(range(len(socks)))
    deadline = time.monotonic() + HEADER_TIMEOUT + MARGIN
    try:
        while open_ and time.monotonic() < deadline:
            for i in list(open_):
                try:
                    socks[i].send(b"X")  # one byte of a header that never ends
                    if socks[i].recv(1) == b"":
                        open_.discard(i)
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    open_.discard(i)
            time.sleep(0.2)
        assert not open_, f"{len(open_)} slowloris connections still open"
    finally:
        for s in socks:
            s.close()


def test_slowloris_after_a_first_request_is_closed_within_the_header_timeout(
    gw: tuple[GatewayProcess, str, str],
) -> None:
    """The header timer watches every request of a kept connection, not only its first: a
    second request whose headers drip in a byte at a time (each byte resets the keep-alive
    timer) is closed like the first would be."""
    gateway, _, _ = gw
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        deadline = time.monotonic() + HEADER_TIMEOUT + MARGIN
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.send(b"X")
                closed = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            time.sleep(0.2)
        assert closed, "a kept connection dripping its second request's headers is still open"


def test_keep_alive_connection_is_closed_when_idle(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert closed_by_server(sock)


def test_connections_beyond_the_cap_get_503(gw: tuple[GatewayProcess, str, str]) -> None:
    gateway, _, _ = gw
    socks = [connect(gateway) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # let the server accept them all
        with connect(gateway) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
        assert b"too_many_connections" in answer
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + MARGIN
    while httpx.get(gateway.url + "/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_client_that_stops_reading_is_dropped_and_its_slot_and_hold_come_back(
    gw: tuple[GatewayProcess, str, str], long_engine: EngineProcess
) -> None:
    gateway, key, account = gw
    admin = Admin(gateway.url)
    try:
        before = Decimal(admin.balance(account)["balance"])
        long_engine.reset()
        body = (b'{"model": "test-model", "stream": true, "max_tokens": 300000, "messages": '
                b'[{"role": "user", "content": "[tokens:300000] go"}]}')
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read it
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        try:
            deadline = time.monotonic() + 60
            while long_engine.stats()["cancelled"] < 1:
                assert time.monotonic() < deadline, f"the engine request was never cancelled: {long_engine.stats()}"
                time.sleep(0.2)
            stats = long_engine.stats()
            assert stats["completed"] == 0  # it did not run to its end
            while True:
                fleet = admin.client.get("/admin/v1/models").json()["data"]
                in_flight = fleet[0]["replicas"][0]["in_flight"]
                acct = admin.balance(account)
                if in_flight == 0 and Decimal(acct["held"]) == 0:
                    break
                assert time.monotonic() < deadline, (in_flight, acct)
                time.sleep(0.2)
            spent = before - Decimal(acct["balance"])
            assert spent > 0  # it paid for what was generated
        finally:
            sock.close()
        assert "read nothing" in gateway.log()
    finally:
        admin.close()
