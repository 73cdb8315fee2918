"""The engine client (engines/http1.py) against a scripted HTTP server on a real socket:
keep-alive, an engine that closes or stalls or lies, back-pressure, and the connections it
must never hand to the next request."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from mesh.engines import http1
from mesh.engines.http1 import ConnectFailed, Http1Client, Response, UpstreamClosed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.disconnects = 0


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[Server, str]]:
    state = Server()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await handler(reader, writer, state.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            state.disconnects += 1
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield state, f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.close()


def ok(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def post(client: Http1Client, body: bytes = b"{}") -> Response:
    return await client.post(client.request_head("/v1/chat/completions", {"Content-Type": "application/json"}), body)


async def read_all(resp: Response) -> bytes:
    out = b""
    while data := await resp.readany():
        out += data
    return out


def client_for(url: str, read_timeout: float = 2.0) -> Http1Client:
    return Http1Client(url, connect_timeout=2.0, read_timeout=read_timeout)


async def test_sequential_answers_share_one_kept_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(ok(b"data: " + req.rsplit(b"\r\n\r\n", 1)[1] + b"\n\n"))
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for i in range(20):
            resp = await post(client, b'{"n": %d}' % i)
            assert resp.status == 200 and await read_all(resp) == b'data: {"n": %d}\n\n' % i
            resp.release()
        await client.aclose()
    assert state.connections == 1


async def test_a_kept_connection_the_engine_closed_is_retried_on_a_new_one() -> None:
    """The engine answers, then closes its idle connection without saying so in the answer
    (vLLM's server closes idle keep-alive connections after 5 s): the next request must not fail."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if await read_request(reader) is not None:
            writer.write(ok(b"data: answer\n\n"))
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for _ in range(3):
            resp = await post(client)
            assert await read_all(resp) == b"data: answer\n\n"
            resp.release()
            await asyncio.sleep(0.05)  # the close reaches the client: the pool skips that connection
        # The race: the engine closes just as the request goes out. Keep one kept connection
        # whose close the client has not seen yet.
        resp = await post(client)
        await read_all(resp)
        resp.release()
        resp = await post(client)  # retried: the kept one was closed (maybe not yet seen)
        assert await read_all(resp) == b"data: answer\n\n"
        resp.release()
        await client.aclose()
    assert state.connections == 5


async def test_a_new_connection_dropped_before_the_answer_is_an_error_not_a_retry() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)  # and hang up without a word

    async with serve(handler) as (state, url):
        client = client_for(url)
        with pytest.raises(UpstreamClosed):
            await post(client)
        await client.aclose()
    assert state.connections == 1  # the engine saw the request once


async def test_an_answer_that_is_not_http_fails_and_its_connection_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for _ in range(2):
            with pytest.raises(UpstreamClosed, match="not valid HTTP"):
                await post(client)
        await client.aclose()
    assert state.connections == 2


