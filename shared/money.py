"""Money: the one home of the exact-amount constants, parsers and helpers (Decimal, never float).

Broker, risk, strategy, the API and the wire codec (shared/messages.py) all take their money
rules from here, so there is one contract: an amount is a decimal string, an int or a Decimal,
finite; a float (or a bool) is refused, never converted (0.1 is not 0.1 in binary). The one
place a float becomes a price is `from_book_float`: book levels and metrics are floats on the
wire (a measurement of a book, not an amount anyone is owed), and risk marks positions at a
book's mid. A symbol's quote asset is known or an error (`UnknownAsset`), never "".
"""
from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Iterable

from shared.errors import ConfigError

ZERO = Decimal(0)
STEP = Decimal("1e-8")  # Binance's finest price/qty step: averages, marks and vwaps are rounded to it
COST_STEP = Decimal("1e-12")  # the ledger's cost share taken off a partly closed position is rounded here, once
# 8-decimal prices times 8-decimal quantities times fee rates need ~35 digits at the extremes;
# with 50 every notional, fee, cash sum and product below is exact (the default is 28).
MONEY = Context(prec=50)
# Beyond any traded price or quantity; together they bound the digits of every product (an order,
# a fill, a ledger entry outside them is refused), so no later sum can overflow MONEY.
MAX_PRICE = Decimal("1e15")
MAX_QTY = Decimal("1e12")
# Quote assets, longest first where one ends another ("FDUSD" before shorter suffixes).
QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR")
_QUOTE_MEMO_MAX = 1024  # symbols come from requests: the memo of quote_asset stays bounded


class BadAmount(ValueError):
    """A value `to_decimal` refuses: a float, a bool, NaN, an infinity, not a decimal at all.
    The message names the field. Handled by whoever parses: the wire codec turns it into
    DecodeError bad_field, risk's vetting into BadAnswer, the ledger refuses the fill."""


class UnknownAsset(ValueError, ConfigError):
    """A symbol whose quote asset is none of QUOTE_ASSETS. A ValueError to whoever judges a
    request (the broker answers BAD_ORDER); a ConfigError for a configured symbol, raised at
    start (risk's desk looks up every traded symbol's assets): the process prints it and exits 2."""


def to_decimal(value: object, name: str) -> Decimal:
    """A decimal string, an int or a Decimal → the finite Decimal it writes. Raises BadAmount
    (a ValueError) naming `name` for a float (money never passes through binary floating
    point), a bool, NaN, an infinity, a string that is not a decimal, or anything else.
    Bounds are the caller's (the wire's in shared/messages.py, the ledger's MAX_PRICE/MAX_QTY)."""
    kind = type(value)
    if kind is Decimal:
        d = value
    elif kind is str or kind is int:
        # Decimal() also reads '1_000', ' 0.001 ' and other scripts' digits ('١٢'): not a wire decimal
        if kind is str and (not value.isascii() or "_" in value or value[:1].isspace() or value[-1:].isspace()):
            raise BadAmount(f"{name}: {value[:40]!r} is not a decimal (ASCII digits, no spaces or '_')")
        try:
            d = Decimal(value)
        except ArithmeticError:
            raise BadAmount(f"{name}: {str(value)[:40]!r} is not a decimal") from None
    elif kind is float:
        raise BadAmount(f"{name}: a float ({value!r}) is not an exact amount: send a decimal string")
    else:
        raise BadAmount(f"{name}: expected a decimal string, got {kind.__name__}")
    if not d.is_finite():
        raise BadAmount(f"{name}: {str(value)[:40]!r} is not finite")
    return d


def from_book_float(price: float | Decimal) -> Decimal | None:
    """A book price (a wire float: a level or the mid) → Decimal on the 1e-8 grid, via its shortest
    repr (what marketdata wrote, ≤ 15 significant digits), never binary float arithmetic. The one
    place a float becomes a price (risk marks positions at book mids). A Decimal is taken as it is.
    None for a non-positive, non-finite or out-of-range price (a one-sided or broken book)."""
    try:
        if not isinstance(price, Decimal):
            price = Decimal(repr(float(price))).quantize(STEP, context=MONEY)
        return price if price.is_finite() and 0 < price < MAX_PRICE else None
    except (ArithmeticError, ValueError, TypeError):  # nan, inf, or too many digits for the grid
        return None


def canonical(d: Decimal) -> Decimal:
    """The same value without trailing zeros or an exponent: 100.5, not 100.50000000 or 1E+2."""
    n = d.normalize(MONEY)
    return n.quantize(Decimal(1), context=MONEY) if n.as_tuple().exponent > 0 else n


def text(value: Decimal) -> str:
    """Canonical decimal text: no exponent, no trailing zeros ("0.000" → "0", "1E+2" → "100")."""
    return format(value.normalize(MONEY), "f") if value else "0"


def fee(price: Decimal, qty: Decimal, rate: Decimal) -> Decimal:
    """Fee in the quote asset for one fill: price * qty * rate, exact (never rounded), canonical."""
    return canonical(MONEY.multiply(MONEY.multiply(price, qty), rate))


def vwap(slices: Iterable[tuple[Decimal, Decimal]]) -> Decimal | None:
    """Volume-weighted price of `(price, qty)` slices, rounded half-even to 1e-8; None if empty."""
    notional, total = ZERO, ZERO
    with localcontext(MONEY):
        for price, qty in slices:
            notional += price * qty
            total += qty
        return canonical((notional / total).quantize(STEP, ROUND_HALF_EVEN)) if total else None


def quote_asset(symbol: str) -> str:
    """The quote asset of a spot or futures symbol, any case ('BTCUSDT' → 'USDT', 'usdm:ethfdusd'
    → 'FDUSD'). Raises UnknownAsset for a symbol that is none of QUOTE_ASSETS with a base before it."""
    quote = _QUOTE_OF.get(symbol)
    if quote is not None:
        return quote
    sym = symbol.upper() if type(symbol) is str else ""
    for quote in QUOTE_ASSETS:
        if sym.endswith(quote) and len(sym) > len(quote):
            if len(_QUOTE_OF) >= _QUOTE_MEMO_MAX:
                _QUOTE_OF.clear()
            _QUOTE_OF[symbol] = quote
            return quote
    raise UnknownAsset(f"symbol {str(symbol)[:40]!r} has no known quote asset (one of {', '.join(QUOTE_ASSETS)})")


_QUOTE_OF: dict[str, str] = {}  # symbol -> quote asset, for symbols that have one (looked up per fill)


def base_asset(symbol: str) -> str:
    """'BTCUSDT' → 'BTC' (upper case). Raises UnknownAsset like quote_asset."""
    return symbol.upper()[:-len(quote_asset(symbol))]
