"""Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}, "request_id"}``.

Statuses follow Anthropic's table: engine overload and "nothing could serve" are 529
``overloaded_error`` (the SDK retries them and raises ``OverloadedError``), an engine's
own failure is 500 ``api_error``, a timeout 504 ``timeout_error``. The SDK picks its
exception class by status, so the status matters more than the ``type``.
"""

from __future__ import annotations

from typing import Any

import orjson

from mesh.errors import MeshError

OVERLOADED_STATUS = 529

# MeshError.kind -> (Anthropic error type, HTTP status or None to keep the error's own)
_KINDS: dict[str, tuple[str, int | None]] = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("authentication_error", 401),
    "insufficient_credits": ("billing_error", 402),
    "permission": ("permission_error", 403),
    "not_found": ("not_found_error", None),
    "request_too_large": ("request_too_large", 413),
    "rate_limit": ("rate_limit_error", 429),
    "internal": ("api_error", 500),
    "engine": ("api_error", 500),
    "unavailable": ("overloaded_error", OVERLOADED_STATUS),
    "overloaded": ("overloaded_error", OVERLOADED_STATUS),
    "timeout": ("timeout_error", 504),
}


def _type_and_status(err: MeshError) -> tuple[str, int]:
    kind, status = _KINDS.get(err.kind, ("api_error" if err.status >= 500 else "invalid_request_error", None))
    return kind, status or err.status


def error_body(err: MeshError, request_id: str | None = None) -> dict[str, Any]:
    """The error object. ``request_id`` is None until the endpoint fills it in."""
    kind, _ = _type_and_status(err)
    return {"type": "error", "error": {"type": kind, "message": err.message}, "request_id": request_id}


def render_error(err: MeshError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of an error known before the response started.

    The body carries ``"request_id": None``; the endpoint wrapper fills in the request's id
    (``mesh.api.endpoint``), since a renderer only sees the error.
    """
    _, status = _type_and_status(err)
    return status, error_body(err)


def stream_error_event(err: MeshError, request_id: str | None = None) -> bytes:
    """The in-band ``event: error`` for a stream that already started (the SDK raises on it)."""
    return b"event: error\ndata: " + orjson.dumps(error_body(err, request_id)) + b"\n\n"
