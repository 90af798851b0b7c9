"""Pure limit order book keyed by exact integer price units, with top-N metrics.

`OrderBook` is the one the services use: the C extension `_cbook` (services/marketdata/_cbook.c,
built when the project is installed). `PyOrderBook` is the same contract in pure Python: the
reference the property tests hold the C book to, level for level and bit for bit."""

from __future__ import annotations

from bisect import bisect_left, insort
from heapq import nlargest
from typing import Iterable, NamedTuple, Sequence

UNITS = 10**8
"""Integer units per 1.0 of price or quantity (Binance's finest step is 1e-8)."""

_SCALE = [10 ** (8 - i) for i in range(9)]  # units per 1 of the last digit, by decimals
# Sorted-region sizes per side (see OrderBook): refilled up to _REGION keys,
# trimmed back to _REGION when it passes _REGION_MAX.
_REGION = 64
_REGION_MAX = 512
_ALL = -(1 << 64)  # an edge below every key: the region holds the whole side
_MAX_PRICE = 1 << 62  # prices (and quantities) at or above this many units (4.6e10) are nonsense


class EmptyBookError(ValueError):
    """A side of the book is empty, so metrics are undefined; the caller skips publishing."""


def _parse(s: str) -> int:
    """The general (slow) path of parse_units; see there."""
    if type(s) is not str:
        raise ValueError(f"not a decimal string: {s!r}")
    neg = s[:1] == "-"
    t = s[1:] if neg else s
    whole, dot, frac = t.partition(".")
    # isascii() because isdigit() also accepts other scripts' digits, which int() reads.
    if not (whole.isdigit() and whole.isascii()) or (
            dot and not (len(frac) <= 8 and frac.isdigit() and frac.isascii())):
        raise ValueError(f"not a decimal string with at most 8 decimals: {s!r}")
    u = int(whole + frac) * _SCALE[len(frac)]
    return -u if neg else u


def parse_units(s: str) -> int:
    """Parse an exact decimal string into integer units of 1e-8, never via float.

    Takes "61837.63000000", "0.001", "5" or, for signed amounts, "-0.5"
    (a leading '-' is accepted; rejecting negative quantities is the caller's job).
    Returns the integer number of 1e-8 units. Raises ValueError on anything else:
    empty strings, exponents, "nan", '+', spaces, '_', non-ASCII digits,
    a dot without digits on both sides (".5", "5.") or more than 8 decimals.
    """
    # Fast path for what Binance spot sends: ASCII digits with exactly 8 decimals.
    # replace(.., 1) drops only the first '.', so a second dot fails isdigit();
    # isascii() is a flag read.
    if type(s) is str and len(s) > 9 and s[-9] == "." and s.isascii():
        d = s.replace(".", "", 1)
        if d.isdigit():
            return int(d)
    return _parse(s)


def units_to_str(u: int) -> str:
    """Format integer 1e-8 units as the canonical decimal string.

    Takes an int (may be negative). Returns e.g. "61837.63" for 6183763000000,
    "0" for 0, "-0.5" for -50000000: no trailing zeros, no '.' for whole numbers.
    """
    sign = "-" if u < 0 else ""
    whole, frac = divmod(abs(u), UNITS)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:08d}".rstrip("0")


def _level(lv, s) -> int:
    """parse_units of string `s` of level `lv`, with a ValueError naming the level. (Ranges
    are checked by the caller.)"""
    try:
        return _parse(s)
    except ValueError as e:
        raise ValueError(f"bad level {lv!r}: {e}") from None


class BookMetrics(NamedTuple):
    """Top-N view of a book as floats, ready for the `book.{SYMBOL}` message.

    Immutable; a NamedTuple because it is built once per depth event and a frozen
    dataclass costs ~0.7 µs more to construct."""

    bids: list  # [[price, qty], ...] best first
    asks: list
    mid: float
    spread: float
    spread_bps: float
    imbalance: float  # (bid qty - ask qty) / (bid qty + ask qty) over the top N, in [-1, 1]
    microprice: float  # best prices weighted by the opposite side's best qty


def _refill(d: dict[int, int], keys: list[int], edge: int, need: int) -> int:
    """Extend a side's sorted region downwards to >= need keys; return the new edge.

    O(levels): runs only when the top region has been eaten through or a
    caller asks for more levels than it holds, not on every update.
    """
    below = [k for k in d if k < edge]
    want = max(need, _REGION) - len(keys)
    if len(below) <= want:
        below.sort()
        keys[:0] = below
        return _ALL
    more = nlargest(want, below)
    more.reverse()
    keys[:0] = more
    return more[0]


def _trim(keys: list[int]) -> int:
    """Cut a side's region back to _REGION keys; return the new edge."""
    cut = len(keys) - _REGION
    edge = keys[cut]
    del keys[:cut]
    return edge


