"""The marketdata shell record by record over real PUB/SUB: sync states, bad input, trades, switches."""
import itertools
import re
import time
from decimal import Decimal

import pytest

from services.marketdata.book import units_to_str
from services.marketdata.service import MarketDataService
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


@pytest.fixture
def svc(bus, tmp_path):
    s = MarketDataService(qfconfig.load({"QF_RUN_DIR": str(tmp_path), "QF_SYMBOLS": "btcusdt"}))
    s.pub = bus.pub
    return s


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


def test_status_until_synced_then_a_book_per_event_and_none_after_a_gap(svc, bus, spot):
    snap, events = spot
    ns = time.time_ns()
    for ev in events[:3]:  # before any snapshot: buffered, status only
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    assert books_and_states(bus.drain()) == [("md_status", "SYNCING")]
    svc._dispatch(("snapshot", ns, "BTCUSDT", snap))
    first = bus.drain()
    assert books_and_states(first)[0] == ("md_status", "SYNCED") and first[1][1].TYPE == "book"
    applied = [ev for ev in events[3:40]]
    for ev in applied:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    assert [u for t, u in books_and_states(bus.drain())] == [ev["u"] for ev in applied]
    # event 40 is lost: 41 breaks the chain; nothing is published until a new snapshot
    for ev in events[41:60]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    after_gap = books_and_states(bus.drain())
    assert after_gap == [("md_status", "SYNCING")]
    assert svc.stats["gaps"] == 1 and svc.m.gaps["BTCUSDT"] == 1
    # a newer snapshot repairs it; the book is then exactly the true one
    svc._dispatch(("snapshot", ns, "BTCUSDT", snapshot_at(events, snap, events[55]["u"])))
    repaired = bus.drain()
    assert books_and_states(repaired)[0] == ("md_status", "SYNCED")
    book = repaired[1][1]
    assert book.update_id == events[59]["u"]  # buffered events after the snapshot applied on top
    truth = snapshot_at(events, snap, events[59]["u"])
    assert book.bids == [[float(p), float(q)] for p, q in truth["bids"][:10]]
    assert book.asks == [[float(p), float(q)] for p, q in truth["asks"][:10]]
    assert svc.stats["resyncs"] == 1 and svc.m.resyncs["BTCUSDT"] == 1


def test_bad_input_is_counted_logged_and_survived(svc, bus, spot, caplog):
    snap, events = spot
    ns = time.time_ns()
    svc._dispatch(("snapshot", ns, "BTCUSDT", snap))
    for ev in events[:5]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    bus.drain()
    trade = {"e": "aggTrade", "E": 1, "s": "BTCUSDT", "a": 1, "p": "61000.5", "q": "0.1", "m": True}
    junk = [
        ("raw", ns, b"{not json"),
        ("raw", ns, b'{"hello": 1}'),
        ("raw", ns, frame("btcusdt@kline_1m", {})),
        ("raw", ns, frame("btcusdt@aggTrade", {**trade, "p": 61000.5})),  # a float price: never money
        ("raw", ns, frame("btcusdt@aggTrade", {**trade, "q": "abc"})),
        ("raw", ns, frame("btcusdt@aggTrade", {k: v for k, v in trade.items() if k != "m"})),
        ("raw", ns, 12345),
        ("snapshot", ns, "BTCUSDT", {"bids": []}),
        ("raw", ns, frame("btcusdt@depth@100ms", {**events[5], "U": str(events[5]["U"])})),
    ]
    for rec in junk:
        svc._dispatch(rec)
    assert svc.m.decode_errors == {"malformed_json": 2, "not_combined_stream": 1, "unknown_stream": 1,
                                   "bad_fields": 3, "bad_snapshot": 1, "bad_event": 1}
    assert svc.stats["bad_messages"] == 9
    assert sum("bad feed message" in r.getMessage() for r in caplog.records) == 9
    # the malformed depth event cost the book its sync (its changes are unknown): resync, go on
    assert books_and_states(bus.drain()) == [("md_status", "SYNCING")]
    svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", events[6])))
    svc._dispatch(("snapshot", ns, "BTCUSDT", snapshot_at(events, snap, events[6]["u"])))
    svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", events[7])))
    assert [x for x in books_and_states(bus.drain()) if x[0] == "book"][-1] == ("book", events[7]["u"])


