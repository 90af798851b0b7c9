"""Marketdata shell: feed → BookSync per symbol → `book.*`, `trade.*`, `status.*` on PUB."""
from __future__ import annotations

import logging
import time
from decimal import Decimal, InvalidOperation

from prometheus_client import Counter

from services.marketdata.book import EmptyBookError
from services.marketdata.capture import CaptureError
from services.marketdata.feeds import Backoff, LiveFeed, ReplayFeed, parse_raw
from services.marketdata.sync import BookSync, Market, SyncResult
from shared.bus import Publisher
from shared.config import Config
from shared.messages import Book, MdStatus, Trade
from shared.runtime import HeartbeatMaker, Liveness, Ticker

log = logging.getLogger("qf.marketdata")

EVENTS = Counter("qf_md_events_total", "Feed messages by kind", ["kind"])
BAD = Counter("qf_md_bad_messages_total", "Feed messages dropped as malformed", ["reason"])


class MarketDataService:
    """Owns the feed, one BookSync per symbol, and the PUB socket."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.symbols = cfg.md.symbols
        self._stop = False
        self.syncs = {s: BookSync(s, Market.SPOT) for s in self.symbols}
        self.state = {s: "CONNECTING" for s in self.symbols}
        self.stats = {"book_events": 0, "trades": 0, "bad_messages": 0, "gaps": 0, "ignored": 0}
        self.pub: Publisher | None = None
        self.feed = None

    def stop(self) -> None:
        self._stop = True

    def _stopping(self) -> bool:
        return self._stop

    # -- publishing ----------------------------------------------------------------

    def _set_state(self, symbol: str, state: str, detail: str = "") -> None:
        if self.state.get(symbol) != state:
            self.state[symbol] = state
            log.info("book state", extra={"symbol": symbol, "state": state, "detail": detail})
            self.pub.publish(f"status.{symbol}", MdStatus(ts=time.time_ns(), symbol=symbol, state=state,
                                                          detail=detail))

    def _publish_book(self, sync: BookSync, exch_ts: int, recv_ns: int) -> None:
        try:
            m = sync.book.metrics(self.cfg.md.book_depth)
        except EmptyBookError:
            return  # a one-sided book has no mid: nothing honest to publish
        symbol = sync.book.symbol
        self.pub.publish(f"book.{symbol}", Book(
            ts=time.time_ns(), symbol=symbol, exch_ts=exch_ts, update_id=sync.book.update_id,
            bids=m.bids, asks=m.asks, mid=m.mid, spread=m.spread, spread_bps=m.spread_bps,
            imbalance=m.imbalance, microprice=m.microprice, recv_ts=recv_ns))
        self.stats["book_events"] += 1

    # -- handlers --------------------------------------------------------------------

    def on_ws(self, msg: dict, recv_ns: int) -> None:
        """One combined-stream message (already JSON-decoded)."""
        stream, data = msg.get("stream"), msg.get("data")
        if not isinstance(stream, str) or not isinstance(data, dict):
            return self._bad("not_combined_stream", repr(msg)[:80])
        name, _, kind = stream.partition("@")
        symbol = name.upper()
        if symbol not in self.syncs:
            self.stats["ignored"] += 1
            return
        try:
            if kind.startswith("depth"):
                EVENTS.labels("depth").inc()
                self.on_depth(symbol, data, recv_ns)
            elif kind in ("aggTrade", "trade"):
                EVENTS.labels("trade").inc()
                self.on_trade(symbol, data, kind, recv_ns)
            elif kind == "bookTicker":
                EVENTS.labels("bookTicker").inc()
            else:
                self._bad("unknown_stream", stream)
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            self._bad("bad_fields", f"{stream}: {type(exc).__name__} {exc}"[:160])

    def on_depth(self, symbol: str, data: dict, recv_ns: int) -> None:
        sync = self.syncs[symbol]
        result = sync.on_depth(data)
        if result is SyncResult.APPLIED:
            self._publish_book(sync, int(data["E"]), recv_ns)
        elif result is SyncResult.GAP:
            self.stats["gaps"] += 1
            log.warning("book gap, resyncing", extra={"symbol": symbol, "U": data.get("U"), "u": data.get("u"),
                                                      "book_id": sync.book.update_id})
            self._set_state(symbol, "SYNCING", "gap in update ids")
        if sync.needs_snapshot:
            self._set_state(symbol, "SYNCING", "waiting for snapshot")
            if isinstance(self.feed, LiveFeed):
                self.feed.request_snapshot(symbol)

    def on_snapshot(self, symbol: str, snap: dict, recv_ns: int) -> None:
        sync = self.syncs.get(symbol)
        if sync is None:
            self.stats["ignored"] += 1
            return
        try:
            result = sync.on_snapshot(snap)
        except (KeyError, TypeError, ValueError) as exc:
            return self._bad("bad_snapshot", f"{symbol}: {exc}"[:160])
        if result is SyncResult.SNAPSHOT_TOO_OLD and isinstance(self.feed, LiveFeed):
            self.feed.request_snapshot(symbol)
        if sync.synced:
            self._set_state(symbol, "SYNCED")
            self._publish_book(sync, 0, recv_ns)

    def on_trade(self, symbol: str, data: dict, kind: str, recv_ns: int) -> None:
        trade_id = data["a"] if kind == "aggTrade" else data["t"]
        if type(trade_id) is not int or type(data["m"]) is not bool:
            raise TypeError("trade id must be an int and m a bool")
        self.pub.publish(f"trade.{symbol}", Trade(
            ts=time.time_ns(), symbol=symbol, exch_ts=int(data["E"]), trade_id=trade_id,
            price=Decimal(data["p"]), qty=Decimal(data["q"]), buyer_is_maker=data["m"], recv_ts=recv_ns))
        self.stats["trades"] += 1

    def _bad(self, reason: str, detail: str) -> None:
        BAD.labels(reason).inc()
        self.stats["bad_messages"] += 1
        log.warning("bad feed message", extra={"reason": reason, "detail": detail})

    # -- loop ------------------------------------------------------------------------

    def _make_feed(self):
        md = self.cfg.md
        if md.feed.kind == "replay":
            return ReplayFeed(md.feed.path, md.replay_speed, md.replay_loop, self._stopping)
        return LiveFeed(md.binance_ws, md.binance_rest, self.symbols, md.snapshot_limit, md.watchdog_s,
                        Backoff(cap_s=md.backoff_max_s), self._stopping)

    def run(self) -> None:
        cfg = self.cfg
        self.pub = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
        live = Liveness(cfg.common.run_dir, "marketdata")
        beat, hb = Ticker(cfg.bus.heartbeat_ms), HeartbeatMaker("marketdata")
        self.feed = self._make_feed()
        log.info("marketdata started", extra={"feed": str(cfg.md.feed), "symbols": ",".join(self.symbols),
                                              "pub": cfg.bus.md_pub})
        try:
            for rec in self.feed.records():
                self._dispatch(rec)
                if beat.due():
                    self._heartbeat(hb, live)
                if self._stop:
                    break
            if cfg.md.feed.kind == "replay" and not self._stop:
                for s in self.symbols:
                    self._set_state(s, "REPLAY_DONE", "capture finished")
                log.info("replay finished", extra=dict(self.stats))
            while not self._stop:  # stay up: subscribers and health checks keep working
                self._heartbeat(hb, live)
                deadline = time.monotonic() + cfg.bus.heartbeat_ms / 1000
                while not self._stop and time.monotonic() < deadline:
                    time.sleep(0.05)
        except CaptureError as exc:
            log.error("capture unreadable", extra={"error": str(exc)})
            raise
        finally:
            live.remove()
            self.pub.close()
            log.info("marketdata stopped", extra=dict(self.stats))

    def _dispatch(self, rec: tuple) -> None:
        kind, recv_ns = rec[0], rec[1]
        if kind == "ws":
            if isinstance(rec[2], dict):
                self.on_ws(rec[2], recv_ns)
            else:
                self._bad("not_combined_stream", repr(rec[2])[:80])
        elif kind == "raw":
            try:
                msg = parse_raw(rec[2])
            except ValueError as exc:
                return self._bad("malformed_json", str(exc)[:120])
            self.on_ws(msg, recv_ns)
        elif kind == "snapshot":
            self.on_snapshot(rec[2], rec[3], recv_ns)
        elif kind == "disconnected":
            for s in self.symbols:
                self.syncs[s] = BookSync(s, Market.SPOT)  # a new connection needs a fresh sync
                self._set_state(s, "DISCONNECTED", rec[2])

    def _heartbeat(self, hb: HeartbeatMaker, live: Liveness) -> None:
        status = "ok" if all(v == "SYNCED" for v in self.state.values()) else ",".join(sorted(set(self.state.values())))
        self.pub.publish("heartbeat.marketdata", hb.make(status, {**self.stats, "state": status}))
        live.touch()
