"""Integer micro-USD arithmetic, so that no float ever touches a price or a cost."""

from __future__ import annotations

from decimal import Decimal

MICROS_PER_USD = 1_000_000
TOKENS_PER_MILLION = 1_000_000


def usd_to_micros(amount: Decimal) -> int:
    """Convert a USD amount with at most 6 decimals to integer micro-USD.

    Raises ValueError when the amount has a fraction of a micro-USD.
    """
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{amount} USD is not a whole number of micro-USD")
    return int(micros)


def micros_to_usd(micros: int) -> Decimal:
    """Return micro-USD as an exact Decimal number of USD, for display."""
    return Decimal(micros).scaleb(-6)


def format_usd(micros: int) -> str:
    """Format micro-USD as a dollar string such as "$12.500000"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}${whole}.{fraction:06d}"


def ceil_div(numerator: int, denominator: int) -> int:
    """Divide non-negative integers, rounding up."""
    return -(-numerator // denominator)


def token_cost_micros(*, tokens_and_prices: tuple[tuple[int, int], ...]) -> int:
    """Price token counts, each paired with its price in micro-USD per million tokens.

    The products are summed before one final round-up, so a cost is never
    rounded up more than once.
    """
    total = sum(tokens * price for tokens, price in tokens_and_prices)
    return ceil_div(total, TOKENS_PER_MILLION)
