"""BookRouter record by record over real PUB/SUB, no feed and no clock: sync states, bad input,
trades, switches, stalls; and driven by ReplayFeed records of a real capture."""
import itertools
import re
import time
from decimal import Decimal

import pytest

from services.marketdata.book import units_to_str
from services.marketdata.capture import build_book, iter_capture
from services.marketdata.record import Recorder
from services.marketdata.records import Disconnected, Idle, RawFrame, RouteOpened, SnapshotRecord
from services.marketdata.router import BookRouter
from services.marketdata.symbols import Route
from services.marketdata.sync import BookSync, Market
from shared import config as qfconfig
from shared.bus import Publisher, Subscriber
from shared.messages import Heartbeat
from tests.conftest import wait_for

_n = itertools.count()


class Bus:
    """A real inproc PUB/SUB pair; drain() returns everything published so far, in order."""

    def __init__(self) -> None:
        ep = f"inproc://md-test-{next(_n)}"
        self.pub = Publisher(ep, 1_000_000)
        self.sub = Subscriber(ep, [""], 1_000_000)
        self._probe = 0

        def joined():  # the slow-joiner handshake, with a bounded wait
            self.pub.publish("probe", Heartbeat(ts=0, service="probe", pid=0, started_ts=0, status="x"))
            return self.sub.sock.poll(20)
        wait_for(joined, 5, "the SUB socket to join")
        self.drain()

    def drain(self) -> list:
        self._probe += 1
        self.pub.publish("zz.end", Heartbeat(ts=0, service="end", pid=self._probe, started_ts=0, status="x"))
        out = []
        while True:
            assert self.sub.sock.poll(5000), "published messages did not arrive"
            topic, msg = self.sub.recv()
            if topic == "zz.end" and msg.pid == self._probe:
                return out
            if topic not in ("probe", "zz.end"):
                out.append((topic, msg))

    def close(self) -> None:
        self.sub.close()
        self.pub.close()


@pytest.fixture
def bus():
    b = Bus()
    yield b
    b.close()


def make_router(pub, symbols: str = "btcusdt", now_ns: int = 0) -> BookRouter:
    """A BookRouter as MarketDataService configures it, publishing to `pub` (a Bus or anything
    with publish)."""
    md = qfconfig.load({"QF_SYMBOLS": symbols}).md
    r = BookRouter(md.symbols, md.book_depth, now_ns=now_ns)
    r.pub = getattr(pub, "pub", pub)
    return r


def put(router: BookRouter, rec, now: float | None = None) -> None:
    """Dispatch `rec` as a backtest does: at its own recv_ns."""
    router.dispatch(rec, rec.recv_ns, now)


@pytest.fixture
def router(bus):
    return make_router(bus)


@pytest.fixture(scope="module")
def spot(spot_records):
    """(snapshot, depth events after the first, in order) of the real spot capture."""
    snap = next(r["m"] for r in spot_records if r["k"] == "snapshot")
    events = [r["m"]["data"] for r in spot_records if r["k"] == "ws" and "@depth" in r["m"]["stream"]]
    return snap, events


def frame(stream, data):
    import orjson
    return orjson.dumps({"stream": stream, "data": data})


def snapshot_at(events, snap, u):
    """A REST-style snapshot of the true book right after event `u` (built by a separate BookSync)."""
    ref = BookSync("BTCUSDT")
    ref.on_snapshot(snap)
    for ev in events:
        ref.on_depth(ev)
        if ev["u"] == u:
            break
    bids, asks = ref.book.levels()
    return {"lastUpdateId": u,
            "bids": [[units_to_str(p), units_to_str(q)] for p, q in sorted(bids.items(), reverse=True)],
            "asks": [[units_to_str(p), units_to_str(q)] for p, q in sorted(asks.items())]}


def books_and_states(msgs):
    return [(m.TYPE, m.update_id if m.TYPE == "book" else m.state) for _, m in msgs if m.TYPE in ("book", "md_status")]


