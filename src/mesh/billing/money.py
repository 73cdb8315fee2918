"""Money: integer micro-credits. ``Decimal`` only at the edges (config, CLI, HTTP bodies).

One credit is 1,000,000 micro-credits. Floats are refused everywhere: a float reaching
billing raises ``TypeError`` instead of rounding silently.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import NewType

MicroCredits = NewType("MicroCredits", int)

MICROS_PER_CREDIT = 1_000_000
DECIMALS = 6


def to_micro(value: Decimal, *, allow_negative: bool = False) -> MicroCredits:
    """An exact ``Decimal`` number of credits as micro-credits.

    Raises ``ValueError`` for more than 6 decimal places, non-finite values, or a negative
    value unless ``allow_negative``.
    """
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    if value < 0 and not allow_negative:
        raise ValueError(f"amount cannot be negative: {value}")
    scaled = value.scaleb(DECIMALS)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"amount has more than {DECIMALS} decimal places: {value}")
    return MicroCredits(int(scaled))


def parse_credits(value: str | Decimal | int, *, allow_negative: bool = False) -> MicroCredits:
    """Parse credits written as a decimal (``"12.5"``, ``Decimal("0.000001")``, ``3``).

    Raises ``TypeError`` for floats (and other types), ``ValueError`` for text that is not
    a plain decimal, for more than 6 decimal places, and for negatives unless
    ``allow_negative``.
    """
    if isinstance(value, bool) or not isinstance(value, str | Decimal | int):
        raise TypeError(f"credits must be a decimal string, Decimal or int, not {type(value).__name__}")
    if isinstance(value, str):
        text = value.strip()
        if not text or any(c not in "+-0123456789." for c in text):
            raise ValueError(f"not a decimal amount: {value!r}")
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {value!r}") from None
    if isinstance(value, int):
        value = Decimal(value)
    return to_micro(value, allow_negative=allow_negative)


def format_credits(micro: int) -> str:
    """Micro-credits as a credit amount with exactly 6 decimals: ``12345678`` → ``"12.345678"``."""
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError(f"micro-credits must be an int, not {type(micro).__name__}")
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"
