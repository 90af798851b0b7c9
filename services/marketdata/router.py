"""Feed records → the books of their route → `book.*`, `trade.*`, `status.*`, switches included."""
from __future__ import annotations

import logging
import time
from typing import NamedTuple
from decimal import Decimal, InvalidOperation

import orjson
from msgpack import packb as _packb

from services.marketdata.book import EmptyBookError, parse_depth_frame, parse_units
from services.marketdata.feeds import is_server_shutdown
from services.marketdata.guard import Action, BookGuard
from services.marketdata.metrics import MdMetrics
from services.marketdata.records import Disconnected, Idle, RawFrame, Record, RouteOpened, SnapshotRecord, WsMessage
from services.marketdata.symbols import Route, split_key
from services.marketdata.sync import BadEventError, BookSync, Market, SyncResult
from shared.bus import Publisher
from shared.messages import Book, MdStatus, Trade, book_wire

log = logging.getLogger("qf.marketdata")

APPLIED, GAP, SUSPECT = SyncResult.APPLIED, SyncResult.GAP, SyncResult.SUSPECT
SWITCH_UNEQUAL_AFTER_S = 1.0  # a standby ahead of the live books this long takes over anyway
STALL_ALERT = "BOOK_STALLED"
UNSYNCED_STATES = ("CONNECTING", "SYNCING", "DISCONNECTED")  # no book, and one is wanted
BAD_KEPT = 100  # bad messages kept with where they were (all are counted)
_perf_ns = time.perf_counter_ns  # measures processing cost only (a histogram): never in a message or decision


