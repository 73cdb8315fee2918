"""Request cost: exact fractions, one round-up per request, no floats."""

from __future__ import annotations

from decimal import Decimal

import pytest

from mesh.billing.pricing import (
    UNLIMITED_TOKENS,
    cost,
    hold_cost,
    max_output_tokens_affordable,
    token_cost,
)
from mesh.canonical import Usage
from mesh.config import Pricing

MINIMAX = Pricing(input=Decimal("0.30"), cached_input=Decimal("0.03"), output=Decimal("1.20"))


def test_cost_splits_cached_and_uncached_input() -> None:
    usage = Usage(input_tokens=1000, cached_tokens=100, output_tokens=7, reasoning_tokens=3)
    # 900 * 0.30 + 100 * 0.03 + 7 * 1.20 = 270 + 3 + 8.4 = 281.4 -> 282 micro-credits
    assert cost(MINIMAX, usage) == 282


def test_cost_reasoning_is_already_in_output() -> None:
    a = cost(MINIMAX, Usage(input_tokens=10, output_tokens=100, reasoning_tokens=90))
    b = cost(MINIMAX, Usage(input_tokens=10, output_tokens=100))
    assert a == b == 123


def test_cost_million_tokens_is_the_listed_price() -> None:
    assert cost(MINIMAX, Usage(input_tokens=1_000_000)) == 300_000  # 0.30 credits
    assert cost(MINIMAX, Usage(output_tokens=1_000_000)) == 1_200_000


def test_cost_cached_defaults_to_input_price() -> None:
    p = Pricing(input=Decimal("2"), output=Decimal("0"))
    assert cost(p, Usage(input_tokens=10, cached_tokens=10)) == 20


def test_cost_rounds_up_once_per_request_not_per_part() -> None:
    p = Pricing(input=Decimal("0.4"), cached_input=Decimal("0.4"), output=Decimal("0.4"))
    # Per part: ceil(0.4) + ceil(0.4) + ceil(0.4) = 3; once: ceil(1.2) = 2.
    assert cost(p, Usage(input_tokens=2, cached_tokens=1, output_tokens=1)) == 2


def test_cost_request_fee_in_credits() -> None:
    p = Pricing(input=Decimal("1"), output=Decimal("1"), request=Decimal("0.0025"))
    assert cost(p, Usage(input_tokens=1, output_tokens=1)) == 2 + 2500


def test_cost_exact_with_tiny_prices() -> None:
    p = Pricing(input=Decimal("0.000001"), output=Decimal("0.0000003"))
    assert cost(p, Usage(input_tokens=1_000_000, output_tokens=1)) == 2  # 1 + 0.0000003 -> 2
    assert cost(p, Usage(input_tokens=1_000_000)) == 1


def test_cost_zero_usage_costs_only_the_fee() -> None:
    assert cost(MINIMAX, Usage()) == 0
    assert cost(Pricing(request=Decimal("0.01")), Usage()) == 10_000


def test_token_cost_rejects_floats_and_negatives() -> None:
    with pytest.raises(TypeError):
        token_cost(MINIMAX, input_tokens=1.5)  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(ValueError):
        token_cost(MINIMAX, output_tokens=-1)


def test_cost_is_token_cost_of_the_usage_and_refuses_what_it_refuses() -> None:
    """``cost`` has its own fast path; it must price exactly as ``token_cost`` does, with a
    cached count above the input clamped, and refuse the same counts."""
    prices = [MINIMAX, Pricing(input=Decimal("0.000001"), output=Decimal("3.3"), request=Decimal("0.0007")),
              Pricing(input=Decimal("7"), cached_input=Decimal("9"), output=Decimal("0"))]
    counts = [0, 1, 2, 7, 999, 10**6 + 1, 2**53]
    for p in prices:
        for i in counts:
            for c in counts:
                for o in counts[:4]:
                    assert cost(p, Usage(i, o, c)) == token_cost(p, input_tokens=i, cached_tokens=c, output_tokens=o)
    for bad, error in ((Usage(1.5, 1), TypeError), (Usage(True, 1), TypeError), (Usage(1, -1), ValueError),  # type: ignore[arg-type]
                       (Usage(1, 1, -2), ValueError)):
        with pytest.raises(error):
            cost(MINIMAX, bad)


def test_hold_cost_prices_prompt_uncached() -> None:
    assert hold_cost(MINIMAX, 1000, 10) == 300 + 12


def test_max_output_tokens_affordable_is_exact() -> None:
    # 1000 available, prompt 1000 tokens costs 300, 700 left at 1.2 each -> 583 tokens
    assert max_output_tokens_affordable(MINIMAX, 1000, 1000) == 583
    assert hold_cost(MINIMAX, 1000, 583) <= 1000 < hold_cost(MINIMAX, 1000, 584)


def test_max_output_tokens_affordable_prompt_too_dear() -> None:
    assert max_output_tokens_affordable(MINIMAX, 299, 1000) == 0
    assert max_output_tokens_affordable(MINIMAX, 300, 1000) == 0  # prompt fits, no output does
    assert max_output_tokens_affordable(MINIMAX, 302, 1000) == 1


def test_max_output_tokens_affordable_free_output() -> None:
    p = Pricing(input=Decimal("1"))
    assert max_output_tokens_affordable(p, 10, 5) == UNLIMITED_TOKENS
    assert max_output_tokens_affordable(p, 4, 5) == 0


def test_max_output_tokens_affordable_counts_fee() -> None:
    p = Pricing(output=Decimal("1"), request=Decimal("0.00001"))  # fee 10 micro
    assert max_output_tokens_affordable(p, 15, 0) == 5
