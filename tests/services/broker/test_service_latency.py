"""BrokerService with simulated latency on an injected clock: deferred replies, cancels, trades, storage."""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from decimal import Decimal as D

import pytest
import zmq

from services.broker import desk as desk_module
from services.broker.service import BrokerService
from shared import messages
from shared.bus import Subscriber
from shared.config import load
from shared.errors import ConfigError
from shared.journal import Journal, journal_path
from shared.enums import OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import Ack, Cancel, Fill, Heartbeat, OrderRequest, Trade

ASKS = [[100.5, 0.4], [101.0, 0.5], [102.0, 10.0]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]
T0 = 1_800_000_000_000_000_000
MS = 1_000_000


class FakeClock:
    """The broker's clock, moved only by the test (an int store is atomic across threads)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def order(coid, qty="0.2", side=Side.BUY, kind=OrderKind.MARKET, price=None, tif=TimeInForce.GTC):
    return OrderRequest(ts=1, client_order_id=coid, strategy="test", symbol="BTCUSDT", side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price), tif=tif)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def lcfg(env):
    return load({**env, "QF_BROKER_LATENCY_MS": "50"})


@pytest.fixture
def broker(lcfg, clock, runner, md_pub, make_book, feed):
    svc = runner.start(BrokerService(lcfg, clock=clock))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    return svc


class Raw:
    """A REQ socket whose send and receive the test separates, to act between them."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        self.sock.send(messages.encode(msg))

    def ready(self) -> bool:
        return bool(self.sock.poll(0))

    def recv(self, timeout_ms=5000):
        assert self.sock.poll(timeout_ms), "no reply"
        return messages.decode(self.sock.recv(), messages.REQUESTS)


@pytest.fixture
def raw(lcfg):
    made = []

    def make():
        made.append(Raw(lcfg.bus.broker_rep))
        return made[-1]
    try:
        yield make
    finally:
        for r in made:
            r.sock.close(linger=0)


def land(r: Raw, msg, broker, clock, at_ms: int, wait_until):
    """Send `msg`, wait until the broker holds it in flight, then move the clock to T0 + `at_ms`."""
    r.send(msg)
    wait_until(lambda: broker.desk.model.pending == 1, "the request in flight")
    clock.now = T0 + at_ms * MS
    return r.recv()


def republish(md_pub, msg, seen, wait_until, what):
    def go():
        md_pub.publish(f"{msg.TYPE}.BTCUSDT", msg)
        return seen()
    wait_until(go, what)


def test_the_reply_waits_for_the_latency_and_the_book_at_arrival(broker, clock, raw, md_pub, make_book,
                                                                   wait_until, lcfg, db_rows):
    r = raw()
    r.send(order("late", "0.2"))
    wait_until(lambda: broker.desk.model.pending == 1, "the order in flight")
    moved = make_book(bids=[[101.0, 1.0]], asks=[[101.5, 1.0]], ts=2)
    republish(md_pub, moved, lambda: broker.books["BTCUSDT"].bids[0][0] == 101.0, wait_until, "the new book")
    assert not r.ready()  # 50 ms have not passed on the broker's clock
    clock.now = T0 + 50 * MS
    ack = r.recv()
    assert isinstance(ack, Ack) and ack.status is OrderStatus.FILLED
    [f] = ack.fills
    assert (str(f.price), str(f.decision_mid), str(f.arrival_mid), str(f.slippage_decision), str(f.slippage_arrival)) == (
        "101.5", "100.25", "101.25", "1.25", "0.25")
    row = db_rows(lcfg.common.db, "SELECT arrival_ts, decision_mid, arrival_mid FROM orders")
    assert row == [(T0 + 50 * MS, "100.25", "101.25")]
    assert db_rows(lcfg.common.db, "SELECT slippage_decision, slippage_arrival, queue_wait_ns FROM fills") == [
        ("1.25", "0.25", 0)]


