"""Live Binance feed: a connection per market, reconnects, a silence watchdog, planned replacement."""
from __future__ import annotations

import logging
import queue
import time
from typing import Callable, Iterator

from services.marketdata.binance import Conn, ConnEvent, Inbox, SnapshotFetcher
from services.marketdata.feeds import Backoff
from services.marketdata.metrics import MdMetrics
from services.marketdata.records import Disconnected, Idle, Record, RouteOpened
from services.marketdata.symbols import Route, markets_of, split_key, streams_for
from services.marketdata.sync import Market
from shared.config import MarketDataConfig

log = logging.getLogger("qf.marketdata.live")

STANDBY_TIMEOUT_S = 60.0  # a replacement connection not synced by then is dropped and retried
CHECK_EVERY_S = 0.05  # watchdog / rotation checks between messages


class Link:
    """The connections of one market: the live one, a standby while replacing it, and when
    to try again. Decisions only; Conn does the I/O."""

    def __init__(self, market: Market, md: MarketDataConfig, keys: tuple[str, ...], inbox: Inbox,
                 metrics: MdMetrics, new_gen: Callable[[], int]) -> None:
        self.market, self.keys, self.inbox, self.m, self.new_gen = market, keys, inbox, metrics, new_gen
        names = [split_key(k)[1] for k in keys if split_key(k)[0] is market]
        base = md.binance_ws if market is Market.SPOT else md.binance_usdm_ws
        self.url = f"{base}/stream?streams=" + "/".join(streams_for(names, md.book_ticker))
        self.watchdog_s, self.rotate_s = md.watchdog_s, md.rotate_s
        self.backoff = Backoff(cap_s=md.backoff_max_s)
        self.live: Conn | None = None  # open, or opening to become the live connection
        self.standby: Conn | None = None
        self.next_connect = 0.0
        self.next_rotate = 0.0  # no standby before this (after a failed one)
        self.rotate_now = False  # serverShutdown announced
        self.connections = 0

    def _open(self, live: bool, now: float) -> Conn:
        route = Route(self.market, self.keys, gen=self.new_gen(), live=live)
        conn = Conn(self.url, route, self.inbox)
        conn.start()
        log.info("binance connecting", extra={"market": self.market.value, "route": route.label,
                                              "role": "live" if live else "standby", "url": self.url})
        return conn

    def tick(self, now: float) -> None:
        """Open, replace or close connections as their age and silence require."""
        live = self.live
        if live is None:
            if now >= self.next_connect:
                self.live = self._open(True, now)
            return
        if live.opened_at is None:
            return
        if now - live.last_rx > self.watchdog_s and not live.closing:
            log.warning("binance silent, reconnecting", extra={"market": self.market.value,
                                                               "silent_s": round(now - live.last_rx, 1)})
            live.close(f"silent for {self.watchdog_s:g}s")
        sb = self.standby
        if sb is None:
            if (self.rotate_now or now - live.opened_at >= self.rotate_s) and now >= self.next_rotate:
                self.rotate_now = False
                self.standby = self._open(False, now)
        elif now - sb.started > STANDBY_TIMEOUT_S:
            sb.close("replacement not synced in time")
        elif sb.opened_at is not None and now - sb.last_rx > self.watchdog_s and not sb.closing:
            sb.close(f"silent for {self.watchdog_s:g}s")

    def on_open(self, conn: Conn) -> RouteOpened | None:
        if conn is not self.live and conn is not self.standby:
            conn.close("no longer needed")
            return None
        self.connections += 1
        if conn is self.live and self.connections > 1:
            self.m.bump(self.m.reconnects, self.market.value)
        log.info("binance connected", extra={"market": self.market.value, "route": conn.route.label,
                                             "role": "live" if conn is self.live else "standby"})
        return RouteOpened(time.time_ns(), conn.route)

    def on_closed(self, conn: Conn, why: str, now: float) -> list[Record]:
        """A connection ended (or never opened): schedule what comes next. Returns records for
        the service: Disconnected when it was the live one or a standby, then RouteOpened
        when a standby becomes the live connection in its place."""
        out: list[Record] = []
        if conn is self.live:
            self.live = None
            if self.standby is not None:  # a replacement is on its way: it becomes the live one
                self.live, self.standby = self.standby, None
                self.live.route.live = True
                if self.live.opened_at is not None:
                    out.append(RouteOpened(time.time_ns(), self.live.route))
            if conn.opened_at is not None:
                self.backoff.connected_for(now - conn.opened_at)
            delay = self.backoff.next_delay()
            self.next_connect = now + delay
            log.warning("binance connection lost", extra={"market": self.market.value, "route": conn.route.label,
                                                          "why": why, "retry_in_s": round(delay, 2)})
        elif conn is self.standby:
            self.standby = None
            self.next_rotate = now + self.backoff.next_delay()
            log.warning("replacement connection failed", extra={"market": self.market.value, "why": why})
        else:
            return out  # a connection replaced on purpose
        conn.route.retired = True
        return [Disconnected(time.time_ns(), why, conn.route), *out]

    def reconnect(self, why: str) -> bool:
        """Close the live connection (if open) so that a new one replaces it, as after a loss:
        a book stalled on it. Returns whether one was closed."""
        live = self.live
        if live is None or live.opened_at is None or live.closing:
            return False
        log.warning("binance reconnecting", extra={"market": self.market.value, "route": live.route.label,
                                                   "why": why})
        live.close(why)
        return True

    def switched(self, route: Route) -> None:
        """The service now publishes from `route` (the standby): close the old connection."""
        if self.standby is None or self.standby.route is not route:
            return
        old, self.live, self.standby = self.live, self.standby, None
        self.rotate_now = False  # a shutdown announced for the old connection is answered
        self.m.bump(self.m.switches, self.market.value)
        if old is not None:
            old.route.retired = True
            old.close("replaced by a synced connection")
            log.info("switched to the new connection", extra={"market": self.market.value,
                                                              "old": old.route.label, "new": route.label})

    def close(self) -> None:
        for conn in (self.live, self.standby):
            if conn is not None:
                conn.close("stopping")
        for conn in (self.live, self.standby):
            if conn is not None:
                conn.join(3)


