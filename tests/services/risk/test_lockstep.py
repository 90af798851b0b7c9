"""RiskService in a lock-step replay (QF_LOCKSTEP, shared/lockstep.py), over real sockets: the test
plays the conductor (an XPUB for market data, a PULL for the reports), the strategy (REQs) and the
broker (a ROUTER, and an XPUB for its events)."""
from __future__ import annotations

import time
from decimal import Decimal as D

import pytest
import zmq

from services.risk.service import RiskService
from shared import messages
from shared.config import load
from shared.enums import OrderKind, OrderStatus, Side, Verdict
from shared.lockstep import LockstepClock
from shared.messages import Ack, Cancel, Clock, Control, ControlReply, Fill, OrderEvent, OrderRequest, RiskState, Trade
from tests.fakes.lockstep_taps import WAIT_S, Reports, XPub

T1 = 1_700_000_000_000_000_000
T2, T3, T4 = T1 + 5_000_000, T1 + 6_000_000, T1 + 7_000_000


def book(bid: float, ask: float, ts: int) -> messages.Book:
    mid = (bid + ask) / 2
    return messages.Book(ts=ts, symbol="BTCUSDT", exch_ts=ts // 1_000_000, update_id=ts, bids=[[bid, 1.0]],
                         asks=[[ask, 1.0]], mid=mid, spread=ask - bid, spread_bps=0.0, imbalance=0.0,
                         microprice=mid, recv_ts=ts)


def order(coid: str, ts: int, **kw) -> OrderRequest:
    return OrderRequest(ts=ts, client_order_id=coid, strategy="imbalance", symbol="BTCUSDT", side=Side.BUY,
                        kind=kw.pop("kind", OrderKind.MARKET), qty=D("0.001"), **kw)


def decision(sock: zmq.Socket) -> messages.Decision:
    assert sock.poll(int(WAIT_S * 1000)), "no answer from risk"
    return messages.decode(sock.recv(), messages.REQUESTS)


@pytest.fixture
def lock_env(env):
    return {**env, "QF_LOCKSTEP": f"{env['QF_MD_PUB']}-lockstep", "QF_RISK_BROKER_TIMEOUT_MS": "60000",
            "QF_RISK_MAX_POSITION": "0.01", "QF_RISK_STALE_BOOK_MS": "1000", "QF_RISK_ADJUST": "false"}


@pytest.fixture
def conductor(lock_env):
    """(reports, md, broker ROUTER, broker events), bound before risk connects."""
    cfg = load(lock_env)
    reports, md, events = Reports(cfg.bus.lockstep), XPub(cfg.bus.md_pub), XPub(cfg.bus.broker_pub)
    broker = zmq.Context.instance().socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(cfg.bus.broker_rep)
    try:
        yield reports, md, broker, events
    finally:
        for s in (reports, md, events):
            s.close()
        broker.close(0)


ZERO = dict.fromkeys(("md", "orders_in", "answers_out", "events_in", "cancels_in", "cancel_answers_out",
                      "states_out"), 0)


def handshake(risk, md, broker, events, reports, wait_until) -> None:
    """The probe answered and the broker's PUB heard: risk says hello."""
    md.joined("book.", "trade.", "clock")
    events.joined("fill.", "order.", "clock")
    md.publish("clock", Clock(ts=0))
    assert broker.poll(int(WAIT_S * 1000)), "no probe reached the broker"
    probe = broker.recv_multipart()
    broker.send_multipart([*probe[:-1], messages.encode(messages.Error(ts=0, code="UNKNOWN_ORDER", text="probe"))])
    wait_until(lambda: risk.reporter.counters["broker_in"] == 1, "risk to take the probe's answer")
    events.publish("clock", Clock(ts=0))
    wait_until(lambda: risk._links["broker_pub"], "risk to hear the broker's PUB")
    md.publish("clock", Clock(ts=0))
    reports.until(hello=True)