def test_a_repeat_in_flight_waits_for_the_same_answer(broker, clock, raw, wait_until, lcfg, db_rows):
    first, second = raw(), raw()
    first.send(order("twice"))
    wait_until(lambda: broker.desk.model.pending == 1, "the order in flight")
    second.send(order("twice", qty="5", side=Side.SELL))  # same key, other content
    wait_until(lambda: broker.stats["decode_errors"] == 0 and len(broker.desk.order_waiters.get("twice", ())) == 2,
               "the repeat to wait")
    clock.now = T0 + 50 * MS
    assert first.recv() == second.recv()
    assert db_rows(lcfg.common.db, "SELECT COUNT(*) FROM orders") == [(1,)]


def test_cancel_lands_after_the_latency_and_a_fill_can_beat_it(broker, clock, raw, md_pub, wait_until, lcfg):
    r = raw()
    assert land(r, order("rest", "0.5", kind=OrderKind.LIMIT, price="100"), broker, clock, 50,
                wait_until).status is OrderStatus.PENDING
    r.send(Cancel(ts=2, client_order_id="rest"))
    wait_until(lambda: broker.desk.model.pending == 1, "the cancel in flight")
    through = Trade(ts=3, symbol="BTCUSDT", exch_ts=1, trade_id=1, price=D("99.5"), qty=D("0.01"),
                    buyer_is_maker=True)
    republish(md_pub, through, lambda: "rest" not in broker.desk.model.working, wait_until, "the trade-through")
    clock.now = T0 + 100 * MS
    ack = r.recv()
    assert (ack.status, ack.reason, [(str(f.price), str(f.qty), f.liquidity) for f in ack.fills]) == (
        OrderStatus.FILLED, "not open", [("100", "0.5", "MAKER")])


def test_a_cancel_in_time_cancels(broker, clock, raw, wait_until):
    r = raw()
    assert land(r, order("gtc", "0.5", kind=OrderKind.LIMIT, price="99.5"), broker, clock, 50,
                wait_until).status is OrderStatus.PENDING
    r.send(Cancel(ts=2, client_order_id="gtc"))
    wait_until(lambda: broker.desk.model.pending == 1, "the cancel in flight")
    assert not r.ready()
    clock.now = T0 + 100 * MS
    ack = r.recv()
    assert (ack.status, ack.reason) == (OrderStatus.CANCELLED, "CANCELLED_BY_CLIENT")


def test_trades_move_the_queue_and_maker_fills_are_stored_and_published(broker, clock, raw, md_pub, lcfg,
                                                                        wait_until, db_rows):
    sub = Subscriber(lcfg.bus.broker_pub, ["fill.", "heartbeat."], lcfg.bus.hwm)
    try:
        wait_until(lambda: sub.sock.poll(0) and isinstance(sub.recv()[1], Heartbeat), "a broker heartbeat")
        r = raw()
        assert land(r, order("maker", "0.5", kind=OrderKind.LIMIT, price="100"), broker, clock, 50,
                    wait_until).status is OrderStatus.PENDING
        clock.now = T0 + 80 * MS
        hit = Trade(ts=3, symbol="BTCUSDT", exch_ts=1, trade_id=2, price=D("100"), qty=D("0.2"), buyer_is_maker=True)
        md_pub.publish("trade.BTCUSDT", hit)  # 0.3 ahead of us: nothing yet
        hit2 = Trade(ts=4, symbol="BTCUSDT", exch_ts=1, trade_id=3, price=D("100"), qty=D("0.3"),
                     buyer_is_maker=True)
        md_pub.publish("trade.BTCUSDT", hit2)  # 0.1 ahead left: 0.2 of it reaches us
        fill = wait_until(lambda: next_fill(sub), "a maker fill")
        assert (fill.price, fill.qty, fill.liquidity.value, fill.queue_wait_ns, fill.fee) == (
            D("100"), D("0.2"), "MAKER", 30 * MS, D("0.02"))
        assert db_rows(lcfg.common.db, "SELECT liquidity, qty, queue_wait_ns FROM fills") == [("MAKER", "0.2", 30 * MS)]
    finally:
        sub.close()


