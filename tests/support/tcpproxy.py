"""A TCP proxy of the test's own, between a gateway and PostgreSQL, to fault on demand.

It runs its own event loop in a thread, so synchronous tests drive it directly:

* :meth:`TcpProxy.down` closes the listener and every connection (PostgreSQL "refusing
  connections", without touching the shared server); :meth:`TcpProxy.up` listens again;
* :meth:`TcpProxy.drop_commit_replies` lets the next ``n`` ``COMMIT`` statements reach
  PostgreSQL (which commits) and then cuts the connection before the reply gets back: the
  client sees an error for a transaction that did commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any

from support.gateway import free_port

_COMMIT = b"COMMIT"


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.dropped_commits = 0
        self._drop = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy")
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def up(self) -> None:
        async def listen() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._run(listen())

    def down(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()

        self._run(close())

    def drop_commit_replies(self, n: int) -> None:
        async def arm() -> None:
            self._drop = n

        self._run(arm())

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._conns.update((client_w, server_w))
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                doomed = self._drop > 0 and _COMMIT in data
                if doomed:
                    self._drop -= 1
                    self.dropped_commits += 1
                    cut.set()  # no reply gets back from here on
                server_w.write(data)
                await server_w.drain()
                if doomed:
                    await asyncio.sleep(0.3)  # PostgreSQL commits meanwhile
                    return

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cut.is_set():
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (client_w, server_w):
            w.transport.abort()
            self._conns.discard(w)
