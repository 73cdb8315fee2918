"""Usage rows (per day and model) turned into what the dashboards show: totals and charts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from markupsafe import Markup

from mesh.billing.money import MicroCredits
from mesh.billing.usage import DailyUsage
from mesh.console import display
from mesh.console.charts import ModelRow, Series, daily_bars, model_bars

CHART_DAYS = 30


@dataclass(frozen=True, slots=True)
class UsageView:
    requests: int
    tokens: int
    cost: MicroCredits
    month_cost: MicroCredits
    by_model: list[ModelRow]
    tokens_chart: Markup
    credits_chart: Markup
    models_chart: Markup

    @property
    def empty(self) -> bool:
        return self.requests == 0


def usage_view(rows: Sequence[DailyUsage], today: date, days: int = CHART_DAYS) -> UsageView:
    """Charts over the last ``days`` days (today included) and this month's spend."""
    first = today - timedelta(days=days - 1)
    span = [first + timedelta(days=i) for i in range(days)]
    index = {d: i for i, d in enumerate(span)}
    inputs = [0] * days
    outputs = [0] * days
    costs = [0] * days
    models: dict[str, list[int]] = {}
    requests = 0
    month_cost = 0
    for r in rows:
        if r.day >= today.replace(day=1):
            month_cost += r.cost
        i = index.get(r.day)
        if i is None:
            continue
        requests += r.requests
        inputs[i] += r.input_tokens
        outputs[i] += r.output_tokens
        costs[i] += r.cost
        m = models.setdefault(r.model, [0, 0])
        m[0] += r.input_tokens + r.output_tokens
        m[1] += r.cost
    by_model = sorted((ModelRow(k, v[0], v[1]) for k, v in models.items()), key=lambda m: (-m.cost, -m.tokens))
    return UsageView(
        requests=requests,
        tokens=sum(inputs) + sum(outputs),
        cost=MicroCredits(sum(costs)),
        month_cost=MicroCredits(month_cost),
        by_model=by_model,
        tokens_chart=daily_bars(
            span,
            [Series("input", inputs), Series("output", outputs)],
            label=f"Tokens per day, last {days} days",
            fmt=display.tokens,
        ),
        credits_chart=daily_bars(
            span,
            [Series("credits", costs)],
            label=f"Credits spent per day, last {days} days",
            fmt=display.credits,
            scale=1_000_000,
        ),
        models_chart=model_bars(
            by_model, label="Usage by model", tokens_fmt=display.tokens, credits_fmt=display.credits
        ),
    )
