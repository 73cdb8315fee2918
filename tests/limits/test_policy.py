"""Effective limits: overrides over configured defaults; 0 lifts a limit; junk is ignored."""

from __future__ import annotations

import pytest

from mesh.config import RateLimitConfig
from mesh.limits.policy import (
    RateLimits,
    Scope,
    effective,
    merge_overrides,
    overrides_from_json,
    principal_scopes,
)

DEFAULT = RateLimitConfig(rpm=60, tpm=None, concurrent=0)


def test_effective_takes_overrides_then_defaults() -> None:
    assert effective(None, DEFAULT) == RateLimits(rpm=60)
    assert effective({"rpm": 5, "tpm": 1000}, DEFAULT) == RateLimits(rpm=5, tpm=1000)
    assert effective({"rpm": 0, "concurrent": 3}, DEFAULT) == RateLimits(concurrent=3)  # 0 lifts the default
    assert effective({"rpm": None}, DEFAULT) == RateLimits(rpm=60)


def test_junk_in_the_column_means_default() -> None:
    assert overrides_from_json({"rpm": "10", "tpm": -1, "concurrent": True, "other": 3}) == {}
    assert overrides_from_json(["rpm", 1]) == {}
    assert effective({"rpm": 2.5}, DEFAULT) == RateLimits(rpm=60)


def test_merge_overrides() -> None:
    assert merge_overrides(None, {"rpm": 5}) == {"rpm": 5}
    assert merge_overrides({"rpm": 5, "tpm": 9}, {"rpm": None, "concurrent": 0}) == {"tpm": 9, "concurrent": 0}
    assert merge_overrides({"rpm": 5}, {"rpm": None}) is None
    with pytest.raises(ValueError, match="unknown rate limit"):
        merge_overrides(None, {"rph": 1})


def test_principal_scopes_keep_only_limited_scopes() -> None:
    none = RateLimitConfig()
    assert principal_scopes("key_1", "acct_1", None, None, none, none) == ()
    scopes = principal_scopes("key_1", "acct_1", {"tpm": 100}, None, none, RateLimitConfig(concurrent=4))
    assert scopes == (
        Scope("key", "key_1", "acct_1", RateLimits(tpm=100)),
        Scope("account", "acct_1", "acct_1", RateLimits(concurrent=4)),
    )
    assert [s.name for s in scopes] == ["key:key_1", "account:acct_1"]