def test_status_until_synced_then_a_book_per_event_and_none_after_a_gap(router, bus, spot):
    snap, events = spot
    ns = time.time_ns()
    for ev in events[:3]:  # before any snapshot: buffered, status only
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    assert books_and_states(bus.drain()) == [("md_status", "SYNCING")]
    put(router, SnapshotRecord(ns, "BTCUSDT", snap))
    first = bus.drain()
    assert books_and_states(first)[0] == ("md_status", "SYNCED") and first[1][1].TYPE == "book"
    applied = [ev for ev in events[3:40]]
    for ev in applied:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    assert [u for t, u in books_and_states(bus.drain())] == [ev["u"] for ev in applied]
    # event 40 is lost: 41 breaks the chain; nothing is published until a new snapshot
    for ev in events[41:60]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    after_gap = books_and_states(bus.drain())
    assert after_gap == [("md_status", "SYNCING")]
    assert router.stats["gaps"] == 1 and router.m.gaps["BTCUSDT"] == 1
    # a newer snapshot repairs it; the book is then exactly the true one
    put(router, SnapshotRecord(ns, "BTCUSDT", snapshot_at(events, snap, events[55]["u"])))
    repaired = bus.drain()
    assert books_and_states(repaired)[0] == ("md_status", "SYNCED")
    book = repaired[1][1]
    assert book.update_id == events[59]["u"]  # buffered events after the snapshot applied on top
    truth = snapshot_at(events, snap, events[59]["u"])
    assert book.bids == [[float(p), float(q)] for p, q in truth["bids"][:10]]
    assert book.asks == [[float(p), float(q)] for p, q in truth["asks"][:10]]
    assert router.stats["resyncs"] == 1 and router.m.resyncs["BTCUSDT"] == 1


def test_bad_input_is_counted_logged_and_survived(router, bus, spot, caplog):
    snap, events = spot
    ns = time.time_ns()
    put(router, SnapshotRecord(ns, "BTCUSDT", snap))
    for ev in events[:5]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    bus.drain()
    trade = {"e": "aggTrade", "E": 1, "s": "BTCUSDT", "a": 1, "p": "61000.5", "q": "0.1", "m": True}
    junk = [
        RawFrame(ns, b"{not json"),
        RawFrame(ns, b'{"hello": 1}'),
        RawFrame(ns, frame("btcusdt@kline_1m", {})),
        RawFrame(ns, frame("btcusdt@aggTrade", {**trade, "p": 61000.5})),  # a float price: never money
        RawFrame(ns, frame("btcusdt@aggTrade", {**trade, "q": "abc"})),
        RawFrame(ns, frame("btcusdt@aggTrade", {k: v for k, v in trade.items() if k != "m"})),
        RawFrame(ns, 12345),
        SnapshotRecord(ns, "BTCUSDT", {"bids": []}),
        RawFrame(ns, frame("btcusdt@depth@100ms", {**events[5], "U": str(events[5]["U"])})),
    ]
    for rec in junk:
        put(router, rec)
    assert router.m.decode_errors == {"malformed_json": 2, "not_combined_stream": 1, "unknown_stream": 1,
                                   "bad_fields": 3, "bad_snapshot": 1, "bad_event": 1}
    assert router.stats["bad_messages"] == 9
    assert sum("bad feed message" in r.getMessage() for r in caplog.records) == 9
    # the malformed depth event cost the book its sync (its changes are unknown): resync, go on
    assert books_and_states(bus.drain()) == [("md_status", "SYNCING")]
    put(router, RawFrame(ns, frame("btcusdt@depth@100ms", events[6])))
    put(router, SnapshotRecord(ns, "BTCUSDT", snapshot_at(events, snap, events[6]["u"])))
    put(router, RawFrame(ns, frame("btcusdt@depth@100ms", events[7])))
    assert [x for x in books_and_states(bus.drain()) if x[0] == "book"][-1] == ("book", events[7]["u"])


