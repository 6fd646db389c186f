"""Price arithmetic: what a price rule does to a base price. Pure, no I/O.

Invariants: money is an ``int`` number of minor units (cents for USD) and never a float; a final
price is never negative and never above the base price.

Rounding: a ``percent_off`` discount is ``base * basis_points / 10000`` rounded half-up to the
minor unit, computed exactly as ``(base * bp + 5000) // 10000``. So 15% off 999 cents is a 149.85
-> 150 cent discount (final 849), and 50% off 1 cent is a 0.5 -> 1 cent discount (final 0).
"""

from __future__ import annotations

PERCENT_OFF = "percent_off"
AMOUNT_OFF = "amount_off"
BASIS_POINTS = 10_000  # 100%


def final_price(
    base_minor: int, currency: str, kind: str, value: int, rule_currency: str | None
) -> int:
    """The price after applying one rule of ``kind`` with ``value`` to ``base_minor``.

    ``percent_off``: ``value`` is basis points (0..10000); ``rule_currency`` is ignored.
    ``amount_off``: ``value`` is minor units of ``rule_currency``; a rule in another currency
    does not apply and the base price is returned. The result is clamped to 0.
    Raises ``ValueError`` for a negative amount, an unknown kind or over 100% off.
    """
    if base_minor < 0 or value < 0:
        raise ValueError(f"amounts must be >= 0, got base {base_minor} and value {value}")
    if kind == PERCENT_OFF:
        if value > BASIS_POINTS:
            raise ValueError(f"percent_off value is at most {BASIS_POINTS} bp, got {value}")
        return base_minor - (base_minor * value + BASIS_POINTS // 2) // BASIS_POINTS
    if kind == AMOUNT_OFF:
        if rule_currency != currency:
            return base_minor
        return max(base_minor - value, 0)
    raise ValueError(f"unknown price rule kind {kind!r}")
