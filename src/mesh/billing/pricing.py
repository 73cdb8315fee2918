"""What a request costs, exactly, in micro-credits.

Prices come from :class:`mesh.config.Pricing`: ``Decimal`` credits per million tokens
plus a fixed ``request`` fee in credits. A price of P credits per million tokens is P
micro-credits per token, so a request costs::

    (input - cached) * input + cached * cached_input + output * output + request * 10**6

micro-credits, computed with exact fractions and rounded *up* once, per request, to a
whole micro-credit. ``output_tokens`` already include reasoning tokens.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

from mesh.billing.money import MICROS_PER_CREDIT, MicroCredits
from mesh.canonical import Usage
from mesh.config import Pricing

# What max_output_tokens_affordable answers when output is free: any count is affordable.
UNLIMITED_TOKENS = 2**62


@lru_cache(maxsize=1024)
def _price(p: Pricing) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    cached = p.input if p.cached_input is None else p.cached_input
    return Fraction(p.input), Fraction(cached), Fraction(p.output), Fraction(p.request) * MICROS_PER_CREDIT


def _scale(p: Pricing) -> tuple[int, int, int, int, int]:
    prices = _price(p)
    den = math.lcm(*(f.denominator for f in prices))
    n_in, n_cached, n_out, n_fee = (int(f * den) for f in prices)
    return n_in, n_cached, n_out, n_fee, den


# id(pricing) -> (pricing, its scaled prices). Keyed on identity: hashing a pydantic model
# (its four Decimals) per lookup was most of what a cached lookup cost, and the few Pricing
# objects a gateway has come from its configuration and live as long as it. The entry holds
# the object, so its id cannot be reused while the entry exists; Pricing is frozen, so the
# prices of an object never change.
_SCALED: dict[int, tuple[Pricing, tuple[int, int, int, int, int]]] = {}
_SCALED_MAX = 1024


def _scaled(p: Pricing) -> tuple[int, int, int, int, int]:
    """The four prices as integers over one common denominator, so that a request's cost is
    integer arithmetic (Fraction arithmetic per request was a measured 4% of its CPU)."""
    found = _SCALED.get(id(p))
    if found is not None and found[0] is p:
        return found[1]
    scaled = _scale(p)
    if len(_SCALED) >= _SCALED_MAX:
        _SCALED.clear()
    _SCALED[id(p)] = (p, scaled)
    return scaled


def _check_tokens(**counts: int) -> None:
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name} cannot be negative: {n}")


def token_cost(
    pricing: Pricing, *, input_tokens: int = 0, cached_tokens: int = 0, output_tokens: int = 0
) -> MicroCredits:
    """The cost of these token counts plus the request fee, rounded up to a micro-credit.

    ``cached_tokens`` is part of ``input_tokens``; it is clamped to ``input_tokens``.
    """
    _check_tokens(input_tokens=input_tokens, cached_tokens=cached_tokens, output_tokens=output_tokens)
    n_in, n_cached, n_out, n_fee, den = _scaled(pricing)
    cached = min(cached_tokens, input_tokens)
    exact = (input_tokens - cached) * n_in + cached * n_cached + output_tokens * n_out + n_fee
    return MicroCredits(-(-exact // den))


def cost(pricing: Pricing, usage: Usage) -> MicroCredits:
    """The exact cost of a finished request's usage, rounded up once to a whole micro-credit."""
    i, c, o = usage.input_tokens, usage.cached_tokens, usage.output_tokens
    if type(i) is int and type(c) is int and type(o) is int and i >= 0 and c >= 0 and o >= 0:
        # Every request prices its usage two or three times: token_cost's checks, inlined.
        n_in, n_cached, n_out, n_fee, den = _scaled(pricing)
        cached = c if c < i else i
        return MicroCredits(-(-((i - cached) * n_in + cached * n_cached + o * n_out + n_fee) // den))
    return token_cost(  # raises the error the counts deserve
        pricing,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens,
        output_tokens=usage.output_tokens,
    )


def hold_cost(pricing: Pricing, prompt_tokens: int, max_output_tokens: int) -> MicroCredits:
    """An upper bound for admission: the prompt priced as uncached (or cached, if dearer)."""
    if not (type(prompt_tokens) is int and type(max_output_tokens) is int
            and prompt_tokens >= 0 and max_output_tokens >= 0):  # the common case, checked inline
        _check_tokens(prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens)
    n_in, n_cached, n_out, n_fee, den = _scaled(pricing)
    exact = prompt_tokens * max(n_in, n_cached) + max_output_tokens * n_out + n_fee
    return MicroCredits(-(-exact // den))


def max_output_tokens_affordable(pricing: Pricing, available: int, prompt_tokens: int) -> int:
    """The most output tokens that ``available`` micro-credits pay for after the prompt.

    The prompt is priced as in :func:`hold_cost`. Returns 0 when the prompt and fee alone
    already use up (or exceed) ``available``; :data:`UNLIMITED_TOKENS` when output is free
    and the prompt is affordable.
    """
    _check_tokens(prompt_tokens=prompt_tokens)
    p_in, p_cached, p_out, fee = _price(pricing)
    left = Fraction(available) - prompt_tokens * max(p_in, p_cached) - fee
    if left < 0:
        return 0
    if p_out == 0:
        return UNLIMITED_TOKENS
    # ceil(base + n * p_out) <= available  <=>  base + n * p_out <= available (an integer)
    return int(left // p_out)