def test_trades_are_exact_decimals_and_published_once(router, bus):
    ns = time.time_ns()
    raw = {"e": "trade", "E": 1723161255343, "s": "BTCUSDT", "t": 3735683259, "p": "61837.63000000",
           "q": "0.02000000", "T": 1723161255342, "m": True, "M": True}
    put(router, RawFrame(ns, frame("btcusdt@trade", raw)))
    put(router, RawFrame(ns, frame("btcusdt@trade", raw)))  # a repeat (after a switch): dropped
    agg = {"e": "aggTrade", "E": 2, "s": "BTCUSDT", "a": 7, "p": "1.00000001", "q": "3", "f": 1, "l": 2,
           "T": 2, "m": False}
    put(router, RawFrame(ns, frame("ethusdt@aggTrade", agg)))  # a symbol we do not follow
    msgs = [m for _, m in bus.drain()]
    assert len(msgs) == 1 and msgs[0].TYPE == "trade"
    t = msgs[0]
    assert (t.symbol, t.trade_id, t.price, t.qty, t.buyer_is_maker, t.exch_ts, t.recv_ts) == (
        "BTCUSDT", 3735683259, Decimal("61837.63000000"), Decimal("0.02"), True, 1723161255343, ns)


def test_a_standby_connection_takes_over_without_a_missing_or_repeated_book(router, bus, spot):
    snap, events = spot
    ns = time.time_ns()
    live = router.live_route[Market.SPOT]
    put(router, SnapshotRecord(ns, "BTCUSDT", snap))
    for ev in events[:30]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), live))
    standby = Route(Market.SPOT, router.keys, gen=2, live=False)
    put(router, RouteOpened(ns, standby))
    # the new connection joins mid-stream, a little behind, and gets its own snapshot
    for ev in events[26:29]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), standby))
    put(router, SnapshotRecord(ns, "BTCUSDT", snapshot_at(events, snap, events[27]["u"]), standby))
    assert router.live_route[Market.SPOT] is live  # behind the live book: not yet
    for ev in events[29:60]:  # both connections carry the market, the new one a step behind
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), live))
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), standby))
    assert router.live_route[Market.SPOT] is standby and live.retired
    for ev in events[60:70]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), live))  # ignored from now on
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), standby))
    books = [u for t, u in books_and_states(bus.drain()) if t == "book"]
    # the snapshot's book, then exactly one book per event: none skipped at the switch, none twice
    assert books == [snap["lastUpdateId"]] + [ev["u"] for ev in events[:70] if ev["u"] > snap["lastUpdateId"]]
    assert "DISCONNECTED" not in [s for t, s in books_and_states(bus.drain()) if t == "md_status"]


def test_usdm_keys_route_by_connection_not_by_stream_name(bus, usdm_records):
    s = make_router(bus, "btcusdt,usdm:btcusdt")
    ns = time.time_ns()
    snap = next(r["m"] for r in usdm_records if r["k"] == "snapshot")
    depth = [r["m"] for r in usdm_records if r["k"] == "ws" and "@depth" in r["m"]["stream"]]
    put(s, SnapshotRecord(ns, "USDM:BTCUSDT", snap))
    usdm = s.live_route[Market.USDM]
    for m in depth[:200]:
        put(s, RawFrame(ns, frame(m["stream"], m["data"]), usdm))
    msgs = bus.drain()
    topics = {t for t, _ in msgs}
    assert topics == {"status.USDM:BTCUSDT", "book.USDM:BTCUSDT"}
    assert all(m.symbol == "USDM:BTCUSDT" for _, m in msgs)
    assert s.state["BTCUSDT"] == "CONNECTING" and s.syncs["USDM:BTCUSDT"].synced


# -- lies and stalls (issue #11) -----------------------------------------------------------

