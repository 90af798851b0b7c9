"""One symbol's latest book as integer units, less the displayed liquidity our paper fills already took;
which books and trades the broker trusts enough to fill on."""
from __future__ import annotations

from decimal import Context, Decimal, InvalidOperation, Overflow, Rounded

from services.broker.queue import UNIT
from shared.enums import Side
from shared.money import MAX_PRICE, MAX_QTY
from shared.messages import Book, Trade

HALF = Decimal("0.5")
# scaleb in a context that raises rather than rounds: to_units is exact or refuses
_EXACT = Context(prec=80, traps=[InvalidOperation, Overflow, Rounded])
# Book levels are wire floats: the bounds as floats, compared before anything is multiplied
# (1e300 * UNIT is still finite; 1.7e308 * UNIT is inf, and round(inf) raises).
MAX_PRICE_F, MAX_QTY_F = float(MAX_PRICE), float(MAX_QTY)
MAX_PRICE_U, MAX_QTY_U = int(MAX_PRICE) * UNIT, int(MAX_QTY) * UNIT
MAX_EXCH_MS = 10**13  # exchange times are ms since 1970: beyond this (year 2286) a field is corrupt,
# and the fills stamped with it must fit SQLite's signed 64-bit INTEGER
MAX_MARKETS = 1024  # symbols kept when the model is not told which to expect


class Refused(Exception):
    """A book or trade the broker will not fill on. `reason` is one of the codes below (counted
    per reason: qf_broker_bad_market_data_total); `detail` says what was wrong, for the log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# Refused.reason
LEVEL_RANGE = "level_range"  # a level's price or qty not in [1e-8, MAX] once on the 1e-8 grid
UNSORTED = "unsorted"  # levels not strictly best first (duplicate prices included)
CROSSED = "crossed"  # best bid >= best ask: crossed or locked
EXCH_TS = "exch_ts"  # exchange time outside [0, MAX_EXCH_MS]
SYMBOL = "symbol"  # a symbol the broker does not trade (or one too many)
TRADE = "trade"  # a trade whose price or qty is not in (0, MAX] on the 1e-8 grid


def units(x: float) -> int:
    """A wire float (≤ 15 significant digits on the 1e-8 grid, as marketdata sends) -> exact 1e-8 units."""
    return round(x * UNIT)


def to_units(d: Decimal) -> int:
    """An exact Decimal -> 1e-8 units. Raises ValueError when it is not finite, not on the
    1e-8 grid, or has more digits than can be scaled exactly (never a rounded value)."""
    try:
        scaled = d.scaleb(8, _EXACT)
    except ArithmeticError:
        raise ValueError(f"{str(d)[:40]} cannot be scaled exactly to 1e-8 units") from None
    if not scaled.is_finite() or scaled != scaled.to_integral_value():
        raise ValueError(f"{str(d)[:40]} is not finite or finer than 1e-8")
    return int(scaled)


def side_levels(wire: list, buy: bool) -> list[tuple[int, int]]:
    """One side of a wire book -> [(price, qty)] in units, best first. Raises Refused for a
    level outside [1e-8, MAX_PRICE] x [1e-8, MAX_QTY] after rounding to the grid (non-positive,
    1e-300, 1e300), or levels not strictly best first (unsorted, duplicate prices)."""
    levels = []
    prev = None
    for p, q in wire:
        if not (0.0 < p <= MAX_PRICE_F and 0.0 < q <= MAX_QTY_F):
            raise Refused(LEVEL_RANGE, f"{p!r} x {q!r}")
        pu, qu = round(p * UNIT), round(q * UNIT)
        if not pu or not qu:  # positive, but below the 1e-8 grid: it would fill at price 0
            raise Refused(LEVEL_RANGE, f"{p!r} x {q!r} rounds to 0 at 1e-8")
        if prev is not None and (pu >= prev if buy else pu <= prev):
            raise Refused(UNSORTED, f"{'bid' if buy else 'ask'} {p!r} after {prev / UNIT!r}")
        prev = pu
        levels.append((pu, qu))
    return levels


def check_book(book: Book) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (bids, asks) in units of a book the broker can trust. Raises Refused otherwise
    (see side_levels; a crossed or locked book; an exchange time out of range). An empty
    side is allowed: a thin market, where orders on it find no liquidity."""
    if not 0 <= book.exch_ts <= MAX_EXCH_MS:
        raise Refused(EXCH_TS, str(book.exch_ts))
    bids, asks = side_levels(book.bids, True), side_levels(book.asks, False)
    if bids and asks and bids[0][0] >= asks[0][0]:
        raise Refused(CROSSED, f"bid {bids[0][0] / UNIT!r} >= ask {asks[0][0] / UNIT!r}")
    return bids, asks


