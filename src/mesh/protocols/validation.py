"""Turns raw bodies into protocol models, with pydantic errors rendered as one clear 400."""

from __future__ import annotations

from typing import Any, TypeVar, cast

import orjson
from pydantic import BaseModel, ValidationError

from mesh.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

# Deepest nesting a body may have. Real tool schemas stay far below; orjson refuses to
# serialise past 255 levels, so a deeper body would fail later, on the way to the engine.
MAX_JSON_DEPTH = 64


def loads_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body or raise :class:`InvalidRequest`."""
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Nesting past the limit needs more opening brackets than the limit: most bodies have too
    # few for that, which two byte counts show without walking the parsed body.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(data, MAX_JSON_DEPTH):
        raise InvalidRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
    return data


def _too_deep(data: Any, limit: int) -> bool:
    """Whether any container sits more than ``limit`` levels down (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def param_path(loc: tuple[int | str, ...], data: Any = None) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``.

    Drops the parts pydantic adds for unions: type tags (``str``, ``list[…]``) and the
    discriminator value of a tagged union (``messages.0.user.content``), recognised by
    walking ``data`` alongside the location.
    """
    out = ""
    node = data
    last = len(loc) - 1
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            continue
        tag = isinstance(node, dict) and part not in node and part in (node.get("role"), node.get("type"))
        if tag and i < last:
            continue  # a tagged-union discriminator value
        if part.startswith(("function-", "union[", "tagged-union[")) or "[" in part or part in _TAGS:
            continue
        out += f".{part}" if out else part
        node = node.get(part) if isinstance(node, dict) else None
    return out


_TAGS = {"str", "list", "dict", "int", "float", "bool", "none", "literal", "lax-or-strict", "json-or-python"}


def validate(model: type[M], data: dict[str, Any], prefix: str = "") -> M:
    """Validate ``data`` into ``model``; the first error becomes an :class:`InvalidRequest`.

    ``prefix`` is where ``data`` sits in the whole body (``input[3]``), for the error's param.
    """
    try:
        # The model's validator itself: model_validate only adds a Python call around it
        # (about 1 us a request, with its defaults that change nothing here).
        return cast(M, model.__pydantic_validator__.validate_python(data))
    except ValidationError as exc:
        raise _to_invalid(exc, data, prefix) from None


def _to_invalid(exc: ValidationError, data: Any, prefix: str = "") -> InvalidRequest:
    errors = exc.errors(include_url=False)
    # Prefer the most specific error (the longest location) among union alternatives.
    err = max(errors, key=lambda e: len(e["loc"]))
    param = param_path(tuple(err["loc"]), data)
    if prefix:
        param = prefix + ("" if not param or param.startswith("[") else ".") + param
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        text = f"Missing required parameter: '{param}'."
    elif err["type"] == "extra_forbidden":
        text = f"Unrecognized request argument supplied: '{param}'."
    else:
        text = f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."
    return InvalidRequest(text, param=param or None, code="invalid_value" if err["type"] != "missing" else None)


def check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata rules (Chat and Responses): at most 16 pairs, keys of at most 64
    characters, values of at most 512."""
    if v is not None:
        if len(v) > 16:
            raise ValueError("metadata can hold at most 16 pairs")
        for k, val in v.items():
            if len(k) > 64 or len(val) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
    return v