def test_a_book_published_at_a_lied_update_id_does_not_hold_back_the_true_books(router, bus, spot):
    snap, events = spot
    ns = time.time_ns()
    put(router, SnapshotRecord(ns, "BTCUSDT", snap))
    for ev in events[:10]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    lie = {**events[10], "u": events[10]["u"] + 5000}  # a low digit: within MAX_ID_JUMP, taken
    put(router, RawFrame(ns, frame("btcusdt@depth@100ms", lie)))
    for ev in events[11:20]:  # the stream goes on below the lie: the book is discarded
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    put(router, SnapshotRecord(ns, "BTCUSDT", snapshot_at(events, snap, events[15]["u"])))
    for ev in events[20:30]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev)))
    seq = books_and_states(bus.drain())
    cut = seq.index(("md_status", "SYNCING"))
    assert seq[cut - 1] == ("book", lie["u"])  # the lie went out once: nothing could tell yet
    # then the true books at once, though their ids are below the lie's
    assert seq[cut + 1:] == [("md_status", "SYNCED")] + [("book", ev["u"]) for ev in events[19:30]]
    assert router.m.gaps["BTCUSDT"] == 1


class FeedLog:
    """A feed stand-in that writes down what the router asks of it."""

    def __init__(self):
        self.calls = []

    def request_snapshot(self, route, name):
        self.calls.append(("snapshot", name))

    def reconnect(self, market, why):
        self.calls.append(("reconnect", market.value, why))


def test_a_stalled_book_is_resnapshotted_then_reconnected_alerted_and_counted(router, bus, spot):
    from services.marketdata.guard import BookGuard
    from shared.alerts import Alerter
    snap, events = spot
    router.guard, router.feed = BookGuard(router.keys, timeout_s=1.0), FeedLog()
    router.alerter = Alerter("marketdata", bus.pub.publish)
    ns, t0 = time.time_ns(), 1000.0  # wall ns and monotonic s of the start: the router reads no clock

    def at(dt):  # (now_ns, now) dt seconds after the start
        return ns + int(dt * 1e9), t0 + dt

    def depth(dt, ev, route=None):
        router.dispatch(RawFrame(at(dt)[0], frame("btcusdt@depth@100ms", ev), route), *at(dt))

    for ev in events[:3]:
        depth(0, ev)
    router.dispatch(SnapshotRecord(ns, "BTCUSDT", snap), *at(0))
    for ev in events[3:10]:
        depth(0, ev)
    router.check_books(*at(0))
    trade = {"e": "aggTrade", "E": 1, "s": "BTCUSDT", "p": "61000.5", "q": "0.1", "m": True}
    for i, dt in enumerate((0.1, 0.5, 1.0, 1.15, 1.5, 2.0, 2.15)):  # trades, no depth: frames, no book
        router.dispatch(RawFrame(at(dt)[0], frame("btcusdt@aggTrade", {**trade, "a": i + 1})), *at(dt))
        router.check_books(*at(dt))
    assert router.feed.calls[0] == ("snapshot", "BTCUSDT")
    assert router.feed.calls[1][:2] == ("reconnect", "spot") and "stalled" in router.feed.calls[1][2]
    msgs = [m for _, m in bus.drain()]
    status = [m for m in msgs if m.TYPE == "md_status"]
    assert [s.state for s in status] == ["SYNCING", "SYNCED", "SYNCING"]
    assert re.match(r"stalled: no book for 1\.[01]s while its frames keep arriving; buffer dropped", status[-1].detail)
    assert status[-1].ts == at(1.15)[0]  # stamped with the time given, not read from a clock
    # no book since the trades began arriving at 0.1 s
    assert router.status_detail("BTCUSDT", at(2.2)[0]).startswith("no book for 2.1s: ")
    alerts = [m for m in msgs if m.TYPE == "alert"]
    assert [(a.code, a.severity) for a in alerts] == [("BOOK_STALLED", "error")]  # the reminder is held back
    assert router.m.stalls["BTCUSDT"] == 1 and router.stats["stalls"] == 1
    assert router.m.stall_actions == {("BTCUSDT", "resnapshot"): 1, ("BTCUSDT", "reconnect"): 1}
    # the new connection brings a book back: the stall is over, the alert resolved
    router.dispatch(Disconnected(at(2.2)[0], "stalled", router.live_route[Market.SPOT]), *at(2.2))
    route = Route(Market.SPOT, router.keys, gen=5)
    router.dispatch(RouteOpened(at(2.3)[0], route), *at(2.3))
    for ev in events[40:43]:
        depth(2.3, ev, route)
    router.dispatch(SnapshotRecord(at(2.4)[0], "BTCUSDT", snapshot_at(events, snap, events[41]["u"]), route),
                    *at(2.4))
    router.check_books(*at(2.5))
    msgs = [m for _, m in bus.drain()]
    assert [m.update_id for m in msgs if m.TYPE == "book"] == [events[42]["u"]]
    assert [(a.code, a.severity) for a in msgs if a.TYPE == "alert"] == [("BOOK_STALLED", "resolved")]
    assert router.m.stall_recoveries["BTCUSDT"] == 1 and router.m.unsynced_since["BTCUSDT"] == 0
    assert router.m.unsynced_total["BTCUSDT"] == pytest.approx(2.3)  # from 0.1 s to the book at 2.4 s


