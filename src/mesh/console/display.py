"""How the console writes numbers, money and times (Jinja filters, also used by charts).

Money stays exact: :func:`credits` trims trailing zeros of the 6-decimal amount but never
rounds, so what a customer reads is what the ledger holds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mesh.billing.money import format_credits


def credits(micro: int | None, places: int = 2) -> str:
    """``12_500_000`` → ``"12.50"``, ``1_234`` → ``"0.001234"``: exact, at least ``places`` decimals."""
    if micro is None:
        return "—"
    text = format_credits(int(micro))
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    frac = frac + "0" * max(0, places - len(frac))
    sign = "-" if whole.startswith("-") else ""
    digits = whole.lstrip("-")
    grouped = f"{int(digits):,}"
    return f"{sign}{grouped}.{frac}" if frac else f"{sign}{grouped}"


def tokens(n: int | None) -> str:
    """Short token counts: 950, 12.3k, 4.56M."""
    if n is None:
        return "—"
    for size, unit in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if abs(n) >= size:
            value = n / size
            text = f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"
            return text.rstrip("0").rstrip(".") + unit
    return str(n)


def number(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def when(ts: datetime | None) -> str:
    """``2026-11-30 14:05 UTC``."""
    return "—" if ts is None else ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def short(ts: datetime | None, now: datetime | None = None) -> str:
    """``Nov 30, 14:05`` (UTC); the year only when it is not this year's."""
    if ts is None:
        return "—"
    ts = ts.astimezone(UTC)
    year = "" if ts.year == (now or datetime.now(UTC)).year else f" {ts.year}"
    return f"{ts:%b} {ts.day}{year}, {ts:%H:%M}"


def ago(ts: datetime | None, now: datetime | None = None) -> str:
    """``just now``, ``5 min ago``, ``3 h ago``, ``2 days ago``; never → ``never``."""
    if ts is None:
        return "never"
    seconds = int(((now or datetime.now(UTC)) - ts).total_seconds())
    if seconds < 0:
        return "in " + ago(now or datetime.now(UTC), ts).removesuffix(" ago")
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    days = seconds // 86400
    return f"{days} day{'s' if days != 1 else ''} ago"


def ms(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def price(value: Any) -> str:
    """A per-million price from the catalog (a Decimal) without float noise."""
    if value is None:
        return "—"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


FILTERS = {
    "credits": credits,
    "tokens": tokens,
    "number": number,
    "when": when,
    "short": short,
    "ago": ago,
    "ms": ms,
    "price": price,
}
