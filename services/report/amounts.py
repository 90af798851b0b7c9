"""Exact decimal columns as integers at one scale: value i = units[i] / 10**scale.

Why: the report folds a million fills' prices, quantities and fees (issue #16: ≤ 10 s for the
whole report). As `Decimal`s, parsing them and the dozen sums, products and comparisons per fill
took 2.6 s — as long as the ledger's own `Position.apply` one fill at a time; as Python integers
in numpy object arrays the same exact arithmetic runs in C loops at a fraction of that.

A column arrives as one text, its values joined by a separator (what SQLite's group_concat
gives; a CSV column is joined). Two ways to read it, one result:

- fast: numpy's float parser, then units = rint(value × 10^scale). Exact whenever every value
  has at most 15 digits (a double tells such decimals apart) and |units| < 2^51 (the two
  roundings together stay below half a unit). Prices, quantities and slippage pass.
- exact: Python's int parser over each value's digits, the point removed; numpy for the places.
  Long fees (price × qty × rate: 17 digits) take this way; so does anything the fast way
  cannot vouch for, and this way judges it (BadAmount).

tests/services/report/test_amounts.py holds both equal to `Decimal(text)` (hypothesis).
"""
from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence

import numpy as np

FAST_DIGITS = 15  # at most this many characters a value: no more digits than a double tells apart
FAST_UNITS = 2.0**51
_DOT = ord(".")
_PLAIN = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[[*b"0123456789.-"]] = True


class BadAmount(ValueError):
    """A value that is not a plain decimal (digits, at most one point, a leading minus); `index`
    is its position in the column. Handled by whoever parses: the report names the fill."""

    def __init__(self, index: int, text: str) -> None:
        super().__init__(text)
        self.index = index


@dataclass(frozen=True, slots=True)
class Amounts:
    """Exact decimal amounts: value i = units[i] / 10**scale (units: Python ints, an object array)."""
    units: np.ndarray
    scale: int

    def __len__(self) -> int:
        return len(self.units)

    def at(self, scale: int) -> np.ndarray:
        """The units at a scale ≥ this one (an object array: exact at any size)."""
        if scale < self.scale:
            raise ValueError(f"scale {scale} is below the amounts' {self.scale}")
        return self.units * 10 ** (scale - self.scale) if scale > self.scale else self.units

    def take(self, idx) -> Amounts:
        return Amounts(self.units[idx], self.scale)

    def decimal(self, i: int) -> Decimal:
        return to_decimal(int(self.units[i]), self.scale)

    def floats(self) -> np.ndarray:
        """float64 values, for ratios and charts only."""
        return self.units.astype(np.float64) / 10.0**self.scale


def to_decimal(units: int, scale: int) -> Decimal:
    """units / 10**scale, exact at any size (from text: no context's precision applies)."""
    return Decimal(f"{units}E-{scale}")


def to_units(value: Decimal, scale: int) -> int:
    """The units of `value` at `scale`, exact. Raises ValueError when `value` has more places."""
    sign, digits, exponent = value.as_tuple()
    shift = exponent + scale
    if not isinstance(exponent, int) or shift < 0:
        raise ValueError(f"{value} has more than {scale} places")
    units = int("".join(map(str, digits)) or "0") * 10**shift
    return -units if sign else units


def places(value: Decimal) -> int:
    """The decimal places `value` is written with (0 for an integer)."""
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def parse(text: str, count: int, sep: str = ",") -> Amounts:
    """`count` decimals joined by `sep` (one ASCII character) in `text`, as Amounts at the
    largest scale any of them is written with. Raises BadAmount for a value that is not a plain
    decimal (empty, an exponent, a second point or minus, any other character) or a wrong count."""
    if count == 0:
        return Amounts(np.zeros(0, dtype=object), 0)
    if not text.isascii():
        raise BadAmount(next(i for i, v in enumerate(text.split(sep)) if not v.isascii()), "not a decimal")
    buf = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    allowed = _ALLOWED.copy()
    allowed[ord(sep)] = True
    ok = allowed[buf]
    is_sep = buf == ord(sep)
    if not ok.all():
        raise BadAmount(int(np.count_nonzero(is_sep[:int(np.argmin(ok))])), "not a decimal")
    bounds = np.concatenate(([-1], np.flatnonzero(is_sep), [len(buf)]))
    if len(bounds) != count + 1:
        raise BadAmount(min(len(bounds) - 1, count) - 1, f"expected {count} values, found {len(bounds) - 1}")
    fast = _parse_fast(text, buf, bounds, count, sep)
    return fast if fast is not None else _parse_exact(text.split(sep), buf, bounds)


def parse_texts(values: Sequence[str]) -> Amounts:
    """A sequence of decimal texts as Amounts (see `parse`)."""
    values = list(values)
    for i, v in enumerate(values):
        if "," in v:
            raise BadAmount(i, "not a decimal (a comma)")
    return parse(",".join(values), len(values))


def _powers(top: int) -> np.ndarray:
    """10**0 … 10**top as Python ints (an object array)."""
    global _POWERS
    if top >= len(_POWERS):
        _POWERS = np.array([10**k for k in range(top + 1)], dtype=object)
    return _POWERS


_POWERS = np.array([10**k for k in range(40)], dtype=object)


def _parse_fast(text: str, buf: np.ndarray, bounds: np.ndarray, count: int, sep: str) -> Amounts | None:
    """Amounts by numpy's float parser (the text holds only digits, points, minus signs and
    separators), or None when this way cannot vouch for every value."""
    if int(np.diff(bounds).max()) - 1 > FAST_DIGITS:
        return None
    dots = np.flatnonzero(buf == _DOT)
    scale = int((bounds[np.searchsorted(bounds, dots)] - dots - 1).max()) if len(dots) else 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns, and stops, at text it cannot parse
        try:
            values = np.fromstring(text, dtype=np.float64, sep=sep)
        except (ValueError, DeprecationWarning):
            return None
    if len(values) != count:
        return None
    scaled = values * 10.0**scale
    if not np.isfinite(scaled).all() or float(np.abs(scaled).max()) >= FAST_UNITS:
        return None
    return Amounts(np.rint(scaled).astype(np.int64).astype(object), scale)


def _parse_exact(values: list[str], buf: np.ndarray, bounds: np.ndarray) -> Amounts:
    """Amounts by Python's int parser over each value's digits (its point removed), the places
    from the points' positions in `buf` (values hold only digits, points and minus signs).
    Raises BadAmount at the first value that is not plain: int() refuses an empty value, a lone
    or misplaced minus; a second point in a value is seen here."""
    try:
        digits = list(map(int, map(operator.methodcaller("replace", ".", ""), values)))
    except ValueError:
        raise BadAmount(next(i for i, v in enumerate(values) if not _PLAIN.fullmatch(v)), "not a decimal") from None
    dots = np.flatnonzero(buf == _DOT)
    owner = np.searchsorted(bounds, dots) - 1  # the value each point is in
    twice = np.flatnonzero(np.diff(owner) == 0)
    if len(twice):
        raise BadAmount(int(owner[twice[0]]), "not a decimal (two points)")
    decimals = np.zeros(len(values), dtype=np.int64)
    decimals[owner] = bounds[owner + 1] - dots - 1
    scale = int(decimals.max())
    units = np.array(digits, dtype=object)
    shift = scale - decimals
    if shift.any():
        units = units * _powers(int(shift.max()))[shift]
    return Amounts(units, scale)