def test_snapshots_of_a_symbol_that_does_not_sync_wait_for_their_backoff(router, bus, spot):
    from services.marketdata.guard import BookGuard
    snap, events = spot
    router.guard, router.feed = BookGuard(router.keys, timeout_s=10.0), FeedLog()
    ns, t0 = time.time_ns(), 1000.0
    stale = {**snap, "lastUpdateId": events[0]["U"] - 50}  # older than anything buffered
    router.dispatch(RawFrame(ns, frame("btcusdt@depth@100ms", events[0])), ns, t0)
    assert router.feed.calls == [("snapshot", "BTCUSDT")]
    router.dispatch(SnapshotRecord(ns, "BTCUSDT", stale), ns, t0)  # too old: the next one waits its turn
    router.dispatch(RawFrame(ns, frame("btcusdt@depth@100ms", events[1])), ns, t0)
    assert len(router.feed.calls) == 1 and router.m.snapshots_deferred["BTCUSDT"] >= 1
    assert "(backoff)" in router.state_detail["BTCUSDT"]
    router.check_books(ns, t0 + 0.2)  # less than 0.25 s later
    assert len(router.feed.calls) == 1
    router.check_books(ns, t0 + 0.3)
    assert router.feed.calls == [("snapshot", "BTCUSDT")] * 2


# -- driven by a replay, no sockets (what an in-process backtest does) ----------------------

class ListPub:
    """Collects what the router publishes, in order."""

    def __init__(self) -> None:
        self.sent: list = []

    def publish(self, topic, msg) -> None:
        self.sent.append((topic, msg))


def replay_through_router(path, stamp: str = "recorded"):
    """Every record of the capture at `path` through a fresh BookRouter, each at its own
    recv_ns; returns (router, [(topic, message)] published)."""
    from services.marketdata.feeds import ReplayFeed
    pub = ListPub()
    router = make_router(pub)
    for rec in ReplayFeed(str(path), router.keys, speed=0, stamp=stamp).records():
        router.dispatch(rec, rec.recv_ns)
    return router, pub.sent


@pytest.fixture(scope="module")
def recorded_run(spot_path):
    """The spot capture through a BookRouter, stamped with its recorded times."""
    return replay_through_router(spot_path)


