"""Budget periods: when each ends, and what the operator may set."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mesh.billing.budgets import check, next_reset
from mesh.errors import InvalidRequest


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "day", "now", "expected"),
    [
        ("daily", None, "2026-12-06T23:59:59", "2026-12-07T00:00:00"),
        ("daily", None, "2026-12-31T00:00:00", "2027-01-01T00:00:00"),
        ("weekly", 0, "2026-12-06T10:00:00", "2026-12-07T00:00:00"),  # a Sunday: Monday next
        ("weekly", 6, "2026-12-06T10:00:00", "2026-12-13T00:00:00"),  # on the day itself: a week on
        ("monthly", 1, "2026-12-06T10:00:00", "2027-01-01T00:00:00"),
        ("monthly", 15, "2026-12-06T10:00:00", "2026-12-15T00:00:00"),
        ("monthly", 6, "2026-12-06T00:00:00", "2027-01-06T00:00:00"),
        ("monthly", 28, "2027-02-28T12:00:00", "2027-03-28T00:00:00"),
    ],
)
def test_next_reset(period: str, day: int | None, now: str, expected: str) -> None:
    assert next_reset(period, day, at(now)) == at(expected)


def test_no_period_never_resets() -> None:
    assert next_reset("none", None, at("2026-12-06T00:00:00")) is None
    assert next_reset(None, None, at("2026-12-06T00:00:00")) is None


def test_check_defaults_and_refusals() -> None:
    assert check("weekly", None) == ("weekly", 0)
    assert check("monthly", None) == ("monthly", 1)
    assert check("daily", None) == ("daily", None)
    for period, day, param in [
        ("hourly", None, "budget_period"), ("weekly", 7, "budget_reset_day"), ("monthly", 29, "budget_reset_day"),
        ("monthly", 0, "budget_reset_day"), ("daily", 1, "budget_reset_day"), ("weekly", True, "budget_reset_day"),
    ]:
        with pytest.raises(InvalidRequest) as exc:
            check(period, day)  # type: ignore[arg-type]
        assert exc.value.param == param
