"""Rate-limit response headers, in the shape of the protocol the request came in by.

OpenAI (Chat Completions, Responses)::

    x-ratelimit-limit-requests: 60        x-ratelimit-limit-tokens: 150000
    x-ratelimit-remaining-requests: 59    x-ratelimit-remaining-tokens: 149984
    x-ratelimit-reset-requests: 1s        x-ratelimit-reset-tokens: 6m0s

Anthropic (``ctx.protocol`` starting with ``anthropic``)::

    anthropic-ratelimit-requests-limit / -remaining / -reset (RFC 3339 time)
    anthropic-ratelimit-tokens-limit / -remaining / -reset

Values are those of the tightest scope (key or account) at admission; "reset" is when the
bucket is full again. A request whose principal has no limits gets no such headers.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Protocol

from mesh.limits.base import LimitState, Window


class HasLimitState(Protocol):
    """What :func:`limits_headers` reads of a ``RequestContext``."""

    protocol: str
    limit_state: LimitState | None


def duration_text(seconds: float) -> str:
    """Go's ``time.Duration`` style as OpenAI sends it: ``12ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    # A nonzero fraction has a nonzero digit: stripping its zeros never reaches the point.
    secs = f"{whole}.{frac:03d}".rstrip("0") + "s" if frac else f"{whole}s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def rfc3339(epoch: float) -> str:
    """``2026-01-01T12:00:05Z`` (whole seconds, rounded up so the bucket is surely full)."""
    return datetime.fromtimestamp(math.ceil(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Each window's three header names, spelled once rather than formatted per response.
_OPENAI_REQUESTS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_OPENAI_TOKENS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def _openai(out: dict[str, str], names: tuple[str, str, str], w: Window) -> None:
    limit, remaining, reset = names
    out[limit] = str(w.limit)
    out[remaining] = str(w.remaining)
    out[reset] = duration_text(w.reset)


def _anthropic(out: dict[str, str], what: str, w: Window, at: float) -> None:
    out[f"anthropic-ratelimit-{what}-limit"] = str(w.limit)
    out[f"anthropic-ratelimit-{what}-remaining"] = str(w.remaining)
    out[f"anthropic-ratelimit-{what}-reset"] = rfc3339(at + w.reset)


def state_headers(state: LimitState | None, protocol: str) -> dict[str, str]:
    """The headers for ``state`` in the shape of ``protocol`` (empty without limits)."""
    out: dict[str, str] = {}
    if state is None:
        return out
    if protocol.startswith("anthropic"):
        for what, w in (("requests", state.requests), ("tokens", state.tokens)):
            if w is not None:
                _anthropic(out, what, w, state.at)
        return out
    if state.requests is not None:
        _openai(out, _OPENAI_REQUESTS, state.requests)
    if state.tokens is not None:
        _openai(out, _OPENAI_TOKENS, state.tokens)
    return out


def limits_headers(ctx: HasLimitState) -> dict[str, str]:
    """The rate-limit headers of a request, for success and error responses alike."""
    return state_headers(ctx.limit_state, ctx.protocol)