def test_a_recorded_replay_gives_books_stamped_with_the_capture_times(recorded_run, spot_path, spot_records):
    from services.marketdata.capture import build_book
    router, sent = recorded_run
    books = [m for t, m in sent if t == "book.BTCUSDT"]
    # as many books as the service publishes from this capture (test_service_run.py): one per
    # applied event, the snapshot's standing in for the one event buffered before it
    assert len(books) == build_book(spot_path, "BTCUSDT")["events"] == router.m.books["BTCUSDT"] == 6493
    assert [b.update_id for b in books] == sorted({b.update_id for b in books})  # in order, none twice
    t_of_u = {r["m"]["data"]["u"]: r["t"] for r in spot_records
              if r["k"] == "ws" and "@depth" in r["m"]["stream"]}
    snap_t = next(r["t"] for r in spot_records if r["k"] == "snapshot")
    assert books[0].ts == books[0].recv_ts == snap_t
    assert all(b.ts == b.recv_ts == t_of_u[b.update_id] for b in books[1:])
    trades = [m for t, m in sent if t == "trade.BTCUSDT"]
    t_of_trade = {r["m"]["data"]["t"]: r["t"] for r in spot_records if r["k"] == "ws" and "@trade" in r["m"]["stream"]}
    assert len(trades) == router.stats["trades"] == 19904
    assert all(t.ts == t.recv_ts == t_of_trade[t.trade_id] for t in trades)
    times = {r["t"] for r in spot_records}
    status = [m for t, m in sent if t == "status.BTCUSDT"]
    assert [s.state for s in status] == ["SYNCING", "SYNCED"] and all(s.ts in times for s in status)
    assert router.stats["bad_messages"] == 0 and router.stats["gaps"] == 0


def test_the_same_capture_gives_the_same_book_bytes_twice(recorded_run, spot_path):
    from shared.messages import encode
    runs = [recorded_run[1], replay_through_router(spot_path)[1]]
    first, second = ([encode(m, seq) for seq, (_, m) in enumerate(sent)] for sent in runs)
    assert len(first) > 6493 + 19904 and first == second
    # stamped with the wall clock, the same books come out, at other times
    wall_books = [m for t, m in replay_through_router(spot_path, stamp="wall")[1] if t == "book.BTCUSDT"]
    books = [m for t, m in runs[0] if t == "book.BTCUSDT"]
    assert [(b.update_id, b.bids, b.asks) for b in wall_books] == [(b.update_id, b.bids, b.asks) for b in books]
    assert wall_books[0].recv_ts > books[-1].recv_ts


def test_every_book_ticker_the_book_reaches_agrees_with_it(recorded_run):
    """tests/data/SOURCES.md: 1,072 bookTickers of the spot capture share a depth event's u, and
    each matches the rebuilt book's best levels (kept as text, parsed only when compared)."""
    router, _ = recorded_run
    checks = router.m.ticker_checks
    assert checks[("BTCUSDT", "match")] == 1072 and checks[("BTCUSDT", "mismatch")] == 0


def test_a_lying_book_ticker_is_counted_and_never_costs_the_book(spot_path, spot_records, tmp_path):
    """A bookTicker with a bad price at an id the book reaches is refused when compared (bad_fields),
    one with a non-text field when it comes; neither makes the book resync."""
    import gzip
    import orjson
    depth_u = {r["m"]["data"]["u"] for r in spot_records if r["k"] == "ws" and "@depth" in r["m"]["stream"]}
    ticker_u = {r["m"]["data"]["u"] for r in spot_records if r["k"] == "ws" and r["m"]["stream"].endswith("@bookTicker")}
    targets = sorted(depth_u & ticker_u)[100:102]
    out, lied = [], 0
    for r in spot_records:
        if r["k"] == "ws" and r["m"]["stream"].endswith("@bookTicker") and r["m"]["data"]["u"] in targets:
            r = {**r, "m": {**r["m"], "data": {**r["m"]["data"], "b": "6e4" if not lied else 61000.5}}}
            lied += 1
        out.append(orjson.dumps(r))
    assert lied == 2
    path = tmp_path / "lying-ticker.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(out) + b"\n")
    router, sent = replay_through_router(path)
    assert router.m.decode_errors.get("bad_fields", 0) == 2
    assert router.stats["gaps"] == 0 and router.stats["resyncs"] == 0
    assert router.m.ticker_checks[("BTCUSDT", "match")] == 1072 - 2
    assert len([m for t, m in sent if t == "book.BTCUSDT"]) == 6493


