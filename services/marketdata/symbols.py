"""Instrument keys (`BTCUSDT`, `USDM:BTCUSDT`), stream names, and the routes messages arrive on."""
from __future__ import annotations

from collections import deque
from typing import Iterable

from services.marketdata.sync import BookSync, Market

USDM_PREFIX = "USDM:"
"""Keys of USD-M futures symbols start with this; spot keys are the bare symbol. The market
comes first so a ZeroMQ prefix subscription to `book.BTCUSDT` never matches a futures topic."""

RECENT_DEPTH = 256  # depth frames a standby route keeps so a recording has no hole at a switch


def split_key(key: str) -> tuple[Market, str]:
    """Take a key ("BTCUSDT" or "USDM:BTCUSDT"); return (market, exchange symbol upper-case).

    Raises ValueError for another prefix or an empty symbol."""
    market, sep, name = key.partition(":")
    if not sep:
        market, name = "SPOT", market
    if market.upper() not in ("SPOT", "USDM") or not name:
        raise ValueError(f"not an instrument key like BTCUSDT or USDM:BTCUSDT: {key!r}")
    return (Market.USDM if market.upper() == "USDM" else Market.SPOT), name.upper()


def key_of(market: Market, name: str) -> str:
    """The key of exchange symbol `name` on `market`: "BTCUSDT" or "USDM:BTCUSDT"."""
    name = name.upper()
    return USDM_PREFIX + name if market is Market.USDM else name


def markets_of(keys: Iterable[str]) -> list[Market]:
    """The markets the keys trade on, spot first, each once."""
    found = {split_key(k)[0] for k in keys}
    return [m for m in (Market.SPOT, Market.USDM) if m in found]


def streams_for(names: Iterable[str], book_ticker: bool = False) -> list[str]:
    """Combined-stream names for exchange symbols: diff depth at 100 ms, aggregate trades and,
    if asked, bookTicker. The same names exist on spot and USD-M."""
    out = []
    for name in names:
        low = name.lower()
        out += [f"{low}@depth@100ms", f"{low}@aggTrade"] + ([f"{low}@bookTicker"] if book_ticker else [])
    return out


class Route:
    """Where stream messages come from (one live connection, or one market of a replayed
    capture), with the books built from what arrived on it.

    Stream names carry no market, so the route supplies it: `btcusdt@depth@100ms` on a
    USD-M route belongs to `USDM:BTCUSDT`. A `live` route's books are published; a standby
    route (a replacement connection still syncing) only builds its own until the service
    switches to it. A `retired` route's messages are ignored.
    """

    __slots__ = ("market", "gen", "keys", "syncs", "live", "retired", "label", "recent", "awaiting", "tickers",
                 "ready_since", "streams", "took_over")

    def __init__(self, market: Market, keys: Iterable[str], gen: int = 0, live: bool = True,
                 label: str = "") -> None:
        self.market = Market(market)
        self.gen = gen
        self.label = label or f"{self.market.value}#{gen}"
        # stream-name symbol (lower case, as in "btcusdt@depth@100ms") -> key
        self.keys: dict[str, str] = {}
        for key in keys:
            market, name = split_key(key)
            if market is self.market:
                self.keys[name.lower()] = key
        self.live = live
        self.retired = False
        self.syncs: dict[str, BookSync] = {}
        self.recent: dict[str, deque] = {}
        self.awaiting: set[str] = set()  # names whose snapshot is requested and not yet handled
        self.tickers: dict[str, dict[int, tuple]] = {}  # name -> bookTicker by u, until the book gets there
        self.ready_since = 0.0
        self.streams: dict[str, tuple] = {}  # stream name -> its classification (BookRouter._classify)
        self.reset()

    def reset(self) -> None:
        """Fresh, unsynced books: what a new connection or a restarted capture needs."""
        self.syncs = {n: BookSync(n.upper(), self.market) for n in self.keys}
        self.recent = {n: deque(maxlen=RECENT_DEPTH) for n in self.keys}
        self.awaiting = set()
        self.tickers = {n: {} for n in self.keys}
        self.ready_since = 0.0  # when a standby's books first got ahead of the live ones
        # it replaced a live connection (BookRouter._take_over): its depth events the recording
        # holds already, from its predecessor, are not written again
        self.took_over = False

    def names(self) -> list[str]:
        """Exchange symbols (upper case) this route carries."""
        return [n.upper() for n in self.keys]

    def __repr__(self) -> str:
        state = "retired" if self.retired else "live" if self.live else "standby"
        return f"Route({self.label}, {state}, {sorted(self.keys.values())})"
