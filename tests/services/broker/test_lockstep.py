"""BrokerService in lock-step replay (QF_LOCKSTEP, shared/lockstep.py), over real sockets: the test
is the conductor (a PULL for the reports, a PUB for books, trades and `clock` ticks) and risk (a
DEALER). Time moves only with what the test publishes; every wait is bounded."""
from __future__ import annotations

import itertools
import time
from decimal import Decimal as D

import msgpack
import pytest
import zmq

from services.backtest.engine import Clock as BacktestClock, PaperExchange
from services.backtest.summary import Figures
from services.broker.desk import OrderIds, SeededIds
from services.broker.service import BrokerService
from shared import messages
from shared.bus import Subscriber, recv_frames, send_frames
from shared.config import load
from shared.enums import OrderKind, OrderStatus, Side
from shared.errors import ConfigError
from shared.lockstep import LockstepClock
from shared.messages import Ack, Clock, Error, OrderRequest, Trade

WAIT_S = 5.0
T0 = 1_700_000_000_000_000_000  # in the past: a wall-clock timer would have released every order at once
MS = 1_000_000
SEED = 7
ASKS = [[100.5, 0.4], [101.0, 0.5], [102.0, 10.0]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


@pytest.fixture
def lenv(env, tmp_path):
    return {**env, "QF_LOCKSTEP": f"inproc://lockstep-{tmp_path.name}", "QF_BROKER_LATENCY_MS": "10",
            "QF_BROKER_SEED": str(SEED)}


@pytest.fixture
def cfg(lenv):
    return load(lenv)


class Reports:
    """The conductor's PULL: the broker's latest report, and bounded waits on it."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.latest: dict = {}
        self.count = 0

    def read(self, timeout_ms: int = 0) -> None:
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                rep = msgpack.unpackb(self.sock.recv(zmq.NOBLOCK), raw=False)
            except zmq.Again:
                return
            assert rep["service"] == "broker"
            self.latest, self.count = rep, self.count + 1

    def wait(self, what: str, **want) -> dict:
        """Until the latest report has every `want` field; returns it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            self.read(0)
            if self.latest and all(self.latest.get(k) == v for k, v in want.items()):
                return self.latest
            assert time.monotonic() < deadline, f"no report with {want} ({what}); latest {self.latest}"
            self.read(50)


@pytest.fixture
def reports(cfg):
    r = Reports(cfg.bus.lockstep)
    try:
        yield r
    finally:
        r.sock.close(0)


class Risk:
    """A DEALER, as risk's BrokerLink: `[request id, b"", payload]` out, the same envelope back."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)

    def send(self, msg) -> None:
        self.send_raw(messages.encode(msg))

    def send_raw(self, payload: bytes) -> None:
        send_frames(self.sock, (next(self.ids).to_bytes(8, "big"), b"", payload))

    def ready(self) -> bool:
        return bool(self.sock.poll(0))

    def recv(self):
        assert self.sock.poll(int(WAIT_S * 1000)), "no reply"
        frames = recv_frames(self.sock)
        assert len(frames) == 3 and frames[1] == b""
        return messages.decode(frames[2], messages.REQUESTS)


@pytest.fixture
def risk(cfg):
    r = Risk(cfg.bus.broker_rep)
    try:
        yield r
    finally:
        r.sock.close(0)


@pytest.fixture
def events(cfg):
    """risk's SUB on the broker's PUB (fill.* and order.*), heard connected by a heartbeat."""
    sub = Subscriber(cfg.bus.broker_pub, ["fill.", "order.", "heartbeat."], cfg.bus.hwm)
    got: list = []

    def read():
        while sub.sock.poll(0):
            topic, msg = sub.recv()
            if not topic.startswith("heartbeat."):
                got.append(msg)
        return got
    try:
        yield sub, got, read
    finally:
        sub.close()


@pytest.fixture
def broker(cfg, runner, md_pub, reports, events, wait_until):
    """The broker in lock-step, after the handshake (its SUB hears the `clock` topic) and once
    risk's SUB hears its PUB."""
    svc = runner.start(BrokerService(cfg))

    def hello():
        md_pub.publish("clock", Clock(ts=0))
        reports.read(20)
        return reports.latest.get("hello")
    wait_until(hello, "the broker's hello")
    sub = events[0]
    wait_until(lambda: sub.sock.poll(20), "a heartbeat on the broker's PUB")
    yield svc
    runner.stop(svc)  # before the conductor's PULL closes


def book(make_book, ts, bids=BIDS, asks=ASKS):
    return make_book(bids=bids, asks=asks, ts=ts)


def order(coid, ts, qty="0.2", side=Side.BUY):
    return OrderRequest(ts=ts, client_order_id=coid, strategy="test", symbol="BTCUSDT", side=side,
                        kind=OrderKind.MARKET, qty=D(qty), price=None)


def test_the_order_is_answered_at_the_clock_tick_of_its_due_with_fills_stamped_then(
        broker, reports, risk, md_pub, make_book, events, db_rows, cfg, wait_until):
    _sub, got, read = events
    hello = reports.wait("the handshake", hello=True)
    assert (hello["md"], hello["requests_in"], hello["replies_out"], hello["events_out"], hello["next_due"]) == \
        (0, 0, 0, 0, -1)  # the handshake tick is not market data
    md_pub.publish("book.BTCUSDT", book(make_book, T0))
    md_pub.publish("trade.BTCUSDT", Trade(ts=T0 + MS, symbol="BTCUSDT", exch_ts=1_700_000_000_001, price=D("99.0"),
                                          qty=D("0.1"), buyer_is_maker=True, trade_id=1, recv_ts=T0 + MS))
    reports.wait("the book and the trade", md=2)
    assert broker.clock() == T0 + MS
    risk.send(order("held", T0 + MS))
    due = T0 + 11 * MS  # constant 10 ms after the order, on the capture's clock
    rep = reports.wait("the order held", requests_in=1, next_due=due)
    assert (rep["replies_out"], rep["events_out"]) == (0, 0)
    md_pub.publish("clock", Clock(ts=due - MS))  # a tick before the due releases nothing
    reports.wait("the early tick", md=3)
    assert not risk.ready() and broker.desk.model.pending == 1
    md_pub.publish("clock", Clock(ts=due))
    ack = risk.recv()
    assert isinstance(ack, Ack) and ack.status is OrderStatus.FILLED
    assert ack.order_id == SeededIds(SEED).next()
    assert [(f.ts, str(f.price), str(f.qty)) for f in ack.fills] == [(due, "100.5", "0.2")]
    rep = reports.wait("the answer and its events", replies_out=1, events_out=2, next_due=-1)
    assert (rep["md"], rep["requests_in"]) == (4, 1)
    wait_until(lambda: len(read()) >= 2, "the events on the broker's PUB")
    assert [m.TYPE for m in got] == ["fill", "order"]  # what events_out counted reached risk's SUB
    rows = db_rows(cfg.common.db, "SELECT fill_id, order_id, ts, price FROM fills")
    assert rows == [(f"{ack.order_id}-1", ack.order_id, due, "100.5")]


def test_an_order_ahead_of_the_last_book_waits_for_that_book_and_meets_it(
        broker, reports, risk, md_pub, make_book, wait_until):
    md_pub.publish("book.BTCUSDT", book(make_book, T0))
    reports.wait("the first book", md=1)
    t1 = T0 + 3 * MS
    risk.send(order("ahead", t1))  # made on a book the broker has not read yet
    wait_until(lambda: broker.counters["requests_in"] == 1, "the broker to read the order")
    reports.read(0)
    assert reports.latest["requests_in"] == 0  # read, not reported: the conductor still waits
    assert broker.desk.model.pending == 0  # not submitted before the broker's clock reached it
    moved = book(make_book, t1, bids=[[101.0, 1.0]], asks=[[101.5, 1.0]])
    md_pub.publish("book.BTCUSDT", moved)
    due = t1 + 10 * MS
    reports.wait("the book, then the order", md=2, requests_in=1, next_due=due)
    working = broker.desk.model.working["ahead"]
    assert (working.order.created_ts, working.decision_mid) == (t1, D("101.25"))
    md_pub.publish("clock", Clock(ts=due))
    ack = risk.recv()
    assert [(f.ts, str(f.price), str(f.decision_mid)) for f in ack.fills] == [(due, "101.5", "101.25")]
    reports.wait("answered", replies_out=1, events_out=2, md=3, next_due=-1)


def test_requests_keep_their_order_and_ids_follow_the_seed(broker, reports, risk, md_pub, make_book):
    md_pub.publish("book.BTCUSDT", book(make_book, T0))
    reports.wait("the book", md=1)
    t1 = T0 + 2 * MS
    risk.send(order("first", t1))  # waits for the book at t1
    risk.send(order("second", T0))  # behind the clock: it still comes after the first
    md_pub.publish("book.BTCUSDT", book(make_book, t1))
    reports.wait("both held", md=2, requests_in=2, next_due=t1 + 10 * MS)
    md_pub.publish("clock", Clock(ts=t1 + 10 * MS))
    first, second = risk.recv(), risk.recv()
    ids = SeededIds(SEED)
    assert [(a.client_order_id, a.order_id) for a in (first, second)] == \
        [("first", ids.next()), ("second", ids.next())]
    assert [f.ts for f in first.fills + second.fills] == [t1 + 10 * MS] * 2


def test_every_request_and_reply_is_counted_bad_ones_too(broker, reports, risk, md_pub, make_book):
    md_pub.publish("book.BTCUSDT", book(make_book, T0))  # the clock at T0: requests stamped 1 are behind it
    reports.wait("the book", md=1)
    risk.send_raw(b"\xc1garbage")
    assert isinstance(risk.recv(), Error)
    risk.send(messages.Control(ts=1, action="HALT", by="t"))
    assert isinstance(risk.recv(), Error)
    risk.send(messages.Cancel(ts=1, client_order_id="nobody"))
    assert isinstance(risk.recv(), Error)
    rep = reports.wait("three answered", requests_in=3, replies_out=3)
    assert (rep["events_out"], rep["md"], rep["next_due"]) == (0, 1, -1)


def test_the_fills_are_the_backtest_exchanges(broker, reports, risk, md_pub, make_book, cfg):
    """The same books and the same order give PaperExchange (`qf backtest`'s broker) the same fill."""
    books = [book(make_book, T0), book(make_book, T0 + 4 * MS, bids=[[100.2, 1.0]], asks=[[100.7, 0.1], [101.0, 5.0]])]
    t_order, due = T0 + 4 * MS, T0 + 14 * MS
    for b in books:
        md_pub.publish("book.BTCUSDT", b)
    reports.wait("the books", md=2)
    risk.send(order("same", t_order, qty="0.3"))
    reports.wait("held", requests_in=1, next_due=due)
    md_pub.publish("clock", Clock(ts=due))
    live = risk.recv()

    clock = BacktestClock()
    exchange = PaperExchange(cfg, tuple(cfg.md.symbols), cfg.broker.seed, clock, lambda statements: None,
                             Figures(cfg.broker.start_cash))
    for b in books:
        clock.now = b.ts
        exchange.on_book(b, b.ts)
    answers = []
    exchange.send(messages.encode(order("same", t_order, qty="0.3")), answers.append)
    assert exchange.due == due
    clock.now = due
    exchange.advance(due)
    [raw] = answers
    replayed = messages.decode(raw, messages.REQUESTS)
    assert messages.encode(live) == messages.encode(replayed)


def test_a_normal_run_neither_reports_nor_seeds_and_a_foreign_clock_is_refused(env, lenv):
    normal = BrokerService(load(env))
    try:
        assert normal.reporter is None and normal.lockstep is None
        assert isinstance(normal.desk._order_ids, OrderIds)
    finally:
        normal.close()
    with pytest.raises(ConfigError, match="LockstepClock"):
        BrokerService(load(lenv), clock=lambda: 1)
    given = LockstepClock()
    svc = BrokerService(load(lenv), clock=given)
    try:
        assert svc.clock is given and svc.lockstep is given and isinstance(svc.desk._order_ids, SeededIds)
    finally:
        svc.close()


def test_a_lockstep_broker_refuses_a_database_that_already_holds_orders(env, lenv):
    """Seeded order ids start over in every lock-step run: on a database with orders they would
    collide with the stored ones (and repeats would be answered from it), so the broker refuses."""
    from shared import journal
    from shared.db import ORDER_INSERT, close_db, init_db
    init_db(load(env).common.db)
    journal.write([(ORDER_INSERT, ("o1", "c1", "s", "BTCUSDT", "BUY", "MARKET", "GTC", "0.001", None, "FILLED",
                                   "0.001", "100", "", 1, 1, 1, None, None))])
    close_db()
    with pytest.raises(ConfigError, match="needs a database of its own"):
        BrokerService(load(lenv))