async def test_bytes_after_an_answer_never_reach_the_next_request() -> None:
    """An engine that sends a second, unasked-for answer after the first must not have it read
    as the answer to the next request (another customer's, perhaps)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(ok(b"data: mine\n\n") + ok(b"data: planted\n\n"))
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for _ in range(3):
            resp = await post(client)
            assert await read_all(resp) == b"data: mine\n\n"
            resp.release()
            await asyncio.sleep(0.05)
        await client.aclose()
    assert state.connections == 3  # each connection that carried extra bytes was dropped


async def test_an_engine_that_stalls_times_out_per_read() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with serve(handler) as (_, url):
        client = client_for(url, read_timeout=0.3)
        resp = await post(client)
        assert await resp.readany() == b"data: "
        with pytest.raises(TimeoutError):
            await resp.readany()
        resp.close()
        await client.aclose()


async def test_the_read_timer_times_each_read_of_each_connection_not_the_whole_answer() -> None:
    """One timer serves every read of a client: a stalled answer times out while, beside it,
    an answer that keeps coming for longer than the timeout, a piece well within it each
    time, is read to its end."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        if body is not None and body.endswith(b"stall"):
            await writer.drain()
            await asyncio.sleep(5)
            return
        for _ in range(8):  # 1.2 s in all, twice the timeout
            writer.write(b"3\r\nab\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.15)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serve(handler) as (_, url):
        client = client_for(url, read_timeout=0.6)

        async def steady() -> bytes:
            resp = await post(client, b"steady")
            data = await read_all(resp)
            resp.release()
            return data

        async def stalled() -> None:
            await asyncio.sleep(0.3)  # after the timer was set for the steady read: it must be set again
            resp = await post(client, b"stall")
            try:
                await resp.readany()
            finally:
                resp.close()

        steady_task = asyncio.create_task(steady())
        with pytest.raises(TimeoutError):
            await stalled()
        assert await steady_task == b"ab\n" * 8
        await client.aclose()


async def done_or_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answers "done" at once, or, to a request whose body ends in "stall", starts an answer
    and sends nothing more for 5 s."""
    body = await read_request(reader)
    if body is not None and body.endswith(b"stall"):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)
        return
    writer.write(ok(b"done"))
    await writer.drain()


async def test_a_read_that_starts_after_the_timer_was_set_still_times_out() -> None:
    """The timer is due at the first read's deadline; a later read's deadline is only noted.
    With the first read done by then, the timer must set itself again for the later one."""

    async with serve(done_or_stall) as (_, url):
        client = client_for(url, read_timeout=0.5)
        quick = await post(client, b"quick")  # sets the timer, due in 0.5 s
        assert await read_all(quick) == b"done"
        quick.release()
        await asyncio.sleep(0.25)
        stalled = await post(client, b"stall")  # due 0.25 s after the timer
        read = asyncio.create_task(stalled.readany())
        await asyncio.wait({read}, timeout=4)  # well before the server's close after 5 s
        assert read.done() and isinstance(read.exception(), TimeoutError)
        stalled.close()
        await client.aclose()


def test_a_client_used_on_a_second_event_loop_times_out_there_too() -> None:
    """The read timer belongs to a loop: a client whose timer was set on a loop that has
    ended (a test's) sets one on the loop it is used on now."""

    client = client_for("http://127.0.0.1:1/v1/chat/completions", read_timeout=0.5)

    async def first() -> None:
        async with serve(done_or_stall) as (_, url):
            client.host, client.port = "127.0.0.1", int(url.split(":")[2].split("/")[0])
            resp = await post(client, b"quick")  # sets the timer on this loop, due in 0.5 s
            assert await read_all(resp) == b"done"
            resp.close()

    async def second() -> BaseException | None:
        async with serve(done_or_stall) as (_, url):
            client.host, client.port = "127.0.0.1", int(url.split(":")[2].split("/")[0])
            resp = await post(client, b"stall")
            read = asyncio.create_task(resp.readany())
            await asyncio.wait({read}, timeout=4)
            resp.close()
            await client.aclose()
            return read.exception() if read.done() else None

    asyncio.run(first())
    assert isinstance(asyncio.run(second()), TimeoutError)


async def test_a_read_waiting_when_the_client_closes_ends_at_once() -> None:
    """aclose() ends the waits under way itself: the read timer is gone with the client, and
    a closed connection's connection_lost waits until the request body in its write buffer
    drains, which an engine that reads nothing never lets happen."""
    writers: list[asyncio.StreamWriter] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # never reads the request, never answers

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = client_for(f"http://127.0.0.1:{port}/v1/chat/completions", read_timeout=0.5)
    posting = asyncio.create_task(post(client, b"x" * (64 << 20)))
    await asyncio.sleep(0.1)
    await client.aclose()
    try:
        await asyncio.wait({posting}, timeout=3)
        assert posting.done()
        assert isinstance(posting.exception(), UpstreamClosed)
    finally:
        posting.cancel()
        for w in writers:
            w.transport.abort()
        server.close()


async def test_an_answer_without_a_length_ends_with_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: a\n\ndata: b\n\n")
        await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for _ in range(2):
            resp = await post(client)
            assert await read_all(resp) == b"data: a\n\ndata: b\n\n"
            resp.release()
        await client.aclose()
    assert state.connections == 2


async def test_an_error_answer_is_read_at_most_one_mib() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"x" * 65536
        for _ in range(64):  # 4 MiB and never an end
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
        await asyncio.sleep(5)

    async with serve(handler) as (_, url):
        client = client_for(url)
        resp = await post(client)
        assert resp.status == 500
        body = await asyncio.wait_for(resp.read(), 5)
        assert len(body) == 1024 * 1024
        resp.close()
        await client.aclose()


async def test_a_slow_reader_stops_reading_the_engine() -> None:
    """Back-pressure: what waits for the reader stays near the high-water mark instead of
    taking the whole answer into memory."""
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"y" * 65536
        for _ in range(256):  # 16 MiB
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
            sent += len(block)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serve(handler) as (_, url):
        client = client_for(url)
        resp = await post(client)
        await asyncio.sleep(0.5)  # nobody reads
        first = await resp.readany()
        assert 256 * 1024 <= len(first) < 2 * 1024 * 1024
        assert sent < 8 * 1024 * 1024  # the socket buffers fill, the engine waits
        total = len(first) + len(await read_all(resp))
        assert total == 256 * 65536
        resp.release()
        await client.aclose()


async def test_a_closed_answer_never_serves_another_request() -> None:
    """A client that hangs up mid-answer closes the engine's connection (the engine stops
    generating), and that half-read connection is never handed to the next request."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        resp = await post(client)
        assert await resp.readany() == b"data: 1"
        resp.close()
        resp.release()  # too late: closed is closed
        resp = await post(client)
        assert await read_all(resp) == b"data: 1data: 2"
        resp.release()
        await client.aclose()
    assert state.connections == 2


async def test_a_request_cancelled_while_waiting_drops_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            await asyncio.sleep(0.3)
            writer.write(ok(b"data: late\n\n"))
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        task = asyncio.create_task(post(client))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        resp = await post(client)  # a new connection: the first one's late answer is not this one's
        assert await read_all(resp) == b"data: late\n\n"
        resp.release()
        await client.aclose()
    assert state.connections == 2


async def test_an_unreachable_engine_is_a_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        client = client_for(f"http://127.0.0.1:{port}/v1/chat/completions")
        with pytest.raises(ConnectFailed):
            await post(client)
        await client.aclose()


async def test_an_interim_answer_is_skipped_and_the_real_one_read() -> None:
    """103 Early Hints (or 100 Continue) before the answer: the request gets its own answer,
    and the next request gets its own, not the one before."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        count = 0
        while (await read_request(reader)) is not None:
            count += 1
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(ok(b"data: answer %d\n\n" % count))
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for i in (1, 2, 3):
            resp = await post(client)
            assert resp.status == 200 and await read_all(resp) == b"data: answer %d\n\n" % i
            resp.release()
        await client.aclose()
    assert state.connections == 1


async def test_a_request_the_engine_drops_is_sent_at_most_twice() -> None:
    """Kept connections that the engine drops after reading the request: one retry, on a new
    connection, not one per kept connection (each would be a generation on the GPU)."""
    seen = 0
    drop = False

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal seen
        while (await read_request(reader)) is not None:
            seen += 1
            if drop:
                return
            await asyncio.sleep(0.05)
            writer.write(ok(b"data: ok\n\n"))
            await writer.drain()

    async with serve(handler) as (_, url):
        client = client_for(url)
        answers = [await post(client) for _ in range(3)]  # three connections, each kept after
        for resp in answers:
            await read_all(resp)
            resp.release()
        drop, seen = True, 0
        with pytest.raises(UpstreamClosed):
            await post(client)
        await client.aclose()
    assert seen == 2


async def test_a_connection_kept_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NAT or load balancer may drop an idle connection without a word: one idle past the
    limit is closed and a new one opened, instead of a request waiting out its read timeout."""
    monkeypatch.setattr(http1, "_IDLE_SECONDS", 0.2)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(ok(b"data: ok\n\n"))
            await writer.drain()

    async with serve(handler) as (state, url):
        client = client_for(url)
        for pause in (0.0, 0.05, 0.4):
            await asyncio.sleep(pause)
            resp = await post(client)
            await read_all(resp)
            resp.release()
        await client.aclose()
    assert state.connections == 2


@pytest.mark.parametrize("flood", [b"X-Big: " + b"a" * 200_000, b"".join(b"X-%d: v\r\n" % i for i in range(500))])
async def test_an_answer_with_endless_headers_fails_at_once(flood: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + flood)
        await writer.drain()
        await asyncio.sleep(5)

    async with serve(handler) as (_, url):
        client = client_for(url, read_timeout=10)
        with pytest.raises(UpstreamClosed, match="too large"):
            await asyncio.wait_for(post(client), 3)
        await client.aclose()


async def test_an_engine_that_switches_protocols_has_not_answered() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxx")
        await writer.drain()
        await asyncio.sleep(1)

    async with serve(handler) as (_, url):
        client = client_for(url)
        with pytest.raises(UpstreamClosed):
            resp = await post(client)
            await read_all(resp)
        await client.aclose()


async def test_a_path_outside_ascii_is_percent_encoded_and_headers_cannot_break_lines() -> None:
    client = client_for("http://127.0.0.1:1/v1/€/chat/completions")
    head = client.request_head("/v1/€/chat/completions", {"Content-Type": "application/json"})
    assert head.startswith(b"POST /v1/%E2%82%AC/chat/completions HTTP/1.1\r\n")
    with pytest.raises(ValueError):
        client.request_head("/v1/chat/completions", {"Authorization": "Bearer k\r\nX-Evil: 1"})


async def test_a_closed_client_refuses_work() -> None:
    """After ``aclose`` (the engine was removed or the process stops) a request is refused,
    not sent: nothing reaches the engine."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await read_request(reader)) is not None:
            seen.append(request)
            writer.write(ok(b"data: [DONE]\n\n"))
            await writer.drain()

    async with serve(handler) as (_, url):
        client = Http1Client(url, connect_timeout=2, read_timeout=2)
        head = client.request_head("/v1/chat/completions", {"Content-Type": "application/json"})
        resp = await client.post(head, b"{}")
        await resp.read()
        resp.release()
        await client.aclose()
        with pytest.raises(UpstreamClosed):
            await client.post(head, b"{}")
        await asyncio.sleep(0.1)
        assert len(seen) == 1
