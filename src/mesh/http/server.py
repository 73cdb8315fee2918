"""The HTTP server at the edge: uvicorn's httptools protocol plus the limits it lacks.

uvicorn (0.55, httptools) has no header size limit (``h11_max_incomplete_event_size``
binds only its h11 protocol), no timer on a connection that has not finished its
headers (so idle and slowloris connections stay open for ever), answers a connection
cap only per request with 503, and waits for ever on a client that stops reading. This
subclass adds, per process (``server.*`` in the config):

* ``max_header_bytes``: request line and headers larger than this get a 431 and the
  connection is closed, counted as bytes arrive (an unfinished 20 MB header never
  accumulates);
* ``header_timeout``: a connection that has not completed a request's headers this long
  after it opened or after the request's first byte is closed (idle and slowloris);
* ``body_timeout``: a request whose body has not fully arrived this long after its
  headers is dropped: a body dripped a byte at a time (or never sent after an early
  answer such as a 401) would otherwise hold its connection for ever;
* chunked trailers count against ``max_header_bytes`` too (httptools buffers a trailer
  field whole, so an endless one grew memory without bound, authenticated or not): the
  bytes of a chunked body that are neither data nor the chunks' own framing close the
  connection past the limit;
* ``keepalive_timeout``: uvicorn's idle timer between requests;
* ``max_connections``: a connection beyond this is answered 503 and closed at once;
* ``write_timeout``: a response the client has not read for this long is abandoned: the
  connection is aborted, which the application sees as a disconnect (the engine request
  is cancelled and billed for what was generated, ``http/streaming.py``).

It also sends a response's status line and headers in the same write as its first body
bytes (uvicorn writes them apart: two syscalls and two packets per answer).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn import Config, Server
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.supervisors import Multiprocess

from mesh.http.streaming import ON_DISCONNECT

log = logging.getLogger("mesh.http")

_END_OF_HEADERS = b"\r\n\r\n"
# What a chunk's framing may take: its size line (hex, maybe an extension) and two CRLFs.
_CHUNK_FRAMING = 64


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 5.0
    max_connections: int = 2048
    write_timeout: float = 30.0


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _HeadersWithBody:
    """The transport as a response cycle sees it: its first write (the status line and
    headers) waits for the second (the body) and both go out in one ``write``, one syscall
    and one packet, as a bare aiohttp server sends them; uvicorn writes them apart. Held at
    most until the end of the event-loop turn (a stream's headers do not wait for its first
    event); everything after the first write passes straight through."""

    __slots__ = ("_held", "_loop", "_transport", "_virgin")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._virgin = True

    def write(self, data: bytes) -> None:
        if self._virgin:
            self._virgin = False
            self._held = data
            self._loop.call_soon(self._flush)
        elif self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _MeshCycle(RequestResponseCycle):
    """uvicorn's response cycle with the status line and headers written as uvicorn writes
    them, checked with one search over all names and one over all values instead of two
    regex searches per header (a response of Mesh's carries about fifteen)."""

    async def send(self, message: ASGISendEvent) -> None:
        if self.response_started or self.disconnected or self.flow.write_paused or self.access_log:
            await super().send(message)
            return
        if message["type"] != "http.response.start":
            raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        headers = self.default_headers + list(message.get("headers", []))
        if HEADER_RE.search(b"".join(name for name, _ in headers)):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join(value for _, value in headers)):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                if b"close" in [token.lower().strip() for token in value.split(b",")]:
                    self.keep_alive = False
                    has_connection_close = True
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status_code not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))


