"""Keep-alives while a stream waits for its first byte (a queued request).

Only the wait is wrapped, not every chunk: once the stream has started, the body
flows with no per-chunk overhead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

SSE_COMMENT = b": keep-alive\n\n"


async def keepalive_while(
    waiting: asyncio.Future[Any] | None, body: AsyncIterator[bytes], interval: float, comment: bytes = SSE_COMMENT
) -> AsyncIterator[bytes]:
    """Yield ``comment`` every ``interval`` seconds until ``waiting`` is done, then ``body``."""
    try:
        if waiting is not None:
            while not waiting.done():
                done, _ = await asyncio.wait({waiting}, timeout=interval)
                if not done:
                    yield comment
        async for chunk in body:
            yield chunk
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
