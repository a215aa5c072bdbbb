"""Numbers as a person reads them; full precision stays in the JSON (summaries, API)."""

from __future__ import annotations


def num(value: float | int | None, missing: str = "n/a") -> str:
    """Three decimals below 1 (scores), two below 100 (epsilons, noise), whole above.

    >>> num(2.9921576534358856), num(0.71234), num(1234.5), num(None)
    ('2.99', '0.712', '1,234', 'n/a')
    """
    if value is None:
        return missing
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    size = abs(value)
    if size == 0:
        return "0"
    if size < 0.001:
        return f"{value:.2g}"
    if size < 1:
        return f"{value:.3f}"
    if size < 100:
        return f"{value:.2f}"
    return f"{value:,.0f}"