def test_risk_marks_the_book_an_order_was_decided_on_first_and_counts_what_crossed(
        lock_env, conductor, runner, clients, wait_until):
    reports, md, broker, events = conductor
    cfg = load(lock_env)
    risk = runner.start(RiskService(cfg))
    assert isinstance(risk.clock, LockstepClock)
    md.joined("book.", "trade.", "clock")
    events.joined("fill.", "order.", "clock")

    # The handshake: risk says hello only once its DEALER reaches the broker (a probe cancel,
    # answered) and its SUB hears the broker's PUB (the broker passes the tick on): no time moves.
    md.publish("clock", Clock(ts=0))
    assert broker.poll(int(WAIT_S * 1000)), "no probe reached the broker"
    probe = broker.recv_multipart()
    cancel = messages.decode(probe[-1], messages.REQUESTS)
    assert isinstance(cancel, messages.Cancel) and cancel.ts == 0
    broker.send_multipart([*probe[:-1], messages.encode(messages.Error(ts=0, code="UNKNOWN_ORDER",
                                                                       text=cancel.client_order_id))])
    wait_until(lambda: risk.reporter.counters["broker_in"] == 1, "risk to take the probe's answer")
    md.publish("clock", Clock(ts=0))
    assert not risk.reporter.hello and not any(r.get("hello") for r in reports.seen)  # broker's PUB unheard
    events.publish("clock", Clock(ts=0))
    wait_until(lambda: risk._links["broker_pub"], "risk to hear the broker's PUB")
    md.publish("clock", Clock(ts=0))
    assert reports.until(hello=True) == {"service": "risk", "hello": True, **ZERO, "broker_out": 1, "broker_in": 1}
    md.publish("book.BTCUSDT", book(100.0, 100.5, T1))
    reports.until(md=1)
    assert risk.clock() == T1

    # The strategy decided at T2 on a book risk has not read yet: a limit at 150.5 is in the band
    # of that book (mid 150.25), far out of the one risk holds (mid 100.25).
    ahead = order("ahead", T2, kind=OrderKind.LIMIT, price=D("150.5"))
    a, b = clients(cfg.bus.risk_rep), clients(cfg.bus.risk_rep)
    a.sock.send(messages.encode(ahead))
    wait_until(lambda: risk.reporter.counters["orders_in"] == 1, "risk to take the order")
    b.sock.send(messages.encode(order("behind", T1)))  # stamped in the past: it waits its turn
    assert not broker.poll(50) and not a.sock.poll(0) and risk.clock() == T1  # risk waits for T2's book
    md.publish("book.BTCUSDT", book(150.0, 150.5, T2))
    sent = []
    for _ in range(2):
        assert broker.poll(int(WAIT_S * 1000)), "no request reached the broker"
        sent.append(broker.recv_multipart())
    assert [messages.decode(f[-1], messages.REQUESTS).client_order_id for f in sent] == ["ahead", "behind"]
    assert sent[0][-1] == messages.encode(ahead)  # approved as sent: judged on T2's mark
    reports.until(md=2, orders_in=2, broker_out=3, answers_out=0, broker_in=1)

    # A reply stamped at the clock is answered at once, at that time.
    done = Ack(ts=T2, client_order_id="behind", order_id="o-b", status=OrderStatus.CANCELLED, filled_qty=D(0),
               reason="NO_LIQUIDITY")
    broker.send_multipart([*sent[1][:-1], messages.encode(done)])
    got = decision(b.sock)
    assert (got.client_order_id, got.verdict, got.ts) == ("behind", Verdict.APPROVED, T2)
    # One stamped at T3 (the broker's due instant) waits until risk's clock is there: the tick.
    rests = Ack(ts=T3, client_order_id="ahead", order_id="o-a", status=OrderStatus.PENDING, filled_qty=D(0))
    broker.send_multipart([*sent[0][:-1], messages.encode(rests)])
    wait_until(lambda: risk.reporter.counters["broker_in"] == 3, "risk to take the broker's reply")
    assert not a.sock.poll(50)
    md.publish("clock", Clock(ts=T3))
    got = decision(a.sock)
    assert (got.client_order_id, got.verdict, got.ts, got.order.status) == (
        "ahead", Verdict.APPROVED, T3, OrderStatus.PENDING)
    reports.until(md=3, answers_out=2, broker_in=3)

    # Broker events: counted; one stamped ahead of the clock is booked once the clock is there.
    events.publish("order.BTCUSDT", OrderEvent(ts=T3, order_id="o-a", client_order_id="ahead", symbol="BTCUSDT",
                                               status=OrderStatus.CANCELLED, filled_qty=D(0)))
    wait_until(lambda: "ahead" not in risk.engine.working, "the order event to end the order")
    events.publish("fill.BTCUSDT", Fill(ts=T4, fill_id="f-1", order_id="o-x", client_order_id="x",
                                        symbol="BTCUSDT", side=Side.SELL, price=D("150.5"), qty=D("0.002"),
                                        fee=D("0"), fee_asset="USDT", liquidity="TAKER", exch_ts=T4 // 1_000_000))
    wait_until(lambda: risk.reporter.counters["events_in"] == 2, "risk to take the fill")
    assert risk.engine.ledger.qty("BTCUSDT") == 0
    md.publish("clock", Clock(ts=T4))
    wait_until(lambda: risk.engine.ledger.qty("BTCUSDT") == D("-0.002"), "the fill booked")
    # every count equals what crossed: 2 books and 2 ticks, 2 orders and answers, 3 requests and
    # replies (the probe and 2 orders), 2 events
    assert reports.until(md=4, events_in=2) == {"service": "risk", "hello": True, **ZERO, "md": 4, "orders_in": 2,
                                                "answers_out": 2, "broker_out": 3, "broker_in": 3, "events_in": 2}


def test_what_the_ofi_strategy_needs_trades_move_the_clock_cancels_and_state_changes_count(
        lock_env, conductor, runner, clients, wait_until):
    """The OFI strategy in lock-step (a stepped strategy): a trade's ts moves risk's clock (a maker
    fill is stamped with it), its cancels and their answers are counted apart from orders, each
    state change is one risk.state (counted; none on the heartbeat, whose moment is the wall
    clock's), and risk passes the handshake tick on on its PUB (the strategy's SUB learns so)."""
    reports, md, broker, events = conductor
    cfg = load(lock_env)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"clock", b"risk.state", b"heartbeat.risk"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    risk = runner.start(RiskService(cfg))
    try:
        sub.connect(cfg.bus.risk_pub)
        handshake(risk, md, broker, events, reports, wait_until)
        for _ in range(100):  # bounded: each handshake tick is passed on once the SUB is connected
            md.publish("clock", Clock(ts=0))
            if sub.poll(50):
                break
        topic, raw = sub.recv_multipart()
        assert topic == b"clock" and messages.decode(raw) == Clock(ts=0)
        while sub.poll(100):  # the other passed-on ticks (and heartbeats)
            assert sub.recv_multipart()[0] in (b"clock", b"heartbeat.risk")

        md.publish("trade.BTCUSDT", Trade(ts=T1, symbol="BTCUSDT", exch_ts=T1 // 1_000_000, trade_id=1,
                                          price=D("100.25"), qty=D("0.01"), buyer_is_maker=False, recv_ts=T1))
        reports.until(md=1)
        assert risk.clock() == T1 and risk.stats["books"] == 0  # a trade marks nothing

        c = clients(cfg.bus.risk_rep)
        c.sock.send(messages.encode(Cancel(ts=T1, client_order_id="gone")))
        assert broker.poll(int(WAIT_S * 1000)), "the cancel did not reach the broker"
        frames = broker.recv_multipart()
        assert messages.decode(frames[-1], messages.REQUESTS) == Cancel(ts=T1, client_order_id="gone")
        reports.until(cancels_in=1, cancel_answers_out=0, broker_out=2)
        broker.send_multipart([*frames[:-1], messages.encode(messages.Error(ts=T1, code="UNKNOWN_ORDER",
                                                                            text="gone"))])
        assert c.sock.poll(int(WAIT_S * 1000)) and messages.decode(c.sock.recv(), messages.REQUESTS).code \
            == "UNKNOWN_ORDER"
        reports.until(cancels_in=1, cancel_answers_out=1, answers_out=0, orders_in=0, broker_in=2)

        halt = messages.decode(clients(cfg.bus.risk_rep).raw(messages.encode(
            Control(ts=T1, action=messages.ControlAction.HALT, by="test", reason="why"))), messages.REQUESTS)
        assert isinstance(halt, ControlReply) and halt.state.value == "HALTED"
        seen = []
        while len([t for t, _ in seen if t == b"heartbeat.risk"]) < 3:  # QF_HEARTBEAT_MS=50
            assert sub.poll(int(WAIT_S * 1000)), f"no heartbeats; seen {seen}"
            topic, raw = sub.recv_multipart()
            seen.append((topic, messages.decode(raw)))
        states = [m for t, m in seen if t == b"risk.state"]  # one for the change, none on the heartbeats
        assert len(states) == 1 and isinstance(states[0], RiskState) and states[0].state.value == "HALTED"
        assert reports.until(states_out=1)["states_out"] == 1
    finally:
        sub.close(0)


def test_a_lockstep_risk_takes_no_wall_clock(lock_env):
    with pytest.raises(TypeError, match="LockstepClock"):
        RiskService(load(lock_env), clock=time.time_ns)