class _HangUp:
    """A response's way to hear that its client went away (``http/streaming.py``), instead
    of a task per response waiting on ``receive()`` for ``http.disconnect``."""

    __slots__ = ("_callback", "_gone")

    def __init__(self) -> None:
        self._callback: Callable[[], None] | None = None
        self._gone = False

    def listen(self, callback: Callable[[], None] | None) -> bool:
        """Call ``callback`` when the client goes (None: stop); False when it is gone
        already (it left while its request was routed), and nothing will be called."""
        self._callback = None if self._gone else callback
        return not self._gone

    def fire(self) -> None:
        self._gone = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class MeshConfig(Config):
    """uvicorn's config plus Mesh's :class:`EdgeLimits` (pickled to worker processes with it)."""

    def __init__(self, app: Any, *, edge: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(app, http=MeshHttpProtocol, timeout_keep_alive=int(edge.keepalive_timeout) or 1, **kwargs)
        self.edge = edge


class MeshHttpProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.edge: EdgeLimits = getattr(config, "edge", EdgeLimits())
        self.timeout_keep_alive = self.edge.keepalive_timeout  # type: ignore[assignment]  # a float works
        self._header_bytes = 0
        self._headers_done = False
        self._tail = b""  # the last bytes seen, for an end of headers split across reads
        # The body phase of a request: data delivered, chunks begun, bytes that were neither.
        self._body_bytes = 0
        self._chunks = 0
        self._other_bytes = 0
        self._messages = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._hang_ups: list[_HangUp] = []  # of the requests not yet answered, oldest first

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.edge.max_connections:
            log.warning("connection refused: %d open, the cap is %d", len(self.connections) - 1,
                        self.edge.max_connections)
            transport.write(_raw_response(503, "Service Unavailable", "too_many_connections",
                                          "The server has too many open connections; retry shortly."))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for hang_up in self._hang_ups:  # the responses still going to this client (pipelined too)
            hang_up.fire()
        self._hang_ups.clear()
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._cancel(self._write_timer)
        self._header_timer = self._body_timer = self._write_timer = None
        super().connection_lost(exc)

    # -- headers: size and time ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._receive(data)
        # The timers are armed only for what this read left unfinished (most requests arrive
        # whole in one read, and were two timers set and cancelled each): headers begun and
        # not complete, or a body not complete, counted from now.
        if self._headers_done:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.edge.body_timeout, self._body_timeout)
        elif self._header_timer is None and self._header_bytes and not self.transport.is_closing():
            self._arm_header_timer()

    def _receive(self, data: bytes) -> None:
        if not self._headers_done:
            window = self._tail + data
            end = window.find(_END_OF_HEADERS)
            counted = len(data) if end < 0 else max(0, end + len(_END_OF_HEADERS) - len(self._tail))
            self._header_bytes += counted
            self._tail = window[-3:]
            if self._header_bytes > self.edge.max_header_bytes:
                self._refuse_headers()
                return
            super().data_received(data)
            return
        body_before, messages_before = self._body_bytes, self._messages
        super().data_received(data)
        if self._headers_done and self._messages == messages_before:  # still the same request's body
            self._other_bytes += len(data) - (self._body_bytes - body_before)
            if self._other_bytes > self.edge.max_header_bytes + _CHUNK_FRAMING * self._chunks:
                log.warning("chunked trailers over %d bytes; dropping the connection", self.edge.max_header_bytes)
                if not self.transport.is_closing():
                    self.transport.close()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:  # called by httptools for each chunk, the last (empty) one too
        self._chunks += 1

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._body_bytes = self._chunks = self._other_bytes = 0
        self._cancel(self._header_timer)
        self._header_timer = None
        self._cancel(self._body_timer)
        self._body_timer = None  # armed at the end of the read if the body is not complete by then
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # the request's new cycle
            cycle.transport = _HeadersWithBody(self.transport, self.loop)  # type: ignore[assignment]
            cycle.__class__ = _MeshCycle  # its task has not started: every send goes through ours
            hang_up = _HangUp()
            self._hang_ups.append(hang_up)
            cycle.scope[ON_DISCONNECT] = hang_up.listen  # type: ignore[literal-required]

    def on_message_complete(self) -> None:
        self._cancel(self._body_timer)
        self._body_timer = None
        self._messages += 1
        super().on_message_complete()
        # The next request on this connection starts counting from zero.
        self._headers_done = False
        self._header_bytes = 0
        self._tail = b""

    def _refuse_headers(self) -> None:
        log.warning("request headers over %d bytes refused (431)", self.edge.max_header_bytes)
        self._cancel(self._header_timer)
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_raw_response(
                431, "Request Header Fields Too Large", "request_header_fields_too_large",
                f"The request line and headers exceed {self.edge.max_header_bytes} bytes."))
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel(self._header_timer)
        self._header_timer = self.loop.call_later(self.edge.header_timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still being written (a pipelined request is arriving): not idle.
            self._arm_header_timer()
            return
        self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            # The application, if it still waits for the body, sees a disconnect.
            log.warning("request body incomplete after %.0fs; dropping the connection", self.edge.body_timeout)
            self.transport.close()

    def on_response_complete(self) -> None:
        if self._hang_ups:
            self._hang_ups.pop(0)  # answers complete in the order their requests came
        super().on_response_complete()
        # uvicorn's keep-alive timer now watches the idle connection.
        self._cancel(self._header_timer)
        self._header_timer = None

    # -- clients that stop reading -------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.edge.write_timeout, self._write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self._write_timer)
        self._write_timer = None

    def _write_timeout(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            log.warning("client read nothing for %.0fs; dropping the connection", self.edge.write_timeout)
            self.transport.abort()

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


def run(app: str, *, host: str, port: int, workers: int, edge: EdgeLimits, forwarded_allow_ips: str) -> None:
    """Serve ``app`` (an import string of a factory) as ``uvicorn.run`` would, with the limits."""
    config = MeshConfig(
        app, edge=edge, factory=True, host=host, port=port, workers=workers, loop="uvloop", access_log=False,
        ws="none",  # Mesh serves no WebSocket: not importing uvicorn's implementation saves start time
        log_config=None, timeout_graceful_shutdown=30, forwarded_allow_ips=forwarded_allow_ips,
    )
    server = Server(config=config)
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()
    if not server.started and workers == 1:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
