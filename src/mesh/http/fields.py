"""Request header lookups straight on the ASGI scope's raw list.

ASGI servers send header names lower-cased, so a name is one bytes comparison per header.
Starlette's ``request.headers.get`` lower-cases and encodes the name, then, for an absent
header (``x-mesh-tags``, ``x-session-id`` on most requests), raises and catches a
``KeyError``: four times the cost, on every inference request.
"""

from __future__ import annotations

from starlette.types import Scope


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), None if absent: ``request.headers.get(name)``."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


class ScopeHeaders:
    """``getlist`` over a scope's headers, for :func:`mesh.http.credentials.single`."""

    __slots__ = ("_raw",)

    def __init__(self, scope: Scope) -> None:
        self._raw: list[tuple[bytes, bytes]] = scope["headers"]

    def getlist(self, key: str) -> list[str]:
        name = key.encode("latin-1")
        return [value.decode("latin-1") for k, value in self._raw if k == name]
