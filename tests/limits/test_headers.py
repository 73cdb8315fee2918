"""Rate-limit headers in each protocol's shape, and the duration / time formats."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mesh.limits.base import LimitState, Window
from mesh.limits.headers import duration_text, limits_headers, rfc3339, state_headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.012, "12ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (1.2345, "1.235s"),
        (59.9999, "1m0s"),
        (360, "6m0s"),
        (72, "1m12s"),
        (3723.25, "1h2m3.25s"),
        (-3, "0s"),
    ],
)
def test_duration_text_is_go_style(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_rfc3339_rounds_up_to_the_second() -> None:
    assert rfc3339(1_767_225_600.2) == "2026-01-01T00:00:01Z"
    assert rfc3339(1_767_225_600) == "2026-01-01T00:00:00Z"


STATE = LimitState(requests=Window(60, 59, 1.0), tokens=Window(150_000, 149_984, 0.0064), at=1_767_225_600.0)


def test_openai_headers() -> None:
    assert state_headers(STATE, "openai.chat") == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "7ms",
    }


def test_anthropic_headers_reset_as_times() -> None:
    assert state_headers(STATE, "anthropic.messages") == {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-remaining": "59",
        "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
        "anthropic-ratelimit-tokens-limit": "150000",
        "anthropic-ratelimit-tokens-remaining": "149984",
        "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:01Z",
    }


@dataclass
class Ctx:
    protocol: str
    limit_state: LimitState | None


def test_only_limited_dimensions_get_headers() -> None:
    assert limits_headers(Ctx("openai.responses", None)) == {}
    only_tokens = LimitState(requests=None, tokens=Window(100, 0, 30.0), at=0.0)
    assert limits_headers(Ctx("openai.responses", only_tokens)) == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "30s",
    }