class PyOrderBook:
    """One symbol's book: dicts of price -> qty (integer units) plus a sorted top region.

    Each side is keyed so that larger is better: bids by price, asks by
    -price. A side's "region" is the ascending list of ALL its keys >= an
    edge, so the best level is the region's last element and top(n) is a
    slice. Only the region is kept sorted (64..512 keys near the top, where
    most changes land): a change deeper than the edge touches just the dict.
    When the region runs short it is refilled from the dict (rare, O(levels)).
    """

    __slots__ = ("symbol", "update_id", "_bids", "_asks", "_bid_keys", "_ask_keys",
                 "_bid_edge", "_ask_edge")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.update_id = 0
        self._bids: dict[int, int] = {}  # price -> qty
        self._asks: dict[int, int] = {}  # -price -> qty
        self._bid_keys: list[int] = []  # region, ascending: best last
        self._ask_keys: list[int] = []
        self._bid_edge = _ALL  # region = every key >= edge
        self._ask_edge = _ALL

    def clear(self) -> None:
        """Empty both sides and reset update_id to 0."""
        self.update_id = 0
        self._bids.clear()
        self._asks.clear()
        self._bid_keys.clear()
        self._ask_keys.clear()
        self._bid_edge = self._ask_edge = _ALL

    def apply_snapshot(self, last_update_id: int, bids: Iterable[Sequence[str]],
                       asks: Iterable[Sequence[str]]) -> None:
        """Replace the book with a REST snapshot.

        Takes lastUpdateId and the [price_str, qty_str] lists. Zero-quantity
        levels are skipped. Raises ValueError on a malformed level, price or
        quantity, leaving the book empty.
        """
        self.clear()
        try:
            for raw, side, sign in ((bids, self._bids, 1), (asks, self._asks, -1)):
                for lv in raw:
                    if type(lv) is not list and type(lv) is not tuple:
                        raise ValueError(f"level is not a [price, qty] pair: {lv!r}")
                    p, q = lv
                    pu, qu = parse_units(p), parse_units(q)
                    if not 0 <= qu < _MAX_PRICE or not 0 < pu < _MAX_PRICE:
                        raise ValueError(f"bad level [{p!r}, {q!r}]")
                    if qu:
                        side[sign * pu] = qu
                    else:
                        side.pop(sign * pu, None)
        except (ValueError, TypeError) as e:
            self.clear()
            raise ValueError(f"{self.symbol}: bad snapshot {last_update_id}: {e}") from None
        self._bid_keys[:] = sorted(self._bids)
        self._ask_keys[:] = sorted(self._asks)
        if len(self._bid_keys) > _REGION:
            self._bid_edge = _trim(self._bid_keys)
        if len(self._ask_keys) > _REGION:
            self._ask_edge = _trim(self._ask_keys)
        self.update_id = last_update_id

    def apply_diff(self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]],
                   update_id: int) -> None:
        """Apply one diff-depth event's [price_str, qty_str] changes and set update_id.

        A quantity replaces the level's; a zero removes it, and removing an absent
        level is normal (Binance reports levels outside our snapshot) and silent.
        Raises ValueError on a malformed level, price or quantity; the book is
        then partially updated and must be discarded (BookSync does so).
        """
        self._apply(bids, asks)
        self.update_id = update_id

    def _apply(self, bids, asks) -> None:
        """apply_diff without the update id."""
        try:
            self._bid_edge = self._apply_side(bids, self._bids, self._bid_keys, self._bid_edge, 1, "bid")
            self._ask_edge = self._apply_side(asks, self._asks, self._ask_keys, self._ask_edge, -1, "ask")
        except ValueError as e:
            raise ValueError(f"{self.symbol}: {e}") from None
        except (TypeError, AttributeError, KeyError) as e:
            # Not strings where strings belong (an int, a list, a map...).
            raise ValueError(f"{self.symbol}: malformed depth levels: {e!r}") from None

    @staticmethod
    def _apply_side(levels, d: dict[int, int], keys: list[int], edge: int, sign: int, name: str) -> int:
        """One side's changes (keys are sign * price); returns the side's new region edge."""
        for lv in levels:
            if type(lv) is not list and type(lv) is not tuple:
                raise ValueError(f"level is not a [price, qty] pair: {lv!r}")
            p, q = lv
            pu, qu = _level(lv, p), _level(lv, q)
            if not 0 < pu < _MAX_PRICE:  # an absent level may be removed, a price of 0 is never right
                raise ValueError(f"bad {name} price in {lv!r}")
            if not 0 <= qu < _MAX_PRICE:
                raise ValueError(f"{name} quantity out of range in {lv!r}")
            k = sign * pu
            if qu:
                if k not in d and k >= edge:
                    insort(keys, k)
                d[k] = qu
            elif d.pop(k, None) is not None and k >= edge:
                del keys[bisect_left(keys, k)]
        return _trim(keys) if len(keys) > _REGION_MAX else edge

    def _bid_region(self, need: int) -> list[int]:
        keys = self._bid_keys
        if len(keys) < need and self._bid_edge != _ALL:
            self._bid_edge = _refill(self._bids, keys, self._bid_edge, need)
        return keys

    def _ask_region(self, need: int) -> list[int]:
        keys = self._ask_keys
        if len(keys) < need and self._ask_edge != _ALL:
            self._ask_edge = _refill(self._asks, keys, self._ask_edge, need)
        return keys

    def best_bid(self) -> tuple[int, int] | None:
        """Return (price units, qty units) of the best bid, or None if there are no bids."""
        keys = self._bid_keys or self._bid_region(1)
        if not keys:
            return None
        k = keys[-1]
        return k, self._bids[k]

    def best_ask(self) -> tuple[int, int] | None:
        """Return (price units, qty units) of the best ask, or None if there are no asks."""
        keys = self._ask_keys or self._ask_region(1)
        if not keys:
            return None
        k = keys[-1]
        return -k, self._asks[k]

    def top(self, n: int = 10) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Return (bids, asks): up to n (price units, qty units) per side, best first."""
        if n <= 0:
            return [], []
        bids, asks = self._bids, self._asks
        return ([(k, bids[k]) for k in self._bid_region(n)[: -n - 1 : -1]],
                [(-k, asks[k]) for k in self._ask_region(n)[: -n - 1 : -1]])

    def depth(self) -> tuple[int, int]:
        """Return (number of bid levels, number of ask levels)."""
        return len(self._bids), len(self._asks)

    def levels(self) -> tuple[dict[int, int], dict[int, int]]:
        """Return copies of (bids, asks) as {price units: qty units}, for checks and tests."""
        return dict(self._bids), {-k: q for k, q in self._asks.items()}

    def metrics(self, n: int = 10) -> BookMetrics:
        """Compute the top-n float view and its metrics.

        Takes n >= 1. Returns BookMetrics (all values finite). Raises
        EmptyBookError when either side is empty and ValueError when n < 1.
        A crossed book is reported as it is (negative spread), not hidden.
        """
        if n < 1:
            raise ValueError(f"metrics needs n >= 1, got {n}")
        bkeys, akeys = self._bid_keys, self._ask_keys
        if len(bkeys) < n:
            bkeys = self._bid_region(n)
        if len(akeys) < n:
            akeys = self._ask_region(n)
        if not bkeys or not akeys:
            raise EmptyBookError(
                f"{self.symbol}: empty side at update {self.update_id} "
                f"({len(self._bids)} bids, {len(self._asks)} asks)")
        bd, ad = self._bids, self._asks
        # One loop per side builds the float levels and sums the exact quantities.
        bids, asks, sb, sa = [], [], 0, 0
        for k in bkeys[: -n - 1 : -1]:
            q = bd[k]
            sb += q
            bids.append([float(k) / 1e8, float(q) / 1e8])
        for k in akeys[: -n - 1 : -1]:
            q = ad[k]
            sa += q
            asks.append([float(-k) / 1e8, float(q) / 1e8])
        b0, a0 = bkeys[-1], -akeys[-1]
        bq0, aq0 = bd[b0], ad[-a0]
        # Sums and differences in exact integers, each rounded once to a float (float(int) rounds
        # correctly), then float operations: the C book does the same ones in the same order, so
        # the two agree bit for bit. 6183763000000 / 1e8 gives exactly 61837.63.
        mid = float(b0 + a0) / 2e8
        spread = float(a0 - b0) / 1e8
        return BookMetrics(bids, asks, mid, spread, spread / mid * 1e4, float(sb - sa) / float(sb + sa),
                           (float(b0) * float(aq0) + float(a0) * float(bq0)) / (float(bq0 + aq0) * 1e8))

    def check(self) -> None:
        """Verify the internal invariants in O(levels); for tests and debugging.

        Raises ValueError if a side's sorted region is not exactly its keys
        >= the edge, or a level has a price or quantity <= 0. A crossed book is
        not an error here.
        """
        for name, d, keys, edge in (("bid", self._bids, self._bid_keys, self._bid_edge),
                                    ("ask", self._asks, self._ask_keys, self._ask_edge)):
            if keys != sorted(k for k in d if k >= edge):
                raise ValueError(f"{self.symbol}: {name} region out of step with its levels")
            for k, q in d.items():
                if not 0 < abs(k) < _MAX_PRICE or not 0 < q < _MAX_PRICE:
                    raise ValueError(f"{self.symbol}: bad {name} level {abs(k)}: {q}")

    def __repr__(self) -> str:
        return (f"PyOrderBook({self.symbol!r}, update_id={self.update_id}, "
                f"bid={self.best_bid()}, ask={self.best_ask()}, depth={self.depth()})")


try:
    from services.marketdata._cbook import Levels, OrderBook, bind as _bind, parse_depth_frame  # noqa: F401 (the API)
except ImportError as exc:  # pragma: no cover - a broken install, not a runtime condition
    raise ImportError(
        f"the C order book (services/marketdata/_cbook.c) is not built: {exc}. Install the project "
        "with `make venv` (or `pip install -e .`), which needs gcc and Python's headers.") from exc
_bind(BookMetrics, EmptyBookError)