def test_trades_are_exact_decimals_and_published_once(svc, bus):
    ns = time.time_ns()
    raw = {"e": "trade", "E": 1723161255343, "s": "BTCUSDT", "t": 3735683259, "p": "61837.63000000",
           "q": "0.02000000", "T": 1723161255342, "m": True, "M": True}
    svc._dispatch(("raw", ns, frame("btcusdt@trade", raw)))
    svc._dispatch(("raw", ns, frame("btcusdt@trade", raw)))  # a repeat (after a switch): dropped
    agg = {"e": "aggTrade", "E": 2, "s": "BTCUSDT", "a": 7, "p": "1.00000001", "q": "3", "f": 1, "l": 2,
           "T": 2, "m": False}
    svc._dispatch(("raw", ns, frame("ethusdt@aggTrade", agg)))  # a symbol we do not follow
    msgs = [m for _, m in bus.drain()]
    assert len(msgs) == 1 and msgs[0].TYPE == "trade"
    t = msgs[0]
    assert (t.symbol, t.trade_id, t.price, t.qty, t.buyer_is_maker, t.exch_ts, t.recv_ts) == (
        "BTCUSDT", 3735683259, Decimal("61837.63000000"), Decimal("0.02"), True, 1723161255343, ns)


def test_a_standby_connection_takes_over_without_a_missing_or_repeated_book(svc, bus, spot):
    snap, events = spot
    ns = time.time_ns()
    live = svc.live_route[Market.SPOT]
    svc._dispatch(("snapshot", ns, "BTCUSDT", snap))
    for ev in events[:30]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), live))
    standby = Route(Market.SPOT, svc.keys, gen=2, live=False)
    svc._dispatch(("route", ns, standby))
    # the new connection joins mid-stream, a little behind, and gets its own snapshot
    for ev in events[26:29]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), standby))
    svc._dispatch(("snapshot", ns, "BTCUSDT", snapshot_at(events, snap, events[27]["u"]), standby))
    assert svc.live_route[Market.SPOT] is live  # behind the live book: not yet
    for ev in events[29:60]:  # both connections carry the market, the new one a step behind
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), live))
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), standby))
    assert svc.live_route[Market.SPOT] is standby and live.retired
    for ev in events[60:70]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), live))  # ignored from now on
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), standby))
    books = [u for t, u in books_and_states(bus.drain()) if t == "book"]
    # the snapshot's book, then exactly one book per event: none skipped at the switch, none twice
    assert books == [snap["lastUpdateId"]] + [ev["u"] for ev in events[:70] if ev["u"] > snap["lastUpdateId"]]
    assert "DISCONNECTED" not in [s for t, s in books_and_states(bus.drain()) if t == "md_status"]


def test_usdm_keys_route_by_connection_not_by_stream_name(bus, tmp_path, usdm_records):
    s = MarketDataService(qfconfig.load({"QF_RUN_DIR": str(tmp_path), "QF_SYMBOLS": "btcusdt,usdm:btcusdt"}))
    s.pub = bus.pub
    ns = time.time_ns()
    snap = next(r["m"] for r in usdm_records if r["k"] == "snapshot")
    depth = [r["m"] for r in usdm_records if r["k"] == "ws" and "@depth" in r["m"]["stream"]]
    s._dispatch(("snapshot", ns, "USDM:BTCUSDT", snap))
    usdm = s.live_route[Market.USDM]
    for m in depth[:200]:
        s._dispatch(("raw", ns, frame(m["stream"], m["data"]), usdm))
    msgs = bus.drain()
    topics = {t for t, _ in msgs}
    assert topics == {"status.USDM:BTCUSDT", "book.USDM:BTCUSDT"}
    assert all(m.symbol == "USDM:BTCUSDT" for _, m in msgs)
    assert s.state["BTCUSDT"] == "CONNECTING" and s.syncs["USDM:BTCUSDT"].synced


# -- lies and stalls (issue #11) -----------------------------------------------------------

def test_a_book_published_at_a_lied_update_id_does_not_hold_back_the_true_books(svc, bus, spot):
    snap, events = spot
    ns = time.time_ns()
    svc._dispatch(("snapshot", ns, "BTCUSDT", snap))
    for ev in events[:10]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    lie = {**events[10], "u": events[10]["u"] + 5000}  # a low digit: within MAX_ID_JUMP, taken
    svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", lie)))
    for ev in events[11:20]:  # the stream goes on below the lie: the book is discarded
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    svc._dispatch(("snapshot", ns, "BTCUSDT", snapshot_at(events, snap, events[15]["u"])))
    for ev in events[20:30]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    seq = books_and_states(bus.drain())
    cut = seq.index(("md_status", "SYNCING"))
    assert seq[cut - 1] == ("book", lie["u"])  # the lie went out once: nothing could tell yet
    # then the true books at once, though their ids are below the lie's
    assert seq[cut + 1:] == [("md_status", "SYNCED")] + [("book", ev["u"]) for ev in events[19:30]]
    assert svc.m.gaps["BTCUSDT"] == 1


