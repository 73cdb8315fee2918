"""Usage charts as inline SVG, drawn on the server: they need no JavaScript and no library.

:func:`daily_bars` draws stacked bars per UTC day; :func:`model_bars` draws one row per
model with a tokens bar and a credits bar (text in HTML, bars in SVG, so that the labels
keep their size at any width). Colours come from CSS classes (``series-0``,
``series-1``, …) so the one stylesheet themes them; every bar has a ``<title>`` tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

from markupsafe import Markup, escape

WIDTH = 480
HEIGHT = 200
LEFT = 46
RIGHT = 6
TOP = 10
BOTTOM = 22


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    values: Sequence[int]


@dataclass(frozen=True, slots=True)
class ModelRow:
    model: str
    tokens: int
    cost: int


def nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times 10^k at or above ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp + 1e-12:
            return float(step * exp)
    return 10.0 * exp


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def daily_bars(
    days: Sequence[date],
    series: Sequence[Series],
    *,
    label: str,
    fmt: Callable[[int], str],
    scale: int = 1,
) -> Markup:
    """Stacked bars, one per day, with a y axis of three gridlines.

    ``values`` are integers; ``scale`` divides them for the axis only (credits are drawn
    from micro-credits with ``scale=1_000_000`` so that the axis reads in credits).
    """
    n = max(1, len(days))
    totals = [sum(s.values[i] for s in series) for i in range(len(days))]
    top = nice_max(max(totals, default=0) / scale)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.72)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>'
    ]
    for frac in (0, 0.5, 1):
        y = TOP + plot_h * (1 - frac)
        value = top * frac
        text = _axis_label(value, scale, fmt)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{_num(y)}" y2="{_num(y)}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">{escape(text)}</text>')
    for i, day in enumerate(days):
        x = LEFT + slot * i + (slot - bar_w) / 2
        base: float = TOP + plot_h
        tip = [day_label(day)] + [f"{s.label}: {fmt(s.values[i])}" for s in series]
        parts.append(f"<g><title>{escape(' · '.join(tip))}</title>")
        parts.append(
            f'<rect class="hit" x="{_num(LEFT + slot * i)}" y="{TOP}" width="{_num(slot)}" height="{plot_h}"/>'
        )
        for k, s in enumerate(series):
            h = plot_h * (s.values[i] / scale) / top if top else 0
            if h <= 0:
                continue
            h = max(h, 1.0)
            base -= h
            parts.append(
                f'<rect class="series-{k}" x="{_num(x)}" y="{_num(base)}" width="{_num(bar_w)}" height="{_num(h)}"'
                ' rx="1.5"/>'
            )
        parts.append("</g>")
        if i % 7 == (n - 1) % 7:
            cx = LEFT + slot * i + slot / 2
            parts.append(
                f'<text class="axis" x="{_num(cx)}" y="{HEIGHT - 6}" text-anchor="middle">{day_label(day)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def day_label(day: date) -> str:
    return f"{day:%b} {day.day}"


def _axis_label(value: float, scale: int, fmt: Callable[[int], str]) -> str:
    if scale == 1:
        return fmt(round(value))
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def model_bars(rows: Sequence[ModelRow], *, label: str, tokens_fmt: Callable[[int], str],
               credits_fmt: Callable[[int], str]) -> Markup:
    """One row per model: its name and totals as text, and an SVG tokens bar and credits bar
    scaled to the largest model (the bars stretch with the card; the text stays text)."""
    max_tokens = max((r.tokens for r in rows), default=0) or 1
    max_cost = max((r.cost for r in rows), default=0) or 1
    parts = [f'<ul class="model-bars" aria-label="{escape(label)}">']
    for r in rows:
        totals = f"{tokens_fmt(r.tokens)} tokens · {credits_fmt(r.cost)} credits"
        tw = max(0.5, 100 * r.tokens / max_tokens) if r.tokens else 0
        cw = max(0.5, 100 * r.cost / max_cost) if r.cost else 0
        parts.append(
            f'<li><div class="model-bars-head"><span class="mono">{escape(r.model)}</span>'
            f'<span class="muted">{escape(totals)}</span></div>'
            f'<svg class="bars" viewBox="0 0 100 22" preserveAspectRatio="none" role="img" '
            f'aria-label="{escape(r.model)}: {escape(totals)}" xmlns="http://www.w3.org/2000/svg">'
            f'<title>{escape(r.model)}: {escape(totals)}</title>'
            '<rect class="track" x="0" y="0" width="100" height="9"/>'
            f'<rect class="series-0" x="0" y="0" width="{_num(tw)}" height="9"/>'
            '<rect class="track" x="0" y="13" width="100" height="9"/>'
            f'<rect class="series-2" x="0" y="13" width="{_num(cw)}" height="9"/></svg></li>'
        )
    parts.append("</ul>")
    return Markup("".join(parts))