def check_trade(trade: Trade) -> tuple[int, int]:
    """(price, qty) in units of a trade the broker can fill resting orders on. Raises Refused
    for a price or qty not in (0, MAX] on the 1e-8 grid, or an exchange time out of range."""
    if not 0 <= trade.exch_ts <= MAX_EXCH_MS:
        raise Refused(EXCH_TS, str(trade.exch_ts))
    try:
        price, qty = to_units(trade.price), to_units(trade.qty)
    except ValueError as exc:
        raise Refused(TRADE, str(exc)) from None
    if not (0 < price <= MAX_PRICE_U and 0 < qty <= MAX_QTY_U):
        raise Refused(TRADE, f"{trade.price} x {trade.qty}")
    return price, qty


def to_dec(u: int) -> Decimal:
    """1e-8 units -> the canonical Decimal ('100.5', not '100.50000000')."""
    d = Decimal(u).scaleb(-8).normalize()
    return d.quantize(Decimal(1)) if d.as_tuple().exponent > 0 else d


class SideView:
    """One side of the book: `levels` [(price, size)] best first, `sizes` by price, in units."""
    __slots__ = ("levels", "sizes", "worst", "buy")

    def __init__(self, levels: list[tuple[int, int]], buy: bool) -> None:
        """`levels` as side_levels returns them (checked: positive, strictly best first)."""
        self.buy = buy  # True for bids
        self.levels = levels
        self.sizes = dict(levels)
        self.worst = self.levels[-1][0] if self.levels else None

    @property
    def best(self) -> int | None:
        return self.levels[0][0] if self.levels else None

    def visible(self, price: int) -> bool:
        """Whether the displayed levels tell the size at `price` (it is not deeper than the last one shown)."""
        if self.worst is None:
            return False
        return price >= self.worst if self.buy else price <= self.worst

    def better(self, a: int, b: int) -> bool:
        """Whether price `a` is better than `b` on this side (higher bid, lower ask)."""
        return a > b if self.buy else a < b


class Market:
    """Latest trusted book of one symbol plus `taken`: per side, what our paper fills took
    at each displayed price. Paper fills do not move the real book, so without it
    an unchanged book would give the same liquidity twice. `taken` at a price is
    capped by the size displayed there, and forgotten when the level is no longer shown.

    `trusted` is False while the symbol's latest book was refused (`distrust()`): the
    levels stay those of the last trusted book (its mid still marks positions), but
    nothing fills on them until `update()` brings a sane one."""

    def __init__(self, book: Book, bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> None:
        """`book` with its levels as check_book returns them."""
        self.taken: dict[bool, dict[int, int]] = {True: {}, False: {}}  # keyed by SideView.buy
        self.book = book
        self.bids = SideView(bids, True)
        self.asks = SideView(asks, False)
        self._mid: Decimal | None = None
        self.trusted = True

    def distrust(self) -> None:
        """The symbol's latest book was refused: fill on nothing until the next trusted one."""
        self.trusted = False

    def update(self, book: Book, bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> None:
        """Take a newer book of this symbol, with its levels as check_book returns them."""
        self.book, self._mid, self.trusted = book, None, True
        self.bids = SideView(bids, True)
        self.asks = SideView(asks, False)
        for view in (self.bids, self.asks):
            taken = self.taken[view.buy]
            for price in list(taken):
                size = view.sizes.get(price)
                if size is None:
                    # deleted, or out of the top-N view: its liquidity, if it shows again, is new
                    # (and `taken` never outgrows the displayed levels)
                    del taken[price]
                elif taken[price] > size:
                    taken[price] = size

    @property
    def mid(self) -> Decimal | None:
        """Exact mid of the best bid and ask; None for a one-sided book."""
        if self._mid is None and self.bids.levels and self.asks.levels:
            self._mid = to_dec(self.bids.levels[0][0] + self.asks.levels[0][0]) * HALF
        return self._mid

    def opposite(self, side: Side) -> SideView:
        """The side an order on `side` takes from: asks for a BUY, bids for a SELL."""
        return self.asks if side is Side.BUY else self.bids

    def own(self, side: Side) -> SideView:
        """The side an order on `side` rests on."""
        return self.bids if side is Side.BUY else self.asks

    def available(self, view: SideView, price: int) -> int:
        """Units displayed at `price` on `view` that our fills have not taken yet."""
        return view.sizes.get(price, 0) - self.taken[view.buy].get(price, 0)

    def take(self, view: SideView, price: int, qty: int) -> None:
        """Record that a paper fill took `qty` units at `price` on `view`."""
        taken = self.taken[view.buy]
        taken[price] = taken.get(price, 0) + qty

    def crossing(self, side: Side, limit: int | None) -> list[tuple[int, int]]:
        """Available (price, units) on the opposite side that an order on `side`
        with `limit` (None: any price) can take, best first."""
        view = self.opposite(side)
        taken = self.taken[view.buy]
        out = []
        for price, size in view.levels:
            if limit is not None and (price > limit if side is Side.BUY else price < limit):
                break
            left = size - taken.get(price, 0)
            if left > 0:
                out.append((price, left))
        return out
