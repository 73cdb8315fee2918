"""OpenAI's error shape, shared by Chat Completions, Responses, models and the admin API."""

from __future__ import annotations

from typing import Any

import orjson

from mesh.errors import MeshError

# MeshError.kind -> OpenAI error `type`
_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "insufficient_credits": "insufficient_quota",
    "permission": "permission_error",
    "not_found": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "internal": "server_error",
    "engine": "server_error",
    "unavailable": "server_error",
    "overloaded": "server_error",
    "timeout": "server_error",
}


def error_body(err: MeshError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": _TYPES.get(err.kind, "server_error"),
            "param": err.param,
            "code": err.code,
        }
    }


def render_error(err: MeshError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for an error known before the response started."""
    return err.status, error_body(err)


def stream_error_event(err: MeshError) -> bytes:
    """The in-band error for a stream that already started (openai-python raises on it)."""
    return b"data: " + orjson.dumps(error_body(err)) + b"\n\n"
