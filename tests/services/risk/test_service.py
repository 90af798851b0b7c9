"""RiskService over real ZeroMQ sockets and a real SQLite file, alone and in front of a real broker."""
from __future__ import annotations

import os
import time
from decimal import Decimal as D

import msgpack
import pytest
import zmq

from services.broker.service import BrokerService
from services.risk.service import RiskService
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.enums import ControlAction, OrderKind, OrderStatus, Side, TradingState, Verdict
from shared.messages import Control, ControlReply, Decision, Error, Fill, OrderRequest, RiskState

ASKS = [[100.5, 0.004], [101.0, 0.5]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


def order(coid: str, qty: str = "0.005", side=Side.BUY, symbol="BTCUSDT", **kw) -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="test", symbol=symbol, side=side,
                        kind=kw.pop("kind", OrderKind.MARKET), qty=D(qty), **kw)


class Clock:
    """A settable clock shared with the service thread (reads of an int are atomic)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def risk_env(env):
    return {**env, "QF_RISK_BROKER_TIMEOUT_MS": "200", "QF_RISK_MAX_POSITION": "0.01",
            "QF_RISK_STALE_BOOK_MS": "1000"}


@pytest.fixture
def rcfg(risk_env):
    return load(risk_env)


@pytest.fixture
def md(rcfg):
    pub = Publisher(rcfg.bus.md_pub, rcfg.bus.hwm)
    try:
        yield pub
    finally:
        pub.close()


@pytest.fixture
def risk(rcfg, runner, md, make_book, feed):
    """A running risk service (no broker listening) that has a fresh BTCUSDT book."""
    svc = runner.start(RiskService(rcfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.engine.book_ns)
    return svc


@pytest.fixture
def client(rcfg, clients):
    return clients(rcfg.bus.risk_rep)


def count(db_rows, cfg, table: str, where: str = "1") -> int:
    return db_rows(cfg.common.db, f"SELECT COUNT(*) FROM {table} WHERE {where}")[0][0]


def test_rejects_unknown_symbol_stale_book_max_position_and_halted(risk, client, rcfg, db_rows, wait_until):
    cases = [(order("u", symbol="DOGEUSDT"), "UNKNOWN_SYMBOL"), (order("s", symbol="ETHUSDT"), "STALE_BOOK"),
             (order("m", "0.011"), "MAX_POSITION"), (order("q", "0"), "NON_POSITIVE_QTY")]
    for req, code in cases:
        decision = client.request(req)
        assert isinstance(decision, Decision) and decision.verdict is Verdict.REJECTED, decision
        assert decision.reason["code"] == code and decision.qty == 0 and decision.order is None
    reply = client.request(Control(ts=1, action=ControlAction.HALT, by="test", reason="drill"))
    assert isinstance(reply, ControlReply) and reply.state is TradingState.HALTED and reply.reason == "drill"
    assert client.request(order("h")).reason["code"] == "HALTED"
    wait_until(lambda: count(db_rows, rcfg, "risk_events", "kind = 'DENIED'") == 5, "denials stored")
    assert db_rows(rcfg.common.db, "SELECT code, state FROM risk_events WHERE kind = 'STATE'") == [("HALT", "HALTED")]
    codes = {r[0] for r in db_rows(rcfg.common.db, "SELECT code FROM risk_events WHERE kind = 'DENIED'")}
    assert codes == {"UNKNOWN_SYMBOL", "STALE_BOOK", "MAX_POSITION", "NON_POSITIVE_QTY", "HALTED"}
    # a retried client_order_id gets the same answer, not a second evaluation
    assert client.request(order("u", symbol="DOGEUSDT")) == client.request(order("u", symbol="DOGEUSDT"))


def test_book_goes_stale_on_the_service_clock(rcfg, runner, md, make_book, feed, clients):
    clock = Clock()
    svc = runner.start(RiskService(rcfg, clock=clock))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.engine.book_ns)
    # one publisher's messages arrive in order: once this marker is seen, no BTCUSDT book is still queued
    feed(md, make_book("ETHUSDT", bids=BIDS, asks=ASKS), lambda: "ETHUSDT" in svc.engine.book_ns)
    clock.now += 1001 * 1_000_000
    assert clients(rcfg.bus.risk_rep).request(order("late")).reason["code"] == "STALE_BOOK"


def test_broker_silence_is_a_bounded_rejection(risk, client, rcfg, db_rows):
    timeout = rcfg.risk.broker_timeout_ms / 1000
    for attempt in range(2):  # not remembered: a retry asks the broker again
        started = time.monotonic()
        decision = client.request(order("nb"))
        elapsed = time.monotonic() - started
        assert decision.verdict is Verdict.REJECTED and decision.reason["code"] == "BROKER_UNAVAILABLE"
        assert timeout * 0.9 <= elapsed < timeout * 3, elapsed
    assert count(db_rows, rcfg, "fills") == 0 and count(db_rows, rcfg, "orders") == 0
    assert risk.engine.position("BTCUSDT").qty == 0


def test_garbage_frames_get_errors_or_are_counted_and_risk_still_answers(risk, client, rcfg, wait_until):
    junk = [os.urandom(64), b"", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "type": "order"}),
            msgpack.packb({"v": 1, "type": "nope", "ts": 1}),
            msgpack.packb({"v": 1, "type": "order", "ts": 1, "client_order_id": "x"}),
            msgpack.packb({"v": 1, "type": "order", "ts": 1, "client_order_id": "x", "strategy": "s",
                           "symbol": "BTCUSDT", "side": "BUY", "kind": "MARKET", "qty": 0.5}),
            msgpack.packb({"v": 1, "type": "order", "ts": "soon", "client_order_id": 5, "strategy": "s",
                           "symbol": "BTCUSDT", "side": "LONG", "kind": "MARKET", "qty": "1"}),
            messages.encode(messages.Ack(ts=1, client_order_id="a", order_id="o", status=OrderStatus.FILLED,
                                         filled_qty=D(1)))]
    for payload in junk:
        reply = messages.decode(client.raw(payload), messages.REQUESTS)
        assert isinstance(reply, Error) and reply.code, payload
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(rcfg.bus.risk_rep)
    try:
        dealer.send_multipart([b"not", b"a", b"req envelope"])
        wait_until(lambda: risk.stats["decode_errors"] == len(junk) + 1, "every bad frame counted")
    finally:
        dealer.close()
    assert client.request(order("fine", symbol="DOGEUSDT")).reason["code"] == "UNKNOWN_SYMBOL"


def test_fills_from_the_bus_apply_once(rcfg, runner, clients, wait_until):
    pub = Publisher(rcfg.bus.broker_pub, rcfg.bus.hwm)
    try:
        svc = runner.start(RiskService(rcfg))
        fill = Fill(ts=1, fill_id="bus-1", order_id="o", client_order_id="c", symbol="BTCUSDT", side=Side.SELL,
                    price=D("100"), qty=D("0.003"), fee=D("0.0003"), fee_asset="USDT", liquidity="TAKER",
                    exch_ts=1)

        def sent_and_seen():  # republish until the subscription is live; duplicates must not count
            pub.publish("fill.BTCUSDT", fill)
            return svc.engine.position("BTCUSDT").qty

        wait_until(sent_and_seen, "the fill to arrive")
        for _ in range(5):
            pub.publish("fill.BTCUSDT", fill)
        reply = clients(rcfg.bus.risk_rep).request(Control(ts=1, action=ControlAction.STATE, by="t"))
        assert reply.positions == {"BTCUSDT": "-0.003"} and reply.equity == D("10000") - D("0.0003")
    finally:
        pub.close()


@pytest.fixture
def stack(rcfg, runner, md, make_book, feed):
    """Broker and risk, both running and both holding the hand-made book."""
    broker = runner.start(BrokerService(rcfg))
    risk = runner.start(RiskService(rcfg))
    feed(md, make_book(bids=BIDS, asks=ASKS),
         lambda: "BTCUSDT" in broker.books and "BTCUSDT" in risk.engine.book_ns)
    return broker, risk


def test_risk_and_broker_approve_and_fill(stack, client, rcfg, db_rows, wait_until):
    broker, risk = stack
    sub = Subscriber(rcfg.bus.risk_pub, ["risk.state"], rcfg.bus.hwm)
    try:
        decision = client.request(order("t1", "0.006"))
        assert decision.verdict is Verdict.APPROVED and decision.qty == D("0.006") and decision.reason is None
        ack = decision.order
        assert ack["status"] == "FILLED" and ack["avg_price"] == "100.66666667"  # 0.604 / 0.006, half-even
        assert [(f["price"], f["qty"]) for f in ack["fills"]] == [("100.5", "0.004"), ("101", "0.002")]
        assert risk.engine.position("BTCUSDT").qty == D("0.006")
        assert count(db_rows, rcfg, "fills", "client_order_id = 't1'") == 2
        # the same fills arrive on the bus too; they are not counted twice
        wait_until(lambda: all(f["fill_id"] in risk.engine._seen for f in ack["fills"]), "fills seen")
        assert risk.engine.position("BTCUSDT").qty == D("0.006")

        over = client.request(order("t2", "0.005"))
        assert over.verdict is Verdict.REJECTED and over.reason["code"] == "MAX_POSITION"
        assert client.request(order("t1", "0.006")) == decision  # retry: same answer, no new fill
        assert count(db_rows, rcfg, "fills") == 2

        back = client.request(order("t3", "0.01", side=Side.SELL))
        assert back.verdict is Verdict.APPROVED and risk.engine.position("BTCUSDT").qty == D("-0.004")
        state = wait_until(lambda: sub.sock.poll(0) and sub.recv()[1], "a risk.state message")
        assert isinstance(state, RiskState) and state.state is TradingState.ACTIVE
    finally:
        sub.close()


def test_broker_outcomes_travel_in_the_approved_decision(rcfg, risk_env, runner, md, make_book, feed, client):
    # this broker listens to another md endpoint, so it never has a book: NO_BOOK
    broker_cfg = load({**risk_env, "QF_MD_PUB": rcfg.bus.md_pub + "-elsewhere"})
    runner.start(BrokerService(broker_cfg))
    risk = runner.start(RiskService(rcfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in risk.engine.book_ns)
    decision = client.request(order("nob", "0.001"))
    assert decision.verdict is Verdict.APPROVED and decision.reason is None
    assert (decision.order["status"], decision.order["reason"], decision.order["fills"]) == ("REJECTED", "NO_BOOK", [])
    assert risk.stats["broker_rejected"] == 1 and risk.engine.position("BTCUSDT").qty == 0


def test_ioc_limit_remainder_is_cancelled(stack, client):
    decision = client.request(order("lim", "0.001", kind=OrderKind.LIMIT, price=D("90"), tif="IOC"))
    assert decision.verdict is Verdict.APPROVED and decision.order["status"] == "CANCELLED"
    assert decision.order["reason"] == "NO_LIQUIDITY" and stack[1].engine.working == {}


def test_resting_order_counts_against_the_limit_until_cancelled(stack, client, wait_until):
    broker, risk = stack
    rest = client.request(order("gtc", "0.008", kind=OrderKind.LIMIT, price=D("100.5")))
    assert rest.order["status"] == "PARTIALLY_FILLED" and rest.order["filled_qty"] == "0.004"
    assert risk.engine.working == {"gtc": ["BTCUSDT", Side.BUY, D("0.004")]}
    assert client.request(order("more", "0.003")).reason["code"] == "MAX_POSITION"  # 0.004 + 0.004 + 0.003
    cancelled = client.request(messages.Cancel(ts=2, client_order_id="gtc"))
    assert (cancelled.status, cancelled.reason) == (OrderStatus.CANCELLED, "CANCELLED_BY_CLIENT")
    assert risk.engine.working == {}
    assert client.request(order("more2", "0.003", kind=OrderKind.LIMIT, price=D("101"),
                                tif="IOC")).verdict is Verdict.APPROVED


def test_restart_rebuilds_positions_and_halt_and_honours_retries(stack, client, risk_env, rcfg, runner,
                                                                  clients, md, make_book, feed):
    broker, risk = stack
    first = client.request(order("keep", "0.008"))
    assert first.verdict is Verdict.APPROVED
    assert client.request(Control(ts=1, action=ControlAction.HALT, by="t", reason="pause")).state is TradingState.HALTED
    runner.stop(risk)

    cfg2 = load({**risk_env, "QF_RISK_REP": rcfg.bus.risk_rep + "-2", "QF_RISK_PUB": rcfg.bus.risk_pub + "-2"})
    risk2 = runner.start(RiskService(cfg2))
    assert risk2.engine.state is TradingState.HALTED and risk2.engine.state_reason == "pause"
    assert risk2.engine.position("BTCUSDT").qty == D("0.008")
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in risk2.engine.book_ns)
    c2 = clients(cfg2.bus.risk_rep)
    # halted and over the limit, yet a retry of an order the broker already took gets the broker's answer
    again = c2.request(order("keep", "0.008"))
    assert again.verdict is Verdict.APPROVED and again.order == first.order
    assert risk2.engine.position("BTCUSDT").qty == D("0.008")
    assert c2.request(order("new", "0.001")).reason["code"] == "HALTED"
    c2.request(Control(ts=2, action=ControlAction.RESUME, by="t"))
    assert c2.request(order("new2", "0.002")).verdict is Verdict.APPROVED