class BookRouter:
    """Keeps the books of every route (live connection, standby, replayed capture) and publishes
    the live ones: only while synced, never twice, never older than one already out.

    Driven record by record: whoever runs the feed (MarketDataService live or replaying, a
    backtest in process) calls dispatch(record, now_ns) for each record and reads what it
    publishes through `pub`. The router never reads a clock: `now_ns` (wall or event ns) stamps
    what it publishes (Book.ts, Trade.ts, MdStatus.ts) and times the periods without a book;
    `now` (monotonic seconds, the clock of check_books) times the snapshot backoff, stalls and
    switches. A record's own recv_ns is its books' recv_ts.

    A standby route takes over when each of its books equals the live one (so not one book
    state is skipped), or after SWITCH_UNEQUAL_AFTER_S when it is ahead of it.

    With a `guard` (live feeds), snapshots of a symbol are backed off and a stalled book is
    recovered: call check_books(now_ns, monotonic now) every ~0.1 s.

    `now_ns` at construction starts each key's time without a book (0: from the first record
    about it)."""

    def __init__(self, keys: tuple[str, ...], depth_n: int, recorder=None, now_ns: int = 0) -> None:
        self.keys, self.depth_n, self.recorder = tuple(keys), depth_n, recorder
        self.m = MdMetrics(self.keys)
        self.pub = None  # anything with publish(topic, msg)
        self.feed = None  # anything with request_snapshot / switched / server_shutdown / reconnect
        self.guard: BookGuard | None = None  # snapshot backoff and stall recovery (live feeds)
        self.alerter = None  # shared.alerts.Alerter: BOOK_STALLED
        self._deferred: dict[tuple[Route, str], tuple[str, BookSync]] = {}  # snapshots waiting for their backoff
        self.live_feed = False  # unknown streams are errors live (we subscribed to none), normal in a replay
        self.state = dict.fromkeys(self.keys, "CONNECTING")
        self.state_detail = dict.fromkeys(self.keys, "")
        self.last_uid = dict.fromkeys(self.keys, 0)  # update id of the last published book
        self.last_trade = dict.fromkeys(self.keys, -1)
        self.last_E = dict.fromkeys(self.keys, 0)
        self.rec_last_u = dict.fromkeys(self.keys, 0)  # last depth u written to the recording
        self._snapshots_applied = dict.fromkeys(self.keys, 0)
        self.book_topic = {k: f"book.{k}" for k in self.keys}
        self.book_topic_b = {k: t.encode() for k, t in self.book_topic.items()}
        self.trade_topic = {k: f"trade.{k}" for k in self.keys}
        self.stats = {"book_events": 0, "trades": 0, "bad_messages": 0, "gaps": 0, "resyncs": 0,
                      "reconnects": 0, "ignored": 0, "stalls": 0, "stall_recoveries": 0}
        for k in self.keys:
            self.m.unsynced_since[k] = now_ns  # CONNECTING: no book yet
        self._warned: set[str] = set()
        # A replay names where each record was read ("FILE:LINE", ReplayFeed.where); live: None.
        self.where = None
        self.bad_events: list[BadMessage] = []  # the first BAD_KEPT bad messages (stats counts all)
        self.last_bad: BadMessage | None = None
        self.live_route: dict[Market, Route] = {}
        self.standby: dict[Market, Route] = {}
        self.syncs: dict[str, BookSync] = {}  # key -> the published (live) book's sync
        for market in (Market.SPOT, Market.USDM):
            self._make_live(Route(market, self.keys, label=f"{market.value}#default"))

    # -- records -----------------------------------------------------------------------

    def dispatch(self, rec: Record, now_ns: int, now: float | None = None) -> None:
        """Handle one feed record (records.py), as it happened at `now_ns` (wall ns: the
        service passes time.time_ns(), a backtest the record's recv_ns) and monotonic `now`
        (seconds, the clock check_books gets; None: now_ns in seconds, for a loop whose only
        clock is the records' own time). Anything a record makes goes to `pub`.

        A RawFrame or WsMessage without a route goes to the live spot route; a SnapshotRecord
        without one to the live route of its key's market; Idle does nothing. Never raises: a
        record that fails (or is no record) is counted (`internal_error`) and logged, so one bad
        record cannot stop the loop."""
        if now is None:
            now = now_ns * 1e-9
        t = type(rec)
        try:
            if t is RawFrame:
                route = rec.route
                self.on_raw(rec.frame, rec.recv_ns, self.live_route[Market.SPOT] if route is None else route,
                            now_ns, now)
            elif t is WsMessage:
                route = rec.route
                self.on_ws(rec.msg, rec.recv_ns, self.live_route[Market.SPOT] if route is None else route,
                           now_ns, now)
            elif t is SnapshotRecord:
                if rec.route is not None:
                    self.on_snapshot(rec.name, rec.snap, rec.recv_ns, rec.route, now_ns, now)
                else:
                    market, name = split_key(rec.name)
                    self.on_snapshot(name, rec.snap, rec.recv_ns, self.live_route[market], now_ns, now)
            elif t is RouteOpened:
                self.on_route(rec.route, now_ns, now)
            elif t is Disconnected:
                self.on_disconnected(rec.why, rec.route, now_ns, now)
            elif t is not Idle:
                raise TypeError(f"not a feed record: {rec!r}"[:200])
        except Exception as exc:  # one bad record must not take the service (or a backtest) down
            self.m.bad("internal_error")
            self.stats["bad_messages"] += 1
            self._keep_bad("internal_error", f"{type(exc).__name__}: {exc}"[:240], "")
            log.exception("record failed", extra={"kind": t.__name__, **self._at()})

    def replay_done(self, now_ns: int, now: float | None = None, detail: str = "capture finished",
                    state: str = "REPLAY_DONE") -> None:
        """The replayed captures are over: every key goes to `state` (REPLAY_DONE, or REPLAY_FAILED
        when a capture could not be read to its end; its time without a book, if any, ends at
        `now_ns`)."""
        now = now_ns * 1e-9 if now is None else now
        for k in self.keys:
            self._set_state(k, state, detail, now_ns, now)

    def snapshots_for_new_segment(self) -> None:
        """A new recording segment starts: ask the feed for a snapshot of every symbol of the
        live routes (a synced book ignores it), so that each file replays on its own."""
        for route in self.live_route.values():
            for name in route.keys:
                if name not in route.awaiting:
                    route.awaiting.add(name)
                    self.feed.request_snapshot(route, name.upper())

    # -- routes ------------------------------------------------------------------------

    def _make_live(self, route: Route) -> None:
        route.live = True
        self.live_route[route.market] = route
        if self.standby.get(route.market) is route:
            del self.standby[route.market]
        for name, key in route.keys.items():
            self.syncs[key] = route.syncs[name]

    def on_route(self, route: Route, now_ns: int, now: float) -> None:
        """A feed opened a source of messages: a live one replaces the market's previous one,
        a standby builds its books until it can take over."""
        if not route.live:
            self.standby[route.market] = route
            return
        if self.standby.get(route.market) is route:  # a replacement promoted when its predecessor dropped
            self._take_over(route)
        self._make_live(route)
        for name, key in route.keys.items():
            sync = route.syncs[name]
            if sync.synced:  # a replacement already synced when its predecessor dropped
                self._publish_book(key, sync, self.last_E[key], now_ns, now_ns, now)
            else:
                self._set_state(key, "SYNCING", f"{route.label}: waiting for events", now_ns, now)

    def _take_over(self, route: Route) -> None:
        """Standby `route` replaces the live connection: the recording goes on from where its
        predecessor left it, with the depth events only the new connection received, and
        none it holds already (a replacement behind the old one re-sends those: written
        again, the recording's update ids would go back, and it would not replay)."""
        route.took_over = True
        if self.recorder is None:
            return
        for name, key in route.keys.items():
            for u, recv_ns, raw in route.recent[name]:
                if u > self.rec_last_u[key]:
                    self.recorder.ws(recv_ns, raw, route.market)
                    self.rec_last_u[key] = u

    def _try_switch(self, route: Route, now_ns: int, now: float) -> None:
        """Switch to standby `route` once each of its books is synced and equal to (or, for a
        while, ahead of) the live one."""
        equal = True
        for name, sync in route.syncs.items():
            if not sync.synced:
                return
            cur = self.syncs.get(route.keys[name])
            if cur is not None and cur.synced and sync.book.update_id != cur.book.update_id:
                if sync.book.update_id < cur.book.update_id:
                    return
                equal = False
        if not equal:
            if not route.ready_since:
                route.ready_since = now
            if now - route.ready_since < SWITCH_UNEQUAL_AFTER_S:
                return
        old = self.live_route.get(route.market)
        if old is not None and old is not route:
            old.live, old.retired = False, True
        self._take_over(route)
        self._make_live(route)
        if self.feed is not None:
            self.feed.switched(route)
        log.info("switched to a new connection", extra={"route": route.label, "equal": equal,
                                                        "old": old.label if old is not None else ""})
        for name, key in route.keys.items():
            self._publish_book(key, route.syncs[name], self.last_E[key], now_ns, now_ns, now)

    def on_disconnected(self, why: str, route: Route | None, now_ns: int, now: float) -> None:
        """A route's messages stopped (connection lost, capture restarting); None: every live route."""
        for r in [route] if route is not None else list(self.live_route.values()):
            if not r.live:
                r.retired = True  # a replacement that failed: the live connection goes on
                if self.standby.get(r.market) is r:
                    del self.standby[r.market]
                continue
            r.reset()  # a new connection (or the capture's next pass) starts from scratch
            self._make_live(r)
            for key in r.keys.values():
                self.last_uid[key], self.last_trade[key] = 0, -1
                self._set_state(key, "DISCONNECTED", why, now_ns, now)
                if self.guard is not None:
                    self.guard.disconnected(key)

    # -- publishing --------------------------------------------------------------------

    def _set_state(self, key: str, state: str, detail: str, now_ns: int, now: float) -> None:
        prev = self.state.get(key)
        if prev != state:
            self.state[key], self.state_detail[key] = state, detail
            self.m.synced[key] = state == "SYNCED"
            self._time_without_book(key, prev, state, now_ns, now)
            log.info("book state", extra={"symbol": key, "state": state, "detail": detail})
            self.pub.publish(f"status.{key}", MdStatus(ts=now_ns, symbol=key, state=state, detail=detail))

    def _time_without_book(self, key: str, prev: str | None, state: str, now_ns: int, now: float) -> None:
        """Account the time `key` has no book (a period opens when it leaves SYNCED, closes
        when it is SYNCED again or the replay is over) and tell the guard."""
        m = self.m
        if state in UNSYNCED_STATES:
            if not m.unsynced_since[key]:
                m.unsynced_since[key] = now_ns
            if prev == "SYNCED" and self.guard is not None:
                self.guard.unsynced(key, now)
            return
        since = m.unsynced_since[key]
        if since:
            m.unsynced_total[key] += (now_ns - since) / 1e9
            m.unsynced_since[key] = 0
        if state == "SYNCED" and self.guard is not None:
            self.guard.synced(key, now)

    def status_detail(self, key: str, now_ns: int) -> str:
        """`key`'s state detail, led by how long (at `now_ns`) it has had no book while it has none."""
        since, detail = self.m.unsynced_since[key], self.state_detail[key]
        if not since or self.state[key] not in UNSYNCED_STATES:
            return detail
        return f"no book for {(now_ns - since) / 1e9:.1f}s: {detail}"

    def _publish_book(self, key: str, sync: BookSync, exch_ts, recv_ns: int, now_ns: int, now: float) -> None:
        book = sync.book
        uid = book.update_id
        if uid <= self.last_uid[key] or not sync.synced:
            return  # already out (the other connection of a switch), or not trustworthy
        try:
            m = book.metrics(self.depth_n)
        except EmptyBookError:
            return  # a one-sided book has no mid: nothing honest to publish
        if self.state[key] != "SYNCED":
            self._set_state(key, "SYNCED", "", now_ns, now)
        pub, topic = self.pub, self.book_topic[key]
        if type(exch_ts) is not int:
            exch_ts = 0
        if type(pub) is Publisher:
            # Publisher.publish with the Book dataclass and its to_wire skipped (~4 µs an event):
            # the same seq counter, the same bytes (tests/services/marketdata/test_fast_publish.py).
            pub.send_raw(self.book_topic_b[key], _packb(book_wire(
                now_ns, key, exch_ts, uid, m.bids, m.asks, m.mid, m.spread, m.spread_bps,
                m.imbalance, m.microprice, recv_ns, pub.next_seq(topic)), use_bin_type=True))
        else:
            pub.publish(topic, Book(
                ts=now_ns, symbol=key, exch_ts=exch_ts, update_id=uid, bids=m.bids, asks=m.asks,
                mid=m.mid, spread=m.spread, spread_bps=m.spread_bps, imbalance=m.imbalance,
                microprice=m.microprice, recv_ts=recv_ns))
        self.last_uid[key] = uid
        self.stats["book_events"] += 1
        self.m.books[key] += 1

    # -- messages ----------------------------------------------------------------------

    def on_raw(self, frame: bytes | str, recv_ns: int, route: Route, now_ns: int, now: float) -> None:
        """One WebSocket frame as received at `recv_ns` on `route` (see dispatch for the times)."""
        t0 = _perf_ns()
        # A diff-depth frame of the usual shape is parsed in C, its levels straight to integer
        # units (no Python object per level); any other frame, or anything unusual about one,
        # goes to orjson, which gives the same event or the error.
        msg = parse_depth_frame(frame)
        if msg is None:
            try:
                msg = orjson.loads(frame)
            except orjson.JSONDecodeError as exc:
                return self._bad("malformed_json", f"{exc}; frame {repr(frame)[:80]}")
        self.on_ws(msg, recv_ns, route, now_ns, now, len(frame), t0, frame)

    def on_ws(self, msg, recv_ns: int, route: Route, now_ns: int, now: float, nbytes: int = 0, t0: int = 0,
              raw=None) -> None:
        """One decoded message: a combined-stream `{"stream", "data"}` map, or anything a
        hostile network may send instead (counted and logged, never raised). `nbytes`, `t0`
        (perf_counter_ns at its arrival) and `raw` (the frame) come from on_raw."""
        t0 = t0 or _perf_ns()
        if route.retired:
            return  # late messages of a connection already replaced or lost
        stream = msg.get("stream") if type(msg) is dict else None
        data = msg.get("data") if stream is not None else None
        if type(stream) is not str or type(data) is not dict:
            return self._odd_message(msg, route)
        hit = route.streams.get(stream)
        if hit is None:
            hit = self._classify(route, stream)
            if hit is None:
                return self._unknown_symbol(stream, data, route, nbytes)
        label, name, key, counter, kind = hit
        counter[0] += 1
        counter[1] += nbytes
        if self.recorder is not None and route.live and not (
                route.took_over and label == "depth" and type(u := data.get("u")) is int and u <= self.rec_last_u[key]):
            self.recorder.ws(recv_ns, raw if raw is not None else msg, route.market)
        try:
            if label == "depth":
                self._on_depth(route, name, key, data, recv_ns, raw if raw is not None else msg, now_ns, now)
                self.m.event_time.observe((_perf_ns() - t0) * 1e-9)
            elif label == "trade":
                self._on_trade(route, key, data, kind, recv_ns, now_ns)
            elif label == "bookTicker":
                self._on_ticker(route, name, data)
            else:
                self._bad("unknown_stream", stream)
        except BadEventError as exc:
            self._bad("bad_event", str(exc)[:240], key)
            self._need_snapshot(route, name, key, "bad depth event", now_ns, now)
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            self._bad("bad_fields", f"{stream}: {type(exc).__name__} {exc}"[:240], key)

    def _classify(self, route: Route, stream: str) -> tuple | None:
        """(kind label, symbol name, key, its event counter, stream kind) of a stream name on
        `route`, or None when it names no symbol of ours. Known kinds are cached on the route
        (a bounded set: our symbols × three kinds), so the hot path does one dict lookup."""
        name, _, kind = stream.partition("@")
        key = route.keys.get(name)
        if key is None:
            return None
        label = "depth" if kind == "depth" or kind.startswith("depth@") else \
            "trade" if kind in ("aggTrade", "trade") else "bookTicker" if kind == "bookTicker" else "other"
        hit = (label, name, key, self.m.events[(key, label)], kind)
        if label != "other":
            route.streams[stream] = hit
        return hit

    def _on_depth(self, route: Route, name: str, key: str, data: dict, recv_ns: int, raw, now_ns: int,
                  now: float) -> None:
        sync = route.syncs[name]
        result = sync.on_depth(data)  # U/u are checked ints from here on
        if result is SUSPECT:
            return self._bad("implausible_ids", f"{key}: U={data['U']} u={data['u']} jumps past "
                             f"{sync.book.update_id if sync.synced else sync.buffered_range()}"[:160], key)
        if route.live:
            if self.recorder is not None and data["u"] > self.rec_last_u[key]:
                self.rec_last_u[key] = data["u"]
            E = data.get("E")
            if type(E) is int:
                self.last_E[key] = E
                self.m.lag[key].observe(recv_ns * 1e-9 - E * 1e-3)
            if result is APPLIED:
                self.m.last_event[key] = recv_ns
                self._publish_book(key, sync, E, recv_ns, now_ns, now)
                if route.tickers[name]:
                    self._check_ticker(key, sync, route.tickers[name])
                if self.standby:
                    sb = self.standby.get(route.market)
                    if sb is not None:
                        self._try_switch(sb, now_ns, now)
                return
        else:
            if self.recorder is not None:
                route.recent[name].append((data["u"], recv_ns, raw))
            if result is APPLIED:
                return self._try_switch(route, now_ns, now)
        if result is GAP:
            self._on_gap(route, key, sync)
        if sync.needs_snapshot:
            self._need_snapshot(route, name, key, "gap in update ids" if result is GAP else "waiting for a snapshot",
                                now_ns, now)

    def _on_gap(self, route: Route, key: str, sync: BookSync) -> None:
        self.stats["gaps"] += 1
        self.m.gaps[key] += 1
        gap = sync.last_gap
        log.warning("book gap, resyncing", extra={"symbol": key, "route": route.label, "gap": str(gap)})
        if route.live and gap is not None and gap.last_u < self.last_uid[key]:
            # The stream is behind a book already published: that book took an event the
            # exchange never sent. Its id must not hold back the true books that follow.
            self.last_uid[key] = 0

    def _need_snapshot(self, route: Route, name: str, key: str, why: str, now_ns: int, now: float) -> None:
        sync = route.syncs[name]
        if not sync.needs_snapshot:
            return
        if route.live:
            self._set_state(key, "SYNCING", why, now_ns, now)
            if (route, name) not in self._deferred:
                self.state_detail[key] = why  # heartbeats say the latest reason
        if self.feed is None or not sync.buffered or name in route.awaiting:
            return  # one request at a time: events keep coming while it is out
        guard = self.guard
        if guard is None:
            route.awaiting.add(name)
            self.feed.request_snapshot(route, name.upper())
            return
        if (route, name) in self._deferred:
            return
        wait = guard.snapshot_wait(key, now)
        if wait > 0:  # snapshots of this symbol did not hold: check_books asks when it is time
            self._deferred[(route, name)] = (key, sync)
            self.m.bump(self.m.snapshots_deferred, key)
            if route.live:
                self.state_detail[key] = f"{why}; snapshot #{guard.attempts(key) + 1} in {wait:.1f}s (backoff)"
            return
        self._request_snapshot(route, name, key, now)

    def _request_snapshot(self, route: Route, name: str, key: str, now: float) -> None:
        self.guard.snapshot_sent(key, now)
        route.awaiting.add(name)
        self.feed.request_snapshot(route, name.upper())

    # -- stalls (live feeds) -----------------------------------------------------------

    def check_books(self, now_ns: int, now: float | None = None) -> None:
        """Send the snapshot requests whose backoff has passed, and recover stalled books
        (guard.py): call it every ~0.1 s. `now` is monotonic seconds (the clock dispatch gets;
        None: now_ns in seconds), `now_ns` the wall ns that stamps what this publishes. Does
        nothing without a guard."""
        guard = self.guard
        if guard is None:
            return
        if now is None:
            now = now_ns * 1e-9
        for (route, name), (key, sync) in list(self._deferred.items()):
            if route.retired or route.syncs.get(name) is not sync or not sync.needs_snapshot \
                    or name in route.awaiting or not sync.buffered:
                del self._deferred[(route, name)]  # moot; the next event asks again if need be
            elif guard.snapshot_wait(key, now) <= 0:
                del self._deferred[(route, name)]
                self._request_snapshot(route, name, key, now)
        ev = self.m.events
        counts = {k: (ev[(k, "depth")][0] + ev[(k, "trade")][0] + ev[(k, "bookTicker")][0], self.m.books[k])
                  for k in self.keys}
        actions, recovered = guard.check(now, counts)
        for action in actions:
            self._on_stall(action, now_ns, now)
        for key in recovered:
            self._on_recovered(key)

    def _on_stall(self, a: Action, now_ns: int, now: float) -> None:
        key, guard, m = a.key, self.guard, self.m
        market, name = split_key(key)
        name = name.lower()
        m.stalls[key] = guard.stalls[key]
        self.stats["stalls"] = sum(guard.stalls.values())
        if not m.unsynced_since[key]:  # a synced book that stopped moving: no book since its frames came
            m.unsynced_since[key] = now_ns - int(a.waited_s * 1e9)
        why = f"no book for {a.waited_s:.1f}s while its frames keep arriving"
        route = self.live_route.get(market)
        if route is not None and name in route.awaiting:
            # Its snapshot is still on its way (REST slow, the weight gate or a 429/418 ban
            # holding it): a new buffer would only make that snapshot too old, and a new
            # connection would drop every other book of the market for nothing.
            m.bump(m.stall_actions, (key, "wait_for_snapshot"))
            self.state_detail[key] = f"stalled: {why}; its snapshot is still on its way (REST)"
            text = f"{key}: {why}; its snapshot request is still on its way (REST slow or rate limited)"
        elif a.kind == "resnapshot":
            m.bump(m.stall_actions, (key, a.kind))
            log.warning("book stalled: dropping its buffer, new snapshot", extra={"symbol": key, "why": why})
            if route is not None and name in route.syncs:
                route.syncs[name].discard()  # events buffered so far may hold the lie that stalled it
                route.tickers[name].clear()
                self._deferred.pop((route, name), None)
            self.last_uid[key] = 0  # a book published from a lie must not hold back the truth
            self._set_state(key, "SYNCING", f"stalled: {why}; buffer dropped, asking for a new snapshot", now_ns, now)
            self.state_detail[key] = f"stalled: {why}; buffer dropped, asking for a new snapshot"
            text = f"{key}: {why}; dropped its buffer, asking for a new snapshot"
        else:
            m.bump(m.stall_actions, (key, a.kind))
            log.warning("book stalled: replacing the connection", extra={"symbol": key, "why": why})
            reconnect = getattr(self.feed, "reconnect", None)
            if reconnect is not None:
                reconnect(market, f"stalled: no book of {key} for {a.waited_s:.1f}s")
            text = f"{key}: {why}; a new snapshot did not help, reconnecting"
        if self.alerter is not None:
            self.alerter.raise_(STALL_ALERT, text)

    def _on_recovered(self, key: str) -> None:
        guard = self.guard
        self.m.stall_recoveries[key] = guard.recoveries[key]
        self.stats["stall_recoveries"] = sum(guard.recoveries.values())
        log.info("book back after a stall", extra={"symbol": key})
        if self.alerter is not None and not any(guard.is_stalled(k) for k in self.keys):
            self.alerter.resolve(STALL_ALERT, f"{key}: book synced again")

    def on_snapshot(self, name: str, snap, recv_ns: int, route: Route, now_ns: int, now: float) -> None:
        """One REST depth snapshot of exchange symbol `name` for the books of `route`, received
        at `recv_ns` (see dispatch for the times)."""
        lname = name.lower()
        key = route.keys.get(lname)
        if key is None or route.retired:
            self.stats["ignored"] += 1
            return
        sync = route.syncs[lname]
        route.awaiting.discard(lname)
        if route.live and self.recorder is not None:
            self.recorder.snapshot(recv_ns, name.upper(), snap, route.market)
        try:
            result = sync.on_snapshot(snap)
        except BadEventError as exc:
            self._bad("bad_snapshot", f"{key}: {exc}"[:240], key)
            return self._need_snapshot(route, lname, key, "bad snapshot", now_ns, now)
        if result is SyncResult.SNAPSHOT_APPLIED:
            self._snapshots_applied[key] += 1
            if self._snapshots_applied[key] > 1:
                self.stats["resyncs"] += 1
                self.m.resyncs[key] += 1
        elif result is SyncResult.SNAPSHOT_TOO_OLD:
            log.info("snapshot older than the buffered events, fetching another",
                     extra={"symbol": key, "lastUpdateId": snap.get("lastUpdateId"),
                            "buffered": str(sync.buffered_range())})
        elif result is GAP:
            self._on_gap(route, key, sync)
        if sync.synced:
            if not route.live:
                return self._try_switch(route, now_ns, now)
            E = snap.get("E") if type(snap.get("E")) is int else self.last_E[key]
            self._publish_book(key, sync, E, recv_ns, now_ns, now)
        else:
            self._need_snapshot(route, lname, key, "snapshot too old" if result is SyncResult.SNAPSHOT_TOO_OLD
                                else "waiting for a snapshot", now_ns, now)

    def _on_trade(self, route: Route, key: str, data: dict, kind: str, recv_ns: int, now_ns: int) -> None:
        if not route.live:
            return
        trade_id = data["a"] if kind == "aggTrade" else data["t"]
        p, q, maker, E = data["p"], data["q"], data["m"], data["E"]
        if type(trade_id) is not int or type(maker) is not bool or type(E) is not int \
                or type(p) is not str or type(q) is not str:
            raise TypeError("trade id and E must be ints, p and q decimal strings, m a bool")
        if trade_id <= self.last_trade[key]:
            return  # already published from the connection this one replaced
        price, qty = Decimal(p), Decimal(q)  # exact: money never goes through float
        if not (price.is_finite() and qty.is_finite()) or price <= 0 or qty <= 0:
            raise ValueError(f"trade price/qty must be positive: {p!r} {q!r}")
        self.last_trade[key] = trade_id
        self.m.lag[key].observe(recv_ns * 1e-9 - E * 1e-3)
        self.pub.publish(self.trade_topic[key], Trade(
            ts=now_ns, symbol=key, exch_ts=E, trade_id=trade_id, price=price, qty=qty,
            buyer_is_maker=maker, recv_ts=recv_ns))
        self.stats["trades"] += 1
        self.m.trades[key] += 1

    def _on_ticker(self, route: Route, name: str, data: dict) -> None:
        """Keep a bookTicker until the book reaches its update id (tickers are real-time, the
        depth stream comes in 100 ms batches); _check_ticker then compares best levels."""
        u, sync = data["u"], route.syncs[name]
        if not route.live or type(u) is not int or not sync.synced or u <= sync.book.update_id:
            return
        tickers = route.tickers[name]
        if len(tickers) >= 512:
            tickers.clear()  # ids the book jumped over never match: forget them in bulk
        b, bq, a, aq = data["b"], data["B"], data["a"], data["A"]
        if type(b) is not str or type(bq) is not str or type(a) is not str or type(aq) is not str:
            raise TypeError("bookTicker b/B/a/A must be decimal strings")
        # Kept as text: only the few whose id the book reaches are compared (1,072 of 73,174 in
        # the shipped capture), and parsing all four fields of every ticker was a fifth of a replay.
        tickers[u] = (b, bq, a, aq)

    def _check_ticker(self, key: str, sync: BookSync, tickers: dict) -> None:
        book = sync.book
        raw = tickers.pop(book.update_id, None)
        if raw is None:
            return
        try:
            ticker = ((parse_units(raw[0]), parse_units(raw[1])), (parse_units(raw[2]), parse_units(raw[3])))
        except (BadEventError, ValueError, TypeError, ArithmeticError) as exc:
            return self._bad("bad_fields", f"bookTicker {key} u={book.update_id}: {exc}"[:160], key)
        ok = book.best_bid() == ticker[0] and book.best_ask() == ticker[1]
        self.m.ticker_checks[(key, "match" if ok else "mismatch")] += 1
        if not ok:
            log.warning("book differs from bookTicker", extra={"symbol": key, "update_id": book.update_id,
                                                               "book": f"{book.best_bid()} {book.best_ask()}",
                                                               "ticker": str(ticker)})

    def _odd_message(self, msg, route: Route) -> None:
        """Not a combined-stream message: Binance's control events, or junk."""
        if is_server_shutdown(msg):
            log.warning("binance announced a server shutdown", extra={"route": route.label})
            if self.feed is not None and route.live:
                self.feed.server_shutdown(route)
        elif type(msg) is dict and "result" in msg and "id" in msg:
            pass  # the answer to a (re)subscription request
        else:
            self._bad("not_combined_stream", str(msg)[:100])

    def _unknown_symbol(self, stream: str, data: dict, route: Route, nbytes: int) -> None:
        c = self.m.events[("", "other")]
        c[0] += 1
        c[1] += nbytes
        if is_server_shutdown(data):
            return self._odd_message(data, route)
        if self.live_feed:
            return self._bad("unknown_stream", stream)  # we subscribed to nothing like it
        self.stats["ignored"] += 1
        name = stream.partition("@")[0]
        if name not in self._warned and len(self._warned) < 100:
            self._warned.add(name)
            log.warning("capture symbol not in QF_SYMBOLS, ignored",
                        extra={"stream": stream, "market": route.market.value, "symbols": ",".join(self.keys)})

    def _at(self) -> dict:
        """{"at": "FILE:LINE"} of the record being handled in a replay, else {}."""
        where = self.where() if self.where is not None else ""
        return {"at": where} if where else {}

    def _keep_bad(self, reason: str, detail: str, key: str) -> BadMessage:
        bad = self.last_bad = BadMessage(self.where() if self.where is not None else "", reason, key, detail)
        if len(self.bad_events) < BAD_KEPT:
            self.bad_events.append(bad)
        return bad

    def _bad(self, reason: str, detail: str, key: str = "") -> None:
        self.m.bad(reason)
        self.stats["bad_messages"] += 1
        bad = self._keep_bad(reason, detail, key)
        log.warning("bad feed message", extra={**({"at": bad.where} if bad.where else {}),
                                               "reason": reason, "detail": detail})


class BadMessage(NamedTuple):
    """A message the router could not use: where it was read ("FILE:LINE" in a replay, "" live),
    why (the decode-error reason), the key of the symbol it was about ("" when none) and what
    was wrong with it."""

    where: str
    reason: str
    key: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where + ': ' if self.where else ''}{self.detail}"
