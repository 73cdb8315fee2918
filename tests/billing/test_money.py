"""Credits are parsed and printed exactly; floats never get in."""

from __future__ import annotations

from decimal import Decimal

import pytest

from mesh.billing.money import format_credits, parse_credits


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("12.5", 12_500_000),
        ("0.000001", 1),
        ("3", 3_000_000),
        (" 7.250000 ", 7_250_000),
        ("+1", 1_000_000),
        ("123456789.123456", 123_456_789_123_456),
        (Decimal("0.1"), 100_000),
        (5, 5_000_000),
    ],
)
def test_parse_credits_exact(text: str | Decimal | int, micro: int) -> None:
    assert parse_credits(text) == micro


@pytest.mark.parametrize("text", ["1.0000001", "abc", "", "1e3", "1.2.3", ".", "NaN", "inf", "0x10"])
def test_parse_credits_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_credits(text)


def test_parse_credits_rejects_negative_unless_allowed() -> None:
    with pytest.raises(ValueError):
        parse_credits("-1")
    assert parse_credits("-1.5", allow_negative=True) == -1_500_000


@pytest.mark.parametrize("value", [1.5, 0.1, True, None, [1]])
def test_parse_credits_rejects_floats_and_non_numbers(value: object) -> None:
    with pytest.raises(TypeError):
        parse_credits(value)  # type: ignore[arg-type]  # the point of the test


@pytest.mark.parametrize(
    ("micro", "text"),
    [(12_345_678, "12.345678"), (0, "0.000000"), (1, "0.000001"), (-5, "-0.000005"), (10**12, "1000000.000000")],
)
def test_format_credits_six_decimals(micro: int, text: str) -> None:
    assert format_credits(micro) == text


def test_format_credits_rejects_float() -> None:
    with pytest.raises(TypeError):
        format_credits(1.0)  # type: ignore[arg-type]  # the point of the test


def test_format_parse_round_trip() -> None:
    for micro in (0, 1, 999_999, 1_000_000, 98_765_432_101):
        assert parse_credits(format_credits(micro)) == micro
