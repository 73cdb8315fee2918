"""The one parser of a request's credential, for every kind of caller (customer keys, the
admin key, worker tokens), so that all routes agree on what a malformed header is.

``Authorization: Bearer <token>`` (scheme case-insensitive, exactly one token) wins;
without an Authorization header, ``x-api-key`` (Anthropic's header) where the route
accepts it. An empty Authorization header counts as absent. Anything else in
Authorization (another scheme, no token, a token with spaces) is a 401, never a
fall-through to another header. A header given twice (two Authorization headers, or two
``x-api-key``) is malformed too: Authorization is a singleton field (RFC 9110), and a proxy
in front that reads the other copy must not disagree with Mesh about who is calling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mesh.errors import AuthenticationFailed

MALFORMED = "Malformed Authorization header; expected 'Bearer <key>'."


def presented_credential(authorization: str | None, api_key: str | None = None) -> str | None:
    """The token the request presents, or None when it presents none.

    Raises :class:`AuthenticationFailed` (401) for a malformed Authorization header.
    """
    if authorization is not None and authorization.strip():  # an empty header presents nothing
        parts = authorization.strip().split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise AuthenticationFailed(MALFORMED)
        return parts[1]
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


class _Headers(Protocol):
    def getlist(self, key: str) -> Sequence[str]: ...


def single(headers: _Headers, name: str) -> str | None:
    """The one value of header ``name``, None if absent; 401 (malformed) if it is given twice."""
    values = headers.getlist(name)
    if len(values) > 1:
        raise AuthenticationFailed(MALFORMED if name == "authorization" else f"The {name} header is given twice.")
    return values[0] if values else None
