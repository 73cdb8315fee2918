"""A loopback TCP proxy of our own that stalls or loses replies (the PostgreSQL fault proxy is
``support.tcpproxy``), instead of faulting the shared service behind it.

``stall()`` swallows every byte from then on (both ways, connections kept open), as a
service that stopped answering: clients time out and what they sent is lost.
``lose_replies()`` forwards requests but swallows the answers (the service did the work,
the client never hears of it). ``resume()`` forwards again for new bytes. Runs its own event loop in a thread, so sync
and async tests alike can use it::

    with StallProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class StallProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.stalled = False
        self.replies_lost = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> StallProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def stall(self) -> None:
        self.stalled = True

    def lose_replies(self) -> None:
        self.replies_lost = True

    def resume(self) -> None:
        self.stalled = self.replies_lost = False

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer, reply=False), self._pipe(up_reader, writer, reply=True),
            return_exceptions=True,
        )
        self._writers -= {writer, up_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reply: bool) -> None:
        try:
            while chunk := await reader.read(65536):
                if not (self.stalled or (reply and self.replies_lost)):
                    writer.write(chunk)
                    await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
