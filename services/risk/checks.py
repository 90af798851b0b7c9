"""Pre-trade checks: each a pure function of its inputs that returns a reason code or None."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from shared.enums import OrderKind, Side, TradingState

ZERO = Decimal(0)
MAX_AMOUNT = Decimal("1e12")  # a quantity or price beyond this is malformed, whatever the limits say


# client_order_id prefixes of the orders risk sends itself (services/risk/flatten.py): an operator's
# FLATTEN and a Shabbat pause's; a strategy follows their fills on positions it holds
FLATTEN_PREFIX, PAUSE_PREFIX = "flatten-", "shabbat-"
RISK_ORDER_PREFIXES = (FLATTEN_PREFIX, PAUSE_PREFIX)


class Reason:
    """Denial codes (Decision.reason["code"]); docs/protocol.md lists them."""
    HALTED = "HALTED"
    REDUCING = "REDUCING"
    BAD_QTY = "BAD_QTY"
    BAD_PRICE = "BAD_PRICE"
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    STALE_BOOK = "STALE_BOOK"
    PRICE_BAND = "PRICE_BAND"
    MIN_NOTIONAL = "MIN_NOTIONAL"
    MAX_ORDER_NOTIONAL = "MAX_ORDER_NOTIONAL"
    MAX_OPEN_ORDERS = "MAX_OPEN_ORDERS"
    MAX_POSITION = "MAX_POSITION"
    MAX_NOTIONAL = "MAX_NOTIONAL"
    RATE_LIMIT = "RATE_LIMIT"
    LOSS_COOLDOWN = "LOSS_COOLDOWN"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    BROKER_ERROR = "BROKER_ERROR"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    UNSUPPORTED_MARKET = "UNSUPPORTED_MARKET"
    SHABBAT = "SHABBAT"


TEXTS = {
    Reason.HALTED: "trading is halted: only cancels pass",
    Reason.REDUCING: "trading state is REDUCING: only orders that shrink a position pass",
    Reason.BAD_QTY: "quantity must be positive, below 1e12 and a multiple of the lot size",
    Reason.BAD_PRICE: "a LIMIT order needs a positive price on the tick grid",
    Reason.UNKNOWN_SYMBOL: "symbol is not traded here",
    Reason.STALE_BOOK: "no fresh order book for the symbol",
    Reason.PRICE_BAND: "limit price too far from the mid",
    Reason.MIN_NOTIONAL: "order notional below the minimum",
    Reason.MAX_ORDER_NOTIONAL: "order notional above the maximum per order",
    Reason.MAX_OPEN_ORDERS: "too many open orders",
    Reason.MAX_POSITION: "position including this order (and working orders) would exceed the base limit",
    Reason.MAX_NOTIONAL: "position including this order (and working orders) would exceed the notional limit",
    Reason.RATE_LIMIT: "order rate limit of the strategy reached",
    Reason.LOSS_COOLDOWN: "entries paused after a streak of losing round trips",
    Reason.BROKER_UNAVAILABLE: "broker did not answer",
    Reason.BROKER_ERROR: "the broker refused the order with an error, or its answer was unreadable or not credible",
    Reason.INSUFFICIENT_BALANCE: "not enough free balance (what working orders reserve is not free)",
    Reason.UNSUPPORTED_MARKET: "USD-M futures orders are not modelled (margin, leverage, funding): books only",
    Reason.SHABBAT: "trading is paused for Shabbat or Yom Tov (qf calendar): only risk's own closing orders pass",
}


@dataclass(frozen=True, slots=True)
class SymbolRules:
    """The limits of one symbol: exchange rules (lot, tick, min notional) and our own."""
    symbol: str
    lot_size: Decimal
    tick_size: Decimal
    min_notional: Decimal
    max_order_notional: Decimal
    max_position: Decimal  # base quantity, absolute
    max_notional: Decimal  # quote, absolute position × reference price


def _well_formed(x: Decimal) -> bool:
    # Bounds first: a huge value would make `%` or `*` below raise instead of answer. Finer
    # than 1e-8 needs no test of its own: no such value is on a lot or tick grid (steps ≥ 1e-8).
    return ZERO < x < MAX_AMOUNT


def check_qty(qty: Decimal, rules: SymbolRules) -> str | None:
    """BAD_QTY unless 0 < qty < 1e12 and on the lot grid (so with at most 8 decimals)."""
    if not _well_formed(qty) or qty % rules.lot_size:
        return Reason.BAD_QTY
    return None


def check_price(kind: OrderKind, price: Decimal | None, rules: SymbolRules) -> str | None:
    """BAD_PRICE for a LIMIT order without a positive price on the tick grid (a MARKET order's price is ignored)."""
    if kind is not OrderKind.LIMIT:
        return None
    if price is None or not _well_formed(price) or price % rules.tick_size:
        return Reason.BAD_PRICE
    return None


def check_state(state: TradingState, position: Decimal, working_same_side: Decimal, side: Side,
                qty: Decimal, own_close: bool = False) -> str | None:
    """HALTED denies every order; REDUCING allows only an order that shrinks |position|
    without flipping it, counting working orders on the same side as already sent;
    PAUSED_SHABBAT denies every order but risk's own closing ones (`own_close`) that reduce."""
    if state is TradingState.ACTIVE:
        return None
    if state is TradingState.HALTED:
        return Reason.HALTED
    reduces = position * side.sign < 0 and qty + working_same_side <= abs(position)
    if state is TradingState.PAUSED_SHABBAT:
        return None if own_close and reduces else Reason.SHABBAT
    return None if reduces else Reason.REDUCING


def check_book(last_book_ns: int | None, now_ns: int, stale_ns: int) -> str | None:
    """STALE_BOOK when no book ever arrived or the last one is older than `stale_ns`."""
    if last_book_ns is None or now_ns - last_book_ns > stale_ns:
        return Reason.STALE_BOOK
    return None


def check_band(kind: OrderKind, price: Decimal | None, mid: Decimal, band_bps: Decimal) -> str | None:
    """PRICE_BAND when a LIMIT price is more than `band_bps` basis points from `mid` (0: no band)."""
    if kind is not OrderKind.LIMIT or not band_bps or price is None:
        return None
    return Reason.PRICE_BAND if abs(price - mid) * 10_000 > band_bps * mid else None


def check_notional(notional: Decimal, rules: SymbolRules) -> str | None:
    """MIN_NOTIONAL below the exchange minimum; MAX_ORDER_NOTIONAL above our per-order maximum."""
    if notional < rules.min_notional:
        return Reason.MIN_NOTIONAL
    if notional > rules.max_order_notional:
        return Reason.MAX_ORDER_NOTIONAL
    return None


def check_open_orders(rests: bool, open_orders: int, max_open: int) -> str | None:
    """MAX_OPEN_ORDERS when an order that may rest (a GTC or GTX LIMIT) would exceed `max_open` working orders."""
    return Reason.MAX_OPEN_ORDERS if rests and open_orders >= max_open else None


def check_position(position: Decimal, working_same_side: Decimal, side: Side, qty: Decimal,
                   ref_price: Decimal, rules: SymbolRules) -> str | None:
    """Worst case on the order's side: position, plus what working orders on that side may
    still fill, plus this order. MAX_POSITION (base) or MAX_NOTIONAL (× `ref_price`) when
    that exceeds a limit, unless the order moves the worst case toward flat without
    crossing it (so an order that shrinks an over-limit position still passes)."""
    sign = side.sign
    before = position + sign * working_same_side
    after = before + sign * qty
    if abs(after) < abs(before) and after * before >= 0:
        return None
    if abs(after) > rules.max_position:
        return Reason.MAX_POSITION
    if abs(after) * ref_price > rules.max_notional:
        return Reason.MAX_NOTIONAL
    return None


def position_room(position: Decimal, working_same_side: Decimal, side: Side, ref_price: Decimal,
                  rules: SymbolRules) -> Decimal:
    """The largest quantity on the lot grid an order on `side` may have so that
    `check_position` passes (0 when nothing fits)."""
    limit = rules.max_position
    if ref_price > 0:
        limit = min(limit, rules.max_notional / ref_price)
    room = limit - side.sign * position - working_same_side
    if room <= 0:
        return ZERO
    return (room // rules.lot_size) * rules.lot_size


def reduces_position(position: Decimal, side: Side, qty: Decimal) -> bool:
    """Whether the order only shrinks |position| (does not open or add to exposure)."""
    return position * side.sign < 0 and qty <= abs(position)
