"""Server-side SVG charts and the numbers the console prints."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from mesh.billing.money import MicroCredits
from mesh.billing.usage import DailyUsage
from mesh.console import display
from mesh.console.charts import ModelRow, Series, daily_bars, model_bars, nice_max
from mesh.console.usage_view import usage_view


@pytest.mark.parametrize(("value", "top"), [(0, 1), (0.7, 1), (1, 1), (1.2, 2), (3, 5), (42, 50), (70, 100),
                                            (0.00007, 0.0001), (230, 250)])
def test_nice_max_rounds_up_to_a_readable_top(value: float, top: float) -> None:
    assert nice_max(value) == pytest.approx(top)


def test_daily_bars_draws_one_stack_per_day_with_tooltips() -> None:
    days = [date(2026, 11, 1) + timedelta(days=i) for i in range(3)]
    svg = daily_bars(days, [Series("input", [10, 0, 30]), Series("output", [5, 0, 10])],
                     label="Tokens <per> day", fmt=display.tokens)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="series-0"') == 2 and svg.count('class="series-1"') == 2
    assert "Nov 3 · input: 30 · output: 10" in svg
    assert "Tokens &lt;per&gt; day" in svg  # labels are escaped
    assert ">50<" in svg  # the axis top: 40 rounded up


def test_credit_axis_reads_in_credits() -> None:
    svg = daily_bars([date(2026, 11, 1)], [Series("credits", [71])], label="c", fmt=display.credits,
                     scale=1_000_000)
    assert ">0.0001<" in svg and ">0.00005<" in svg and "e-05" not in svg


def test_model_bars_scale_to_the_largest_model() -> None:
    html = model_bars([ModelRow("big", 100, 2_000_000), ModelRow("<small>", 25, 0)], label="by model",
                      tokens_fmt=display.tokens, credits_fmt=display.credits)
    assert 'width="100"' in html and 'width="25"' in html
    assert "&lt;small&gt;" in html and "<small>" not in html
    assert "100 tokens · 2.00 credits" in html


def test_usage_view_totals_and_month() -> None:
    today = date(2026, 11, 30)

    def row(day: date, model: str, cost: int) -> DailyUsage:
        return DailyUsage("acct", day, model, 2, 10, 0, 5, 0, MicroCredits(cost))

    rows = [row(date(2026, 10, 31), "a", 1000), row(date(2026, 11, 1), "a", 7), row(today, "a", 100),
            row(today, "b", 300)]
    view = usage_view(rows, today)  # Oct 31 is out of both the 30 days and the month
    assert view.requests == 6 and view.tokens == 45 and view.cost == 407
    assert view.month_cost == 407
    assert [m.model for m in view.by_model] == ["b", "a"]
    assert not view.empty and usage_view([], today).empty


@pytest.mark.parametrize(("micro", "text"), [(0, "0.00"), (12_500_000, "12.50"), (1_234, "0.001234"),
                                             (1_234_567_890_000, "1,234,567.89"), (-2_000_000, "-2.00"),
                                             (None, "—")])
def test_credits_are_exact(micro: int | None, text: str) -> None:
    assert display.credits(micro) == text


def test_tokens_ago_and_ms() -> None:
    assert [display.tokens(n) for n in (950, 12_345, 4_560_000)] == ["950", "12.3k", "4.56M"]
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert display.ago(None) == "never"
    assert display.ago(now - timedelta(seconds=10), now) == "just now"
    assert display.ago(now - timedelta(minutes=5), now) == "5 min ago"
    assert display.ago(now - timedelta(days=1, hours=1), now) == "1 day ago"
    assert display.ms(1500) == "1500 ms" and display.ms(12_000) == "12.0 s"
