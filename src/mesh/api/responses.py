"""JSON responses serialized with orjson, and the error responses of each protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.responses import Response

from mesh.errors import MeshError

ErrorRenderer = Callable[[MeshError], tuple[int, dict[str, Any]]]


class JSON(Response):
    media_type = "application/json"

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
