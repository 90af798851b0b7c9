"""A capture as the broker would hear it: `book` and `trade` messages in receive order, built in-process."""
from __future__ import annotations

import os
from decimal import Decimal
from typing import Iterator

from services.marketdata.book import EmptyBookError
from services.marketdata.capture import iter_capture
from services.marketdata.sync import BookSync, Market, SyncResult
from shared.messages import Book, Trade


def market_events(path: str | os.PathLike, symbol: str, depth: int = 10) -> Iterator[Book | Trade]:
    """Yield `Book` (after each applied depth event, top `depth` levels, as marketdata
    publishes it) and `Trade` messages of `symbol` from a spot capture, stamped with
    the recorded receive time (`ts` = `recv_ts` = the record's "t"). Raises
    CaptureError for an unreadable capture."""
    sym = symbol.upper()
    depth_stream, trade_streams = f"{sym.lower()}@depth", (f"{sym.lower()}@trade", f"{sym.lower()}@aggTrade")
    sync = BookSync(sym, Market.SPOT)
    for rec in iter_capture(path):
        t, kind, m = rec["t"], rec["k"], rec["m"]
        if kind == "snapshot":
            if str(rec.get("s", "")).upper() == sym and sync.on_snapshot(m) is SyncResult.SNAPSHOT_APPLIED:
                book = _book(sync, 0, t, depth)
                if book is not None:
                    yield book
            continue
        stream, data = m.get("stream", ""), m.get("data")
        if stream.startswith(depth_stream):
            if sync.on_depth(data) is SyncResult.APPLIED:
                book = _book(sync, int(data["E"]), t, depth)
                if book is not None:
                    yield book
        elif stream.startswith(trade_streams) and sync.synced:
            trade_id = data["a"] if "a" in data else data["t"]
            yield Trade(ts=t, symbol=sym, exch_ts=int(data["E"]), trade_id=trade_id, price=Decimal(data["p"]),
                        qty=Decimal(data["q"]), buyer_is_maker=data["m"], recv_ts=t)


def _book(sync: BookSync, exch_ts: int, recv_ts: int, depth: int) -> Book | None:
    try:
        m = sync.book.metrics(depth)
    except EmptyBookError:
        return None
    return Book(ts=recv_ts, symbol=sync.book.symbol, exch_ts=exch_ts, update_id=sync.book.update_id,
                bids=m.bids, asks=m.asks, mid=m.mid, spread=m.spread, spread_bps=m.spread_bps,
                imbalance=m.imbalance, microprice=m.microprice, recv_ts=recv_ts)
