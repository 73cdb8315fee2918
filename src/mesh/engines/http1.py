"""A lean HTTP/1.1 client for the engine's chat stream: one POST, its body read as it comes.

The request path's upstream call is the gateway's hottest loop after its own server, and
aiohttp's general client (request and response objects, a stream reader, payload writers,
a timer per read) was a fifth of the gateway's CPU per request (``bench/README.md``). This
is only what an engine call needs: a pool of keep-alive connections per engine, the request
written in one piece, httptools (the parser uvicorn serves with) for the answer, its body
handed on in the pieces the socket delivered, and back-pressure when the reader is slower
than the engine. Health checks and tokenizer calls share the pool (a GET is a request with
an empty body), so the gateway does not load aiohttp (a fifth of its start) at all.

Errors are :class:`ConnectFailed` (the engine is unreachable), :class:`UpstreamClosed` (the
connection dropped or the answer was not HTTP), and ``TimeoutError`` (connect or read).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import cast
from urllib.parse import quote, urlsplit

import httptools

# Stop reading the engine while this much of its answer waits for the reader: a slow client
# slows the engine down through TCP instead of growing the gateway's memory.
_HIGH_WATER = 256 * 1024
# An error answer is read whole to find its message; more than this is not a message.
_MAX_ERROR_BODY = 1024 * 1024
# An answer's status line and headers: past these it is not an engine's answer (aiohttp's
# limits are 8 KiB a line; an endless header would otherwise grow until the first-token timeout).
_MAX_HEAD_BYTES = 64 * 1024
_MAX_HEADERS = 128
# A kept connection unused this long is closed rather than reused: servers close idle ones
# (uvicorn, vLLM's server, after 5 s) and a NAT or load balancer may drop them silently.
_IDLE_SECONDS = 4.0
# Kept connections per engine beyond this are closed (a burst's connections are not all kept).
_MAX_IDLE = 256
# How early the read timer may fire and still end the reads it is due for (uvloop's timers
# have a millisecond's resolution).
_TIMER_SLACK = 0.002


class ConnectFailed(OSError):
    """The engine could not be reached."""


class UpstreamClosed(ConnectionError):
    """The connection ended before the answer did, or what came back was not HTTP."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the engine and the answer it is reading."""

    __slots__ = (
        "_begun",
        "_body",
        "_buffered",
        "_head_bytes",
        "_headers",
        "_in_flight",
        "_interim",
        "_lengthless",
        "_open",
        "_paused",
        "_stray",
        "_waiter",
        "cap",
        "closed",
        "complete",
        "deadline",
        "failure",
        "headers_done",
        "idle_since",
        "keep_alive",
        "loop",
        "parser",
        "received",
        "status",
        "transport",
    )

    def __init__(self, open_connections: set[_Connection]) -> None:
        self._open = open_connections  # the client's: a connection leaves it when it ends
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.deadline: float | None = None  # when the wait under way times out (loop time)
        self.cap: float | None = None  # no wait for the current answer lasts past this (loop time)
        self._lengthless = True  # no Content-Length nor chunked: the body ends with the connection
        self._in_flight = False  # a request was sent and its connection not yet given back
        self._begun = False  # the answer to it started
        self._stray = False  # the engine sent more than one answer: the connection is done for
        self._interim = False  # reading a 1xx interim answer (100 Continue, 103 Early Hints)
        self._head_bytes = 0  # received before the answer's headers were complete
        self._headers = 0
        self.idle_since = 0.0
        self.status = 0
        self.headers_done = False
        self.keep_alive = False  # what the answer's headers say (the parser forgets once it ends)
        self.complete = False
        self.received = False  # any byte of the current answer
        self.closed = False
        self.failure: Exception | None = None

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of it
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if not self._in_flight:  # bytes nobody asked for, on an idle connection
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamClosed("the engine switched protocols instead of answering"))
            self.close()
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"the engine's answer is not valid HTTP: {exc}"))
            self.close()
            return
        if not self.headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES or self._headers > _MAX_HEADERS:
                self._fail(UpstreamClosed("the engine's answer headers are too large"))
                self.close()
                return
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._open.discard(self)
        if self.headers_done and self._lengthless and not self.complete and exc is None:
            self.complete = True  # an answer without a length ends with its connection
        elif not self.complete:
            self._fail(UpstreamClosed("the engine closed the connection before its answer ended"))
        self._wake()

    # httptools callbacks ------------------------------------------------------------------
    # Only the first answer after a request counts. Anything after it (a second answer in the
    # same read, say) is never read as the next request's answer: the connection is dropped.
    def on_message_begin(self) -> None:
        if self._begun:
            self._stray = True
        self._begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stray:
            return
        self._headers += 1
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self._lengthless = False

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        status = self.parser.get_status_code()
        if status == 101:  # not an answer: the connection speaks something else from here on
            self._fail(UpstreamClosed("the engine switched protocols instead of answering"))
            return
        if 100 <= status < 200:
            self._interim = True  # the real answer follows on the same connection
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self._stray:
            return
        self._body.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._interim:  # an interim answer ended: the next one is still this request's
            self._interim = self._begun = False
            self._lengthless, self._headers, self._head_bytes = True, 0, 0
            return
        self.complete = True

    # the client's side ----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Start an answer: reset the state of the last one and write the request."""
        assert self.transport is not None
        self.status, self.headers_done, self.complete, self.received, self.keep_alive = 0, False, False, False, False
        self._lengthless, self._interim, self._head_bytes, self._headers = True, False, 0, 0
        self._in_flight, self._begun, self._stray = True, False, False
        self._body.clear()
        self._buffered = 0
        self.transport.write(data)

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, deadline: float | None) -> None:
        """Until something happens on the connection. ``deadline`` (loop time) is only noted:
        the client's one timer (:meth:`Http1Client._sweep`) ends a wait that outlives it."""
        assert self.loop is not None
        waiter = self._waiter = self.loop.create_future()
        self.deadline = deadline
        try:
            await waiter
        finally:
            self._waiter = None
            self.deadline = None

    def expire(self) -> None:
        """The wait under way timed out (TimeoutError to the reader)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def take(self) -> bytes:
        """What the engine sent of the body since the last call (b"" when nothing)."""
        body = self._body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def drained(self) -> bool:
        return self.complete and not self._body

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not (self.closed or self._stray or self.failure)

    def idle(self, now: float) -> None:
        """Given back to the pool: bytes from now on are nobody's answer."""
        self._in_flight = False
        self.idle_since = now

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping whatever is still to be written (``close`` waits for it)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """An engine's answer: its status, then its body as it arrives. Read it to its end and
    :meth:`release` it to keep the connection; :meth:`close` it otherwise (the engine then
    sees the client gone and stops generating)."""

    __slots__ = ("_client", "_conn", "_done", "status")

    def __init__(self, client: Http1Client, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self._done = False
        self.status = conn.status

    @property
    def ended(self) -> bool:
        """The whole body came and was read."""
        return self._conn.drained

    def clear_deadline(self) -> None:
        """From now on only the read timeout bounds each wait (the ``deadline`` given to
        :meth:`Http1Client.post` is over)."""
        self._conn.cap = None

    async def readany(self) -> bytes:
        """The next piece of the body as the socket delivered it; b"" at its end."""
        conn = self._conn
        while True:
            data = conn.take()
            if data:
                return data
            if conn.complete:
                return b""
            if conn.failure is not None:
                raise conn.failure
            await self._client.wait(conn)

    async def read(self) -> bytes:
        """The rest of the body (an error answer's, which is short), at most 1 MiB of it."""
        parts: list[bytes] = []
        size = 0
        while size <= _MAX_ERROR_BODY and (data := await self.readany()):
            parts.append(data)
            size += len(data)
        return b"".join(parts)[:_MAX_ERROR_BODY]

    def release(self) -> None:
        """Done with the answer: its connection serves the next request if it can."""
        if not self._done:
            self._done = True
            self._client._give_back(self._conn)

    def close(self) -> None:
        """Drop the connection, whatever state the answer is in (not once released: it may
        be serving another request by then)."""
        if not self._done:
            self._done = True
            self._conn.close()


class Http1Client:
    """Keep-alive connections to one engine (``base_url``'s scheme, host and port), newest
    idle one first. Not thread-safe; one per engine per event loop."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float | None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._host_header = url.netloc.rsplit("@", 1)[-1]
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False
        # One timer for every read under way (a timer set and cancelled per read cost more
        # than the rest of the read): it is due at the earliest deadline it knows of, and
        # reads that start later, with the same timeout, end later and need no timer of their own.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def request_head(self, path: str, headers: Mapping[str, str], method: str = "POST") -> bytes:
        """The request line and headers every request to ``path`` with ``headers`` starts with
        (built once by the caller); :meth:`post` adds the length and the per-request ones."""
        path = quote(path, safe="/%?=&;:@!$'()*+,-._~")  # as aiohttp sends a path outside ASCII
        if any("\r" in k + v or "\n" in k + v for k, v in headers.items()):
            raise ValueError("a header name or value holds a line break")
        if method not in ("GET", "POST"):
            raise ValueError(f"unsupported method {method!r}")  # a HEAD's answer has no body to read
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}", *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def post(
        self, head: bytes, body: bytes, extra: Mapping[str, str] | None = None, deadline: float | None = None
    ) -> Response:
        """Send ``head`` (from :meth:`request_head`, a POST's or a GET's: a GET goes with an
        empty body, ``Content-Length: 0``) with ``body``; returns once the answer's
        headers came. A kept connection the engine closed before a byte of the answer came is
        retried once, on a new connection (an engine that closes every connection it is sent
        the request on is not sent it more than twice).

        ``deadline`` (loop time): connecting, and every wait on the answer until
        :meth:`Response.clear_deadline`, ends with TimeoutError by then at the latest, as an
        ``asyncio.timeout_at`` around them would (without a timer of its own)."""
        tail = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in extra.items()) if extra else b""
        data = b"%sContent-Length: %d\r\n%s\r\n%s" % (head, len(body), tail, body)
        retried = False
        while True:
            conn = None if retried else self._reuse()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(deadline)
                if self._closed:
                    conn.close()
                    raise UpstreamClosed("the engine's client was closed")
            conn.cap = deadline
            conn.send(data)
            try:
                while not conn.headers_done:
                    if conn.failure is not None:
                        raise conn.failure
                    await self.wait(conn)
            except UpstreamClosed:
                conn.close()
                if reused and not conn.received and not retried:
                    retried = True
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, conn)

    async def wait(self, conn: _Connection) -> None:
        """Until something happens on ``conn``, at most ``read_timeout`` and never past its
        ``cap`` (TimeoutError)."""
        cap = conn.cap
        if self.read_timeout is None:
            if cap is None:
                await conn.wait(None)
                return
            deadline = cap
        else:
            assert conn.loop is not None
            deadline = conn.loop.time() + self.read_timeout
            if cap is not None and cap < deadline:
                deadline = cap
        loop = conn.loop
        assert loop is not None
        if self._timer is None or deadline < self._timer_at or self._timer_loop is not loop:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = loop.call_at(deadline, self._sweep, loop), deadline
            self._timer_loop = loop  # a client used on a new loop (tests) must not wait on the old one's timer
        await conn.wait(deadline)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """End the reads whose deadline passed; be due again at the earliest of the rest."""
        self._timer = None
        now = loop.time() + _TIMER_SLACK  # a timer may fire a little early
        due: float | None = None
        for conn in list(self._open):
            deadline = conn.deadline
            if deadline is None:
                continue
            if deadline <= now:
                conn.expire()
            elif due is None or deadline < due:
                due = deadline
        if due is not None and not self._closed:
            self._timer, self._timer_at = loop.call_at(due, self._sweep, loop), due

    def _reuse(self) -> _Connection | None:
        """The newest kept connection still open and not idle too long; older ones are closed
        (they are older still)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.loop is None or conn.loop.time() - conn.idle_since > _IDLE_SECONDS:
                for old in (conn, *idle):
                    old.close()
                idle.clear()
                return None
            return conn
        return None

    async def _connect(self, deadline: float | None = None) -> _Connection:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.connect_timeout
        if deadline is not None and deadline < until:
            until = deadline
        try:
            async with asyncio.timeout_at(until):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._open), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:  # an OSError too: it stays a timeout
            raise
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._open.add(conn)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if self._closed or not conn.reusable:
            conn.close()
            return
        if len(self._idle) >= _MAX_IDLE:
            self._idle = [c for c in self._idle if not c.closed]  # the engine closed kept ones
        if len(self._idle) < _MAX_IDLE:
            assert conn.loop is not None
            conn.idle(conn.loop.time())
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._closed = True  # a connection still opening, or an answer still read, closes when done
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in list(self._open):
            # Its reader, if one waits, ends now: the read timer is gone, and a closed
            # connection's connection_lost would wait for a request body still in the write
            # buffer to drain (which an engine that reads nothing never lets happen, and its
            # socket would stay open): aborted, it closes at once.
            conn._fail(UpstreamClosed("the engine's client was closed"))
            conn.abort()
            conn._wake()
        self._open.clear()
        self._idle.clear()
