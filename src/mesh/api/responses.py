"""JSON responses serialized with orjson, and the error responses of each protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response

from mesh.errors import MeshError

ErrorRenderer = Callable[[MeshError], tuple[int, dict[str, Any]]]


_CONTENT_TYPE = (b"content-type", b"application/json")
_BODY_FIELDS = frozenset((b"content-length", b"content-type"))


class JSON(Response):
    """Starlette's ``Response`` with an orjson body. Every non-streamed answer is one, so it
    builds its raw headers itself: the same list as Starlette's ``init_headers`` (the given
    headers lower-cased, then content-length and content-type unless given) in about half
    the time."""

    media_type = "application/json"

    def __init__(
        self,
        content: Any = None,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.status_code = status_code
        self.background = background
        self.body = body = orjson.dumps(content)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()] if headers else []
        if media_type is not None or (raw and not _BODY_FIELDS.isdisjoint([k for k, _ in raw])):
            if media_type is not None:
                self.media_type = media_type
            self.init_headers(headers)
            return
        if status_code >= 200 and status_code != 204 and status_code != 304:
            raw.append((b"content-length", str(len(body)).encode("latin-1")))
        raw.append(_CONTENT_TYPE)
        self.raw_headers = raw

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(err: MeshError, render: ErrorRenderer, headers: Mapping[str, str] | None = None) -> JSON:
    status, body = render(err)
    out = dict(headers or {})
    out.update(err.headers or {})
    if err.retry_after is not None:
        # Rounded up: a client that waits exactly this long must not be refused again.
        out["retry-after"] = str(max(1, math.ceil(err.retry_after)))
        out["retry-after-ms"] = str(max(1, math.ceil(err.retry_after * 1000)))
    if err.should_retry is not None:
        out["x-should-retry"] = "true" if err.should_retry else "false"
    return JSON(body, status_code=status, headers=out)