class FeedLog:
    """A feed stand-in that writes down what the router asks of it."""

    def __init__(self):
        self.calls = []

    def request_snapshot(self, route, name):
        self.calls.append(("snapshot", name))

    def reconnect(self, market, why):
        self.calls.append(("reconnect", market.value, why))


def test_a_stalled_book_is_resnapshotted_then_reconnected_alerted_and_counted(svc, bus, spot):
    from services.marketdata.guard import BookGuard
    from shared.alerts import Alerter
    snap, events = spot
    svc.guard, svc.feed = BookGuard(svc.keys, timeout_s=1.0), FeedLog()
    svc.alerter = Alerter("marketdata", bus.pub.publish)
    ns, t0 = time.time_ns(), time.monotonic()
    for ev in events[:3]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    svc._dispatch(("snapshot", ns, "BTCUSDT", snap))
    for ev in events[3:10]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev)))
    svc.check_books(t0)
    trade = {"e": "aggTrade", "E": 1, "s": "BTCUSDT", "p": "61000.5", "q": "0.1", "m": True}
    for i, dt in enumerate((0.1, 0.5, 1.0, 1.15, 1.5, 2.0, 2.15)):  # trades, no depth: frames, no book
        svc._dispatch(("raw", ns, frame("btcusdt@aggTrade", {**trade, "a": i + 1})))
        svc.check_books(t0 + dt)
    assert svc.feed.calls[0] == ("snapshot", "BTCUSDT")
    assert svc.feed.calls[1][:2] == ("reconnect", "spot") and "stalled" in svc.feed.calls[1][2]
    msgs = [m for _, m in bus.drain()]
    status = [m for m in msgs if m.TYPE == "md_status"]
    assert [s.state for s in status] == ["SYNCING", "SYNCED", "SYNCING"]
    assert re.match(r"stalled: no book for 1\.[01]s while its frames keep arriving; buffer dropped", status[-1].detail)
    assert svc.status_detail("BTCUSDT").startswith("no book for ")
    alerts = [m for m in msgs if m.TYPE == "alert"]
    assert [(a.code, a.severity) for a in alerts] == [("BOOK_STALLED", "error")]  # the reminder is held back
    assert svc.m.stalls["BTCUSDT"] == 1 and svc.stats["stalls"] == 1
    assert svc.m.stall_actions == {("BTCUSDT", "resnapshot"): 1, ("BTCUSDT", "reconnect"): 1}
    # the new connection brings a book back: the stall is over, the alert resolved
    svc._dispatch(("disconnected", ns, "stalled", svc.live_route[Market.SPOT]))
    route = Route(Market.SPOT, svc.keys, gen=5)
    svc._dispatch(("route", ns, route))
    for ev in events[40:43]:
        svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", ev), route))
    svc._dispatch(("snapshot", ns, "BTCUSDT", snapshot_at(events, snap, events[41]["u"]), route))
    svc.check_books(t0 + 2.5)
    msgs = [m for _, m in bus.drain()]
    assert [m.update_id for m in msgs if m.TYPE == "book"] == [events[42]["u"]]
    assert [(a.code, a.severity) for a in msgs if a.TYPE == "alert"] == [("BOOK_STALLED", "resolved")]
    assert svc.m.stall_recoveries["BTCUSDT"] == 1 and svc.m.unsynced_since["BTCUSDT"] == 0
    assert svc.m.unsynced_total["BTCUSDT"] > 0


def test_snapshots_of_a_symbol_that_does_not_sync_wait_for_their_backoff(svc, bus, spot):
    from services.marketdata.guard import BookGuard
    snap, events = spot
    svc.guard, svc.feed = BookGuard(svc.keys, timeout_s=10.0), FeedLog()
    ns = time.time_ns()
    stale = {**snap, "lastUpdateId": events[0]["U"] - 50}  # older than anything buffered
    svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", events[0])))
    assert svc.feed.calls == [("snapshot", "BTCUSDT")]
    svc._dispatch(("snapshot", ns, "BTCUSDT", stale))  # too old: the next one waits its turn
    svc._dispatch(("raw", ns, frame("btcusdt@depth@100ms", events[1])))
    assert len(svc.feed.calls) == 1 and svc.m.snapshots_deferred["BTCUSDT"] >= 1
    assert "(backoff)" in svc.state_detail["BTCUSDT"]
    svc.check_books(time.monotonic())  # (less than 0.25 s later)
    assert len(svc.feed.calls) == 1
    svc.check_books(time.monotonic() + 0.3)
    assert svc.feed.calls == [("snapshot", "BTCUSDT")] * 2