def next_fill(sub: Subscriber) -> Fill | None:
    while sub.sock.poll(0):
        msg = sub.recv()[1]
        if isinstance(msg, Fill):
            return msg
    return None


def test_equity_is_snapshot_periodically(env, runner, wait_until, db_rows):
    cfg = load({**env, "QF_BROKER_EQUITY_S": "0.1"})
    runner.start(BrokerService(cfg))
    wait_until(lambda: db_rows(cfg.common.db, "SELECT COUNT(*) FROM equity WHERE note = 'periodic'")[0][0] >= 3,
               "three periodic snapshots")
    assert {r for r in db_rows(cfg.common.db, "SELECT equity, cash FROM equity")} == {("10000", "10000")}


def test_a_failed_journal_write_is_answered_store_unavailable_and_the_broker_recovers_by_itself(
        cfg, runner, md_pub, make_book, feed, clients, db_rows, wait_until):
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    journal_fd = svc.journal.fd
    full = os.open("/dev/full", os.O_WRONLY)
    svc.journal.fd = full  # the disk is full: every write fails with ENOSPC
    c = clients(cfg.bus.broker_rep)
    boom = c.request(order("boom", "0.3"))  # nothing durable, nothing told: refused, not left unanswered
    assert isinstance(boom, messages.Error) and boom.code == "STORE_UNAVAILABLE", boom
    assert svc.stats["commit_failures"] == 1 and svc.health.frozen
    refused = c.request(order("next", "0.3"))  # refused at once: nothing of it is kept
    assert isinstance(refused, messages.Error) and refused.code == "STORE_UNAVAILABLE"
    assert svc.stats["commit_failures"] == 1  # it never reached the journal
    svc.journal.fd = journal_fd  # space again
    wait_until(lambda: not svc.health.down, "the broker to find the journal writable again")
    os.close(full)
    ok = clients(cfg.bus.broker_rep).request(order("fine", "0.3"))
    # the model was rebuilt from the database; the books, with what "boom" took, were kept (conservative)
    assert [(str(f.price), str(f.qty)) for f in ok.fills] == [("100.5", "0.1"), ("101", "0.2")]
    assert db_rows(cfg.common.db, "SELECT client_order_id FROM orders") == [("fine",)]
    retry = clients(cfg.bus.broker_rep).request(order("boom", "0.3"))
    assert retry.status is OrderStatus.FILLED
    assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM fills WHERE client_order_id = 'boom'")[0][0] >= 1


def test_a_database_refusing_rows_loses_nothing_told(cfg, runner, md_pub, make_book, feed, clients, db_rows,
                                                     wait_until):
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    con = sqlite3.connect(cfg.common.db)
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON fills WHEN NEW.client_order_id = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    con.commit()
    boom = clients(cfg.bus.broker_rep).request(order("boom", "0.3"))  # durable in the journal: answered
    assert boom.status is OrderStatus.FILLED
    wait_until(lambda: svc.stats["store_failures"] >= 1, "the refused store")
    after = clients(cfg.bus.broker_rep).request(order("after", "0.3"))  # the broker goes on
    assert after.status is OrderStatus.FILLED
    plain = sqlite3.connect(cfg.common.db)
    assert plain.execute("SELECT COUNT(*) FROM fills").fetchone() == (0,)  # nothing half-stored
    plain.close()
    assert len(svc.journal.pending) >= 2
    con.execute("DROP TRIGGER refuse")
    con.commit()
    con.close()
    # the next probe (50 ms later, backing off to 1 s) stores both, in order, once
    rows = db_rows(cfg.common.db, "SELECT client_order_id, price, qty FROM fills ORDER BY ts, fill_id")
    assert rows == [("boom", "100.5", "0.3"), ("after", "100.5", "0.1"), ("after", "101", "0.2")]
    assert db_rows(cfg.common.db, "SELECT client_order_id, status FROM orders ORDER BY created_ts") == [
        ("boom", "FILLED"), ("after", "FILLED")]


