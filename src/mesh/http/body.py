"""Reading request bodies with a size cap (413 past it)."""

from __future__ import annotations

from starlette.requests import Request

from mesh.errors import RequestTooLarge
from mesh.http.fields import header


async def read_body(request: Request, limit: int) -> bytes:
    declared = header(request.scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