def test_a_record_that_fails_is_counted_not_raised(router, bus):
    router.dispatch(SnapshotRecord(5, "XX:BTCUSDT", {}), 5)  # not a key: split_key raises
    assert router.m.decode_errors == {"internal_error": 1} and router.stats["bad_messages"] == 1
    router.dispatch(("raw", 5, b"{}"), 5)  # the untyped form of old: not a record
    router.dispatch(Idle(5), 5)  # nothing to do
    assert router.m.decode_errors == {"internal_error": 2} and router.stats["bad_messages"] == 2
    router.dispatch(RawFrame(6, frame("btcusdt@depth@100ms", {"U": 1, "u": 2, "b": [], "a": []})), 6)
    assert books_and_states(bus.drain()) == [("md_status", "SYNCING")]


def test_replay_done_ends_the_time_without_a_book(bus):
    router = make_router(bus, now_ns=1_000_000_000)
    assert router.status_detail("BTCUSDT", 3_500_000_000) == "no book for 2.5s: "
    router.replay_done(4_000_000_000)
    msgs = bus.drain()
    assert [(m.state, m.ts, m.detail) for _, m in msgs] == [("REPLAY_DONE", 4_000_000_000, "capture finished")]
    assert router.m.unsynced_since["BTCUSDT"] == 0 and router.m.unsynced_total["BTCUSDT"] == 3.0


@pytest.mark.parametrize("how", ["switch", "promoted"])
def test_a_recording_goes_on_across_a_new_connection_without_repeating_an_event(bus, spot, tmp_path, how):
    """The recording holds each depth event once, in order, across a change of connection: a
    planned switch (the new one synced and level), or a standby made live, still behind the old
    one, when the old one dropped (its repeats of events already recorded are not written again;
    written, the recording's ids would go back and it would not rebuild)."""
    snap, events = spot
    recorder = Recorder(str(tmp_path / "rec.jsonl"), flush_s=0)
    router = BookRouter(("BTCUSDT",), 10, recorder=recorder)
    router.pub = bus.pub
    ns = time.time_ns()
    live = router.live_route[Market.SPOT]
    router.dispatch(SnapshotRecord(ns, "BTCUSDT", snap, live), ns)
    for ev in events[:40]:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), live))
    standby = Route(Market.SPOT, router.keys, gen=2, live=False)
    put(router, RouteOpened(ns, standby))
    for ev in events[26:29]:  # the new connection joins behind the live one
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), standby))
    put(router, SnapshotRecord(ns, "BTCUSDT", snapshot_at(events, snap, events[27]["u"]), standby))
    if how == "switch":
        for ev in events[40:50]:
            put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), live))
        for ev in events[29:50]:  # catches up: level with the live book at events[49]
            put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), standby))
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", events[50]), live))
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", events[50]), standby))
        assert router.live_route[Market.SPOT] is standby and live.retired
        after = events[51:80]
    else:  # the old connection drops (Disconnected, as the feed says it) and the standby is made live
        live.retired = True
        put(router, Disconnected(ns, "connection lost", live))
        standby.live = True
        put(router, RouteOpened(ns, standby))
        assert router.live_route[Market.SPOT] is standby
        after = events[29:80]  # from where it was: events the old one had, then new ones
    for ev in after:
        put(router, RawFrame(ns, frame("btcusdt@depth@100ms", ev), standby))
    recorder.close()
    path = recorder.segments[0]
    recorded = [r["m"]["data"]["u"] for r in iter_capture(path) if r["k"] == "ws"]
    assert recorded == sorted(set(recorded)), "the recording's update ids go back or repeat"
    assert recorded[-1] == events[79]["u"]
    got = build_book(path, "BTCUSDT", depth=10)
    assert got["update_id"] == events[79]["u"] and got["gaps"] == 0 and got["resyncs"] == 0
