"""The benchmark's baseline: a straightforward dict book that scans every level for the best prices."""
from __future__ import annotations

from heapq import nlargest, nsmallest
from typing import Iterable, Sequence

from services.marketdata.book import BookMetrics, EmptyBookError, parse_units


class NaiveBook:
    """What one writes first: {price: qty} per side, best prices found by scanning all levels.

    Same exact parsing (parse_units) and the same interface as OrderBook where BookSync
    and the service use it, so a benchmark can swap it in and see only the data
    structure's cost. Not for production: top-N costs O(levels) on every call.
    """

    __slots__ = ("symbol", "update_id", "_bids", "_asks")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.update_id = 0
        self._bids: dict[int, int] = {}  # price units -> qty units
        self._asks: dict[int, int] = {}

    def clear(self) -> None:
        """Empty both sides and reset update_id to 0."""
        self.update_id = 0
        self._bids.clear()
        self._asks.clear()

    def apply_snapshot(self, last_update_id: int, bids: Iterable[Sequence[str]],
                       asks: Iterable[Sequence[str]]) -> None:
        """Replace the book with a REST snapshot. Raises ValueError on a bad level (book left empty)."""
        self.clear()
        try:
            self._apply(bids, asks)
        except (ValueError, TypeError) as e:
            self.clear()
            raise ValueError(f"{self.symbol}: bad snapshot {last_update_id}: {e}") from None
        self.update_id = last_update_id

    def apply_diff(self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]],
                   update_id: int) -> None:
        """Apply one diff-depth event; "0" removes a level. Raises ValueError on a bad level."""
        try:
            self._apply(bids, asks)
        except TypeError as e:
            raise ValueError(f"{self.symbol}: malformed depth levels: {e!r}") from None
        self.update_id = update_id

    def _apply(self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]]) -> None:
        for levels, side in ((bids, self._bids), (asks, self._asks)):
            for p, q in levels:
                price, qty = parse_units(p), parse_units(q)
                if price <= 0 or qty < 0:
                    raise ValueError(f"bad level [{p!r}, {q!r}]")
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)

    def best_bid(self) -> tuple[int, int] | None:
        """Return (price units, qty units) of the best bid, or None: a scan of every bid."""
        if not self._bids:
            return None
        p = max(self._bids)
        return p, self._bids[p]

    def best_ask(self) -> tuple[int, int] | None:
        """Return (price units, qty units) of the best ask, or None: a scan of every ask."""
        if not self._asks:
            return None
        p = min(self._asks)
        return p, self._asks[p]

    def top(self, n: int = 10) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Return (bids, asks): up to n (price units, qty units) per side, best first."""
        if n <= 0:
            return [], []
        bids, asks = self._bids, self._asks
        return ([(p, bids[p]) for p in nlargest(n, bids)], [(p, asks[p]) for p in nsmallest(n, asks)])

    def depth(self) -> tuple[int, int]:
        """Return (number of bid levels, number of ask levels)."""
        return len(self._bids), len(self._asks)

    def levels(self) -> tuple[dict[int, int], dict[int, int]]:
        """Return copies of (bids, asks) as {price units: qty units}."""
        return dict(self._bids), dict(self._asks)

    def metrics(self, n: int = 10) -> BookMetrics:
        """The same BookMetrics as OrderBook.metrics. Raises EmptyBookError or ValueError alike."""
        if n < 1:
            raise ValueError(f"metrics needs n >= 1, got {n}")
        bids, asks = self.top(n)
        if not bids or not asks:
            raise EmptyBookError(f"{self.symbol}: empty side at update {self.update_id}")
        (b0, bq0), (a0, aq0) = bids[0], asks[0]
        sb, sa = sum(q for _, q in bids), sum(q for _, q in asks)
        mid = float(b0 + a0) / 2e8  # the float operations of OrderBook.metrics, bit for bit
        spread = float(a0 - b0) / 1e8
        return BookMetrics(
            [[float(p) / 1e8, float(q) / 1e8] for p, q in bids],
            [[float(p) / 1e8, float(q) / 1e8] for p, q in asks],
            mid, spread, spread / mid * 1e4, float(sb - sa) / float(sb + sa),
            (float(b0) * float(aq0) + float(a0) * float(bq0)) / (float(bq0 + aq0) * 1e8))

    def check(self) -> None:
        """Raise ValueError if a level has a price or quantity <= 0."""
        for side in (self._bids, self._asks):
            for p, q in side.items():
                if p <= 0 or q <= 0:
                    raise ValueError(f"{self.symbol}: bad level {p}: {q}")
