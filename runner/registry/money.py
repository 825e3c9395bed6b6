"""Money rules: exact Decimal amounts, prices from config, rounding, estimates and charges.

Plain arithmetic, no database: the ledger applies these to its rows, the dry run to its
estimate. Floats are refused as amounts (inexact) and read by their shortest repr as prices.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, ROUND_UP, Decimal, InvalidOperation
from typing import Any

from runner.errors import InvalidAmount, InvalidInput
from runner.registry.schema import MONEY_PLACES

MAX_AMOUNT = Decimal("100000000000000")  # NUMERIC(20, 6): 14 integer digits


def to_amount(value: Any, field: str = "amount", *, allow_zero: bool = False) -> Decimal:
    """A money amount from a Decimal, int or numeric string. Floats are refused (inexact)."""
    def bad(why: str) -> InvalidAmount:
        return InvalidAmount(f"{field} {value!r} {why}", field=field,
                             fix="pass a positive decimal string such as '10' or '2.50'")

    if isinstance(value, bool) or value is None:
        raise bad("is not a number")
    if isinstance(value, float):
        raise bad("is a float; money is exact")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise bad("is not a number") from None
    else:
        raise bad(f"is a {type(value).__name__}, not a number")
    if not amount.is_finite():
        raise bad("is not finite")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise bad("must be greater than zero" if not allow_zero else "must not be negative")
    if amount >= MAX_AMOUNT:
        raise bad(f"is too large (limit {MAX_AMOUNT})")
    if amount != amount.quantize(MONEY_PLACES, rounding=ROUND_HALF_EVEN):
        raise bad("has more than 6 decimal places")
    return amount


def to_price(value: Any, field: str = "price_per_hour") -> Decimal:
    """A price from config: floats are read by their shortest repr (0.5 -> Decimal('0.5'))."""
    if isinstance(value, float):
        value = repr(value)
    return round_money(to_amount(value, field, allow_zero=True))


CENTS = Decimal("0.01")


def round_money(amount: Decimal, rounding=ROUND_HALF_EVEN) -> Decimal:
    """Money scale: at least 2 and at most 6 decimal places (1 -> 1.00, 1/60 -> 0.016667)."""
    exponent = amount.as_tuple().exponent
    if exponent < -6:  # type: ignore[operator]
        return amount.quantize(MONEY_PLACES, rounding=rounding)
    if exponent > -2:  # type: ignore[operator]
        return amount.quantize(CENTS)
    return amount


def fmt(amount: Decimal) -> str:
    """For people: 10.000000 -> '10.00', 0.058334 -> '0.058334'."""
    amount = amount.normalize()
    if amount.as_tuple().exponent > -2:  # type: ignore[operator]
        amount = amount.quantize(Decimal("0.01"))
    return f"{amount:f}"


def estimate(price_per_hour: Any, wall_time_cap_min: int, devices: int = 1) -> Decimal:
    """The debit for a job: price x cap hours x devices (rounded up to a millionth)."""
    price = to_price(price_per_hour)
    _check_count(wall_time_cap_min, "wall_time_cap_min")
    _check_count(devices, "devices")
    hours = Decimal(wall_time_cap_min) / Decimal(60)
    return round_money(price * hours * Decimal(devices), ROUND_UP)


def charge(price_per_hour: Any, actual_seconds: Any, devices: int = 1) -> Decimal:
    """What `actual_seconds` of wall time on `devices` devices costs."""
    price = to_price(price_per_hour)
    seconds = _seconds(actual_seconds)
    return round_money(price * seconds / Decimal(3600) * Decimal(devices))


def _check_count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{field} must be an integer >= 1, got {value!r}", field=field,
                           fix=f"pass {field} as a positive integer")
    return value


def _seconds(value: Any, field: str = "actual_seconds") -> Decimal:
    try:
        seconds = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        seconds = Decimal("NaN")
    if isinstance(value, bool) or not seconds.is_finite() or seconds < 0:
        raise InvalidInput(f"{field} must be a finite number >= 0, got {value!r}",
                           field=field, fix="pass the job's wall-clock seconds"
                           if field == "actual_seconds" else f"set {field} to seconds >= 0")
    return seconds
