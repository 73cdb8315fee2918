"""What is limited: the rate-limit values of a key or an account, and how they combine.

Limits come from three places, most specific first:

* the ``rate_limits`` JSON column of the key or the account (the operator's overrides),
  ``{"rpm": int, "tpm": int, "concurrent": int}`` where a missing or null field means
  "the configured default" and ``0`` means "no limit" (so a default can be lifted);
* the ``limits.key`` / ``limits.account`` defaults of the configuration, where null or
  ``0`` means no limit.

A :class:`Scope` is one limited thing (a key or an account) with its effective limits;
a request is admitted only if every scope of its principal admits it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.config import RateLimitConfig

FIELDS = ("rpm", "tpm", "concurrent")
UNLIMITED = 0  # an override of 0 lifts the configured default
MAX_LIMIT = 10**12  # anything larger is a typo, and would lose precision in Redis' doubles

ScopeKind = Literal["key", "account"]


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests per minute, tokens (input + output) per minute, requests in flight.

    ``None`` means no limit of that kind.
    """

    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.concurrent is not None


NO_LIMITS = RateLimits()


def _positive(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return min(value, MAX_LIMIT)


def overrides_from_json(raw: Any) -> dict[str, int]:
    """The overrides stored in a ``rate_limits`` column: only well-formed fields survive
    (a hand-edited row with junk in it means "default", never an error on the hot path)."""
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, int] = {}
    for name in FIELDS:
        value = raw.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LIMIT:
            out[name] = value
    return out


def merge_overrides(current: Any, patch: Mapping[str, int | None]) -> dict[str, int] | None:
    """Apply a PATCH to stored overrides: a field set to an int replaces it, a field set to
    ``None`` drops it (back to the default). ``None`` when nothing is left (store NULL)."""
    merged = overrides_from_json(current)
    for name, value in patch.items():
        if name not in FIELDS:
            raise ValueError(f"unknown rate limit {name!r}")
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged or None


def effective(overrides: Any, default: RateLimitConfig) -> RateLimits:
    """The limits that apply: each override, else the default; 0 and null mean no limit."""
    stored = overrides_from_json(overrides)

    def pick(name: str) -> int | None:
        if name in stored:
            return _positive(stored[name])
        return _positive(getattr(default, name))

    return RateLimits(rpm=pick("rpm"), tpm=pick("tpm"), concurrent=pick("concurrent"))


@dataclass(frozen=True, slots=True)
class Scope:
    """One limited thing: ``kind`` ``key`` or ``account``, its ``id``, and the account it
    belongs to (``account_id``; the account itself for an account scope)."""

    kind: ScopeKind
    id: str
    account_id: str
    limits: RateLimits
    # "kind:id", the limiter's bucket name: made once (scopes live on the cached principal),
    # not at every lookup of every request.
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.kind}:{self.id}")


def principal_scopes(
    key_id: str,
    account_id: str,
    key_overrides: Any,
    account_overrides: Any,
    defaults_key: RateLimitConfig,
    defaults_account: RateLimitConfig,
) -> tuple[Scope, ...]:
    """The scopes a request with this key is limited by: only those with some limit, so an
    unlimited principal has none and costs nothing at admission."""
    scopes = (
        Scope("key", key_id, account_id, effective(key_overrides, defaults_key)),
        Scope("account", account_id, account_id, effective(account_overrides, defaults_account)),
    )
    return tuple(s for s in scopes if s.limits.any)
