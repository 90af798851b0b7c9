"""One symbol's latest book as integer units, less the displayed liquidity our paper fills already took."""
from __future__ import annotations

from decimal import Decimal

from services.broker.queue import UNIT
from shared.enums import Side
from shared.messages import Book

HALF = Decimal("0.5")


def units(x: float) -> int:
    """A wire float (≤ 15 significant digits on the 1e-8 grid, as marketdata sends) -> exact 1e-8 units."""
    return round(x * UNIT)


def to_units(d: Decimal) -> int:
    """An exact Decimal -> 1e-8 units. Raises ValueError when it is not on the 1e-8 grid."""
    scaled = d.scaleb(8)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{d} is finer than 1e-8")
    return int(scaled)


def to_dec(u: int) -> Decimal:
    """1e-8 units -> the canonical Decimal ('100.5', not '100.50000000')."""
    d = Decimal(u).scaleb(-8).normalize()
    return d.quantize(Decimal(1)) if d.as_tuple().exponent > 0 else d


class SideView:
    """One side of the book: `levels` [(price, size)] best first, `sizes` by price, in units."""
    __slots__ = ("levels", "sizes", "worst", "buy")

    def __init__(self, wire_levels: list, buy: bool) -> None:
        self.buy = buy  # True for bids
        self.levels = [(round(p * UNIT), round(q * UNIT)) for p, q in wire_levels if p > 0 and q > 0]
        self.sizes = dict(self.levels)
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
    """Latest book of one symbol plus `taken`: per side, what our paper fills took
    at each displayed price. Paper fills do not move the real book, so without it
    an unchanged book would give the same liquidity twice. `taken` at a price is
    capped by the size displayed there, and forgotten when the level is no longer shown."""

    def __init__(self, book: Book) -> None:
        self.taken: dict[bool, dict[int, int]] = {True: {}, False: {}}  # keyed by SideView.buy
        self.book = book
        self.bids = SideView(book.bids, True)
        self.asks = SideView(book.asks, False)
        self._mid: Decimal | None = None

    def update(self, book: Book) -> None:
        """Take a newer book of this symbol."""
        self.book, self._mid = book, None
        self.bids = SideView(book.bids, True)
        self.asks = SideView(book.asks, False)
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