def test_an_older_database_gets_the_new_columns(env, runner, wait_until, db_rows):
    path = env["QF_DB"]
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE fills (fill_id TEXT PRIMARY KEY, order_id TEXT, client_order_id TEXT, symbol TEXT,"
                " side TEXT, price TEXT, qty TEXT, fee TEXT, fee_asset TEXT, liquidity TEXT, exch_ts INTEGER,"
                " ts INTEGER, mid_at_fill TEXT)")
    con.execute("INSERT INTO fills VALUES ('f1','o1','c1','BTCUSDT','BUY','100','1','0.1','USDT','TAKER',1,1,NULL)")
    con.commit()
    con.close()
    svc = runner.start(BrokerService(load(env)))
    assert svc.desk.account.positions == {"BTCUSDT": D("1")}
    cols = {r[1] for r in db_rows(path, "PRAGMA table_info(fills)")}
    assert {"decision_mid", "arrival_mid", "slippage_decision", "slippage_arrival", "queue_wait_ns"} <= cols


def test_a_broker_starting_while_risk_recovers_the_journal_waits_for_it(cfg, runner, caplog, wait_until):
    """Risk's start-up recovery holds the journal for a moment; a broker started beside it (qf up
    starts them together) must wait, not exit 2 (which qf up does not restart)."""
    held = Journal(journal_path(cfg.common.db, cfg.common.run_dir))  # as risk's `recover` holds it
    started: list = []
    thread = threading.Thread(target=lambda: started.append(BrokerService(cfg)), daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="qf.journal"):
            thread.start()
            wait_until(lambda: any(r.getMessage() == "journal_busy_waiting" for r in caplog.records),
                       "the broker to find the journal held")
            held.close()
            thread.join(10)
        assert len(started) == 1
    finally:
        held.close()
        thread.join(10)
    runner.start(started[0])


def test_a_second_broker_on_the_same_database_is_refused(cfg, runner):
    runner.start(BrokerService(cfg))
    with pytest.raises(ConfigError, match="one broker per database"):
        BrokerService(cfg)


def test_a_repeat_while_the_database_refuses_rows_is_answered_from_the_journal_never_run_twice(
        cfg, runner, md_pub, make_book, feed, clients, db_rows, monkeypatch, wait_until):
    monkeypatch.setattr(desk_module, "ACK_CACHE_MAX", 1)  # answers fall out of the cache at once
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    con = sqlite3.connect(cfg.common.db)
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON fills BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    con.commit()
    first = clients(cfg.bus.broker_rep).request(order("boom", "0.3"))  # durable in the journal only
    clients(cfg.bus.broker_rep).request(order("other", "0.1"))  # "boom" leaves the answer cache
    wait_until(lambda: svc.health.down, "the refused store")
    again = clients(cfg.bus.broker_rep).request(order("boom", "0.3"))  # the database's row + the journal's
    assert isinstance(again, Ack) and (again.order_id, again.status, again.fills) == (
        first.order_id, OrderStatus.FILLED, first.fills)
    con.execute("DROP TRIGGER refuse")
    con.commit()
    con.close()
    wait_until(lambda: not svc.health.down, "the store to work again")
    retry = clients(cfg.bus.broker_rep).request(order("boom", "0.3"))
    assert (retry.order_id, retry.status, retry.fills) == (first.order_id, OrderStatus.FILLED, first.fills)
    assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM orders WHERE client_order_id = 'boom'") == [(1,)]
    assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM fills WHERE client_order_id = 'boom'") == [(1,)]