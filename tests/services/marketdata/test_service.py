"""The marketdata shell record by record over real PUB/SUB: sync states, bad input, trades, switches."""
import itertools
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