class LiveFeed:
    """Binance combined streams (one connection per market for all symbols), REST snapshots on
    request. Never substitutes other data: when Binance cannot be reached it says so and
    retries with backoff until stopped. The connections' frames reach the loop through a
    bounded Inbox: a reader ahead of the loop waits (TCP throttles the exchange), drops nothing."""

    def __init__(self, md: MarketDataConfig, keys: tuple[str, ...], metrics: MdMetrics,
                 should_stop: Callable[[], bool]) -> None:
        self.inbox = metrics.inbox = Inbox()  # bounded for frames: a burst waits on TCP, not in memory
        self.should_stop = should_stop
        self._gen = 0
        self.links: dict[Market, Link] = {}
        self.fetchers: dict[Market, SnapshotFetcher] = {}
        for market in markets_of(keys):
            self.links[market] = Link(market, md, keys, self.inbox, metrics, self._next_gen)
            rest = md.binance_rest if market is Market.SPOT else md.binance_usdm_rest
            self.fetchers[market] = SnapshotFetcher(market, rest, md.snapshot_limit, self.inbox, metrics,
                                                    md.backoff_max_s)

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def request_snapshot(self, route: Route, name: str) -> None:
        """Fetch a REST snapshot of `name` for the books of `route` (arrives as a record)."""
        self.fetchers[route.market].request(route, name)

    def switched(self, route: Route) -> None:
        self.links[route.market].switched(route)

    def reconnect(self, market: Market, why: str) -> None:
        """Replace `market`'s live connection (a book on it stalled)."""
        link = self.links.get(market)
        if link is not None:
            link.reconnect(why)

    def server_shutdown(self, route: Route) -> None:
        """Binance announced a shutdown of `route`'s server: replace the connection now."""
        link = self.links[route.market]
        if link.live is not None and link.live.route is route and link.standby is None:
            log.warning("binance serverShutdown: opening a replacement", extra={"market": route.market.value})
            link.rotate_now = True
            link.next_rotate = 0.0

    def records(self) -> Iterator[Record]:
        """RawFrame and SnapshotRecord as the connection and REST threads made them,
        RouteOpened / Disconnected as connections come and go, Idle when nothing came for
        CHECK_EVERY_S; until should_stop()."""
        for f in self.fetchers.values():
            f.start()
        inbox, links = self.inbox, list(self.links.values())
        get, Empty = inbox.get, queue.Empty
        next_check = 0.0
        while not self.should_stop():
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_EVERY_S
                for link in links:
                    link.tick(now)
            try:
                item = get(timeout=CHECK_EVERY_S)
            except Empty:
                yield Idle(time.time_ns())
                continue
            if inbox.waiting:
                inbox.made_room()
            if type(item) is not ConnEvent:  # RawFrame, SnapshotRecord
                yield item
            elif item.opened:
                rec = self.links[item.conn.route.market].on_open(item.conn)
                if rec is not None:
                    yield rec
            else:  # closed, or never opened
                yield from self.links[item.conn.route.market].on_closed(item.conn, item.why, time.monotonic())

    def close(self) -> None:
        """Close every connection and stop the snapshot threads."""
        for link in self.links.values():
            link.close()
        for f in self.fetchers.values():
            if f.thread.is_alive():
                f.stop()
