"""RiskService over real ZeroMQ sockets and a real SQLite file, alone and in front of a real broker."""
from __future__ import annotations

import os
import time
from decimal import Decimal as D

import msgpack
import pytest

from bench.common import free_port
import zmq

from services.broker.service import BrokerService
from services.risk.service import RiskService
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.enums import ControlAction, OrderKind, OrderStatus, Side, TradingState, Verdict
from shared.messages import Ack, Control, ControlReply, Decision, Error, Fill, OrderRequest, RiskState

ASKS = [[100.5, 0.004], [101.0, 0.5]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


def order(coid: str, qty: str = "0.005", side=Side.BUY, symbol="BTCUSDT", **kw) -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="test", symbol=symbol, side=side,
                        kind=kw.pop("kind", OrderKind.MARKET), qty=D(qty), **kw)


def control(client, action: ControlAction, reason: str = "") -> tuple[ControlReply, dict]:
    """A control request; returns the reply and risk's added `detail` map."""
    raw = client.raw(messages.encode(Control(ts=1, action=action, by="test", reason=reason)))
    return messages.decode(raw, messages.REQUESTS), msgpack.unpackb(raw)["detail"]


def settled(client) -> None:
    """Risk answers first and books fills after; a request behind the answer sees them booked."""
    control(client, ControlAction.STATE)


class Clock:
    """A settable clock shared with the service thread (reads of an int are atomic)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def risk_env(env):
    return {**env, "QF_RISK_BROKER_TIMEOUT_MS": "200", "QF_RISK_MAX_POSITION": "0.01",
            "QF_RISK_STALE_BOOK_MS": "1000", "QF_RISK_ADJUST": "false"}


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


def test_denials_are_answered_counted_and_stored(risk, client, rcfg, db_rows, wait_until):
    cases = [(order("u", symbol="DOGEUSDT"), "UNKNOWN_SYMBOL"), (order("s", symbol="ETHUSDT"), "STALE_BOOK"),
             (order("m", "0.011"), "MAX_POSITION"), (order("q", "0"), "BAD_QTY"), (order("l", "0.0001"), "BAD_QTY"),
             (order("p", kind=OrderKind.LIMIT, price=D("100.2")), "BAD_PRICE"),
             (order("b", kind=OrderKind.LIMIT, price=D("90")), "PRICE_BAND")]
    for req, code in cases:
        decision = client.request(req)
        assert isinstance(decision, Decision) and decision.verdict is Verdict.REJECTED, decision
        assert decision.reason["code"] == code and decision.qty == 0 and decision.order is None
    reply, detail = control(client, ControlAction.HALT, "drill")
    assert isinstance(reply, ControlReply) and reply.state is TradingState.HALTED and reply.reason == "drill"
    assert detail["by"] == "test" and detail["code"] == "HALT"
    assert client.request(order("h")).reason["code"] == "HALTED"
    wait_until(lambda: count(db_rows, rcfg, "risk_events", "kind = 'DENIED'") == len(cases) + 1, "denials stored")
    assert db_rows(rcfg.common.db, "SELECT code, state FROM risk_events WHERE kind = 'STATE'") == [("HALT", "HALTED")]
    assert db_rows(rcfg.common.db, "SELECT state, by FROM risk_checkpoints ORDER BY id DESC LIMIT 1") == [
        ("HALTED", "test")]
    codes = {r[0] for r in db_rows(rcfg.common.db, "SELECT code FROM risk_events WHERE kind = 'DENIED'")}
    assert codes == {code for _, code in cases} | {"HALTED"}
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


def test_no_broker_is_an_immediate_rejection_that_never_executes_later(risk_env, runner, md, make_book, feed,
                                                                      clients, db_rows, wait_until):
    # over tcp (as deployed): nothing is queued for a broker that is not connected
    cfg = load({**risk_env, "QF_BROKER_REP": f"tcp://127.0.0.1:{free_port()}"})
    risk = runner.start(RiskService(cfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in risk.engine.book_ns)
    client = clients(cfg.bus.risk_rep)
    started = time.monotonic()
    decision = client.request(order("nb"))
    assert decision.verdict is Verdict.REJECTED and decision.reason["code"] == "BROKER_UNAVAILABLE"
    assert time.monotonic() - started < cfg.risk.broker_timeout_ms / 1000
    assert risk.engine.working == {} and risk.engine.ledger.qty("BTCUSDT") == 0
    # a broker that comes up afterwards must not receive the order risk already rejected
    broker = runner.start(BrokerService(cfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in broker.books)
    wait_until(lambda: client.request(order(f"ok{time.monotonic_ns()}", "0.001")).verdict is Verdict.APPROVED,
               "risk to reach the new broker")
    assert "nb" not in {c for (c,) in db_rows(cfg.common.db, "SELECT client_order_id FROM orders")}


def test_a_silent_broker_is_a_bounded_rejection_and_the_order_counts_until_known(risk, client, rcfg, clients):
    broker = zmq.Context.instance().socket(zmq.ROUTER)  # our own stand-in that never answers
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(rcfg.bus.broker_rep)
    try:
        timeout = rcfg.risk.broker_timeout_ms / 1000
        for attempt in range(2):  # not remembered: a retry asks the broker again
            started = time.monotonic()
            decision = client.request(order("silent", "0.006"))
            elapsed = time.monotonic() - started
            assert decision.verdict is Verdict.REJECTED and decision.reason["code"] == "BROKER_UNAVAILABLE"
            assert timeout * 0.9 <= elapsed < timeout * 5, elapsed
            assert broker.poll(1000) and broker.recv_multipart()[-1] == messages.encode(order("silent", "0.006"))
        # its fate is unknown, so its worst case still counts: 0.006 + 0.005 > 0.01
        assert clients(rcfg.bus.risk_rep).request(order("next")).reason["code"] == "MAX_POSITION"
        # the broker never confirmed having it, so a retry is judged like a new order: halted, it stays here
        assert control(client, ControlAction.HALT, "stop")[0].state is TradingState.HALTED
        assert client.request(order("silent", "0.006")).reason["code"] == "HALTED"
        assert not broker.poll(200)
        work = risk.engine.working_order("silent")  # denied, the earlier attempt still counts (the broker may have it)
        assert work is not None and work.remaining == D("0.006") and work.expires_ns
    finally:
        broker.close()


def test_risk_keeps_serving_while_an_order_waits_for_the_broker(risk, client, rcfg, clients):
    broker = zmq.Context.instance().socket(zmq.ROUTER)  # answers only when this test says so
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(rcfg.bus.broker_rep)
    try:
        client.sock.send(messages.encode(order("slow", "0.002")))
        assert broker.poll(2000)
        frames = broker.recv_multipart()
        other = clients(rcfg.bus.risk_rep)
        assert control(other, ControlAction.STATE)[0].state is TradingState.ACTIVE  # answered meanwhile
        assert other.request(order("x", symbol="DOGEUSDT")).reason["code"] == "UNKNOWN_SYMBOL"
        assert risk.engine.working["slow"].remaining == D("0.002")  # in flight: counted
        ack = Ack(ts=2, client_order_id="slow", order_id="o1", status=OrderStatus.CANCELLED, filled_qty=D(0),
                  reason="NO_LIQUIDITY")
        broker.send_multipart([*frames[:-1], messages.encode(ack)])
        assert client.sock.poll(2000)
        decision = messages.decode(client.sock.recv(), messages.REQUESTS)
        assert decision.verdict is Verdict.APPROVED and decision.order.status is OrderStatus.CANCELLED
        settled(other)
        assert risk.engine.working == {}
    finally:
        broker.close()


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
            return svc.engine.ledger.qty("BTCUSDT")

        wait_until(sent_and_seen, "the fill to arrive")
        for _ in range(5):
            pub.publish("fill.BTCUSDT", fill)
        reply, detail = control(clients(rcfg.bus.risk_rep), ControlAction.STATE)
        assert reply.positions == {"BTCUSDT": "-0.003"} and reply.equity == D("10000") - D("0.0003")
        assert detail["fees"] == "0.0003" and detail["positions"]["BTCUSDT"]["avg_price"] == "100"
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
        first = client.raw(messages.encode(order("t1", "0.006")))
        decision = messages.decode(first, messages.REQUESTS)
        assert decision.verdict is Verdict.APPROVED and decision.qty == D("0.006") and decision.reason is None
        ack = decision.order
        assert ack.status is OrderStatus.FILLED and str(ack.avg_price) == "100.66666667"  # 0.604 / 0.006, half-even
        assert [(str(f.price), str(f.qty)) for f in ack.fills] == [("100.5", "0.004"), ("101", "0.002")]
        settled(client)
        assert risk.engine.ledger.qty("BTCUSDT") == D("0.006") and risk.engine.working == {}
        assert count(db_rows, rcfg, "fills", "client_order_id = 't1'") == 2
        # the same fills arrive on the bus too; they are not counted twice
        wait_until(lambda: all(risk.engine.ledger.has_seen(f.fill_id) for f in ack.fills), "fills seen")
        assert risk.engine.ledger.qty("BTCUSDT") == D("0.006")

        over = client.request(order("t2", "0.005"))
        assert over.verdict is Verdict.REJECTED and over.reason["code"] == "MAX_POSITION"
        assert client.raw(messages.encode(order("t1", "0.006"))) == first  # retry: same answer, byte for byte
        assert count(db_rows, rcfg, "fills") == 2  # and no new fill

        short = client.request(order("t3", "0.01", side=Side.SELL))  # a spot account holds 0.006 BTC
        assert short.verdict is Verdict.REJECTED and short.reason["code"] == "INSUFFICIENT_BALANCE"
        assert "needs 0.01 BTC, 0.006 BTC free" in short.reason["text"]
        back = client.request(order("t4", "0.006", side=Side.SELL))
        settled(client)
        assert back.verdict is Verdict.APPROVED and risk.engine.ledger.qty("BTCUSDT") == 0
        state = wait_until(lambda: sub.sock.poll(0) and sub.recv()[1], "a risk.state message")
        assert isinstance(state, RiskState) and state.state is TradingState.ACTIVE
    finally:
        sub.close()


def test_an_order_over_the_limit_is_adjusted_to_what_fits(rcfg, risk_env, runner, md, make_book, feed, client):
    cfg = load({**risk_env, "QF_RISK_ADJUST": "true"})
    broker = runner.start(BrokerService(cfg))
    risk = runner.start(RiskService(cfg))
    feed(md, make_book(bids=BIDS, asks=[[100.5, 1.0]]), lambda: "BTCUSDT" in broker.books and "BTCUSDT" in
         risk.engine.book_ns)
    assert client.request(order("a1", "0.007")).verdict is Verdict.APPROVED
    cut = client.request(order("a2", "0.008"))
    assert cut.verdict is Verdict.ADJUSTED and cut.qty == D("0.003") and cut.reason["code"] == "MAX_POSITION"
    settled(client)
    assert str(cut.order.filled_qty) == "0.003" and risk.engine.ledger.qty("BTCUSDT") == D("0.01")
    assert client.request(order("a3", "0.001")).reason["code"] == "MAX_POSITION"  # nothing fits now


def test_broker_outcomes_travel_in_the_approved_decision(rcfg, risk_env, runner, md, make_book, feed, client):
    # this broker listens to another md endpoint, so it never has a book: NO_BOOK
    broker_cfg = load({**risk_env, "QF_MD_PUB": rcfg.bus.md_pub + "-elsewhere"})
    runner.start(BrokerService(broker_cfg))
    risk = runner.start(RiskService(rcfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in risk.engine.book_ns)
    decision = client.request(order("nob", "0.001"))
    assert decision.verdict is Verdict.APPROVED and decision.reason is None
    assert (decision.order.status, decision.order.fills) == (OrderStatus.REJECTED, [])
    settled(client)
    assert risk.stats["broker_rejected"] == 1 and risk.engine.ledger.qty("BTCUSDT") == 0


def test_resting_order_counts_against_the_limit_until_cancelled(stack, client):
    broker, risk = stack
    rest = client.request(order("gtc", "0.008", kind=OrderKind.LIMIT, price=D("100.5")))
    assert rest.order.status is OrderStatus.PARTIALLY_FILLED and str(rest.order.filled_qty) == "0.004"
    settled(client)
    work = risk.engine.working["gtc"]
    assert (work.symbol, work.side, work.remaining, work.expires_ns) == ("BTCUSDT", Side.BUY, D("0.004"), 0)
    assert client.request(order("more", "0.003")).reason["code"] == "MAX_POSITION"  # 0.004 + 0.004 + 0.003
    cancelled = client.request(messages.Cancel(ts=2, client_order_id="gtc"))
    assert cancelled.status is OrderStatus.CANCELLED
    settled(client)
    assert risk.engine.working == {}
    assert client.request(order("more2", "0.003", kind=OrderKind.LIMIT, price=D("101"),
                                tif="IOC")).verdict is Verdict.APPROVED


def test_flatten_cancels_working_orders_and_closes_positions_through_the_broker(stack, client, rcfg, db_rows):
    broker, risk = stack
    assert client.request(order("long", "0.004")).order.status is OrderStatus.FILLED
    rest = client.request(order("rest", "0.002", side=Side.SELL, kind=OrderKind.LIMIT, price=D("101")))
    settled(client)
    assert rest.order.status is OrderStatus.PENDING and "rest" in risk.engine.working
    reply, detail = control(client, ControlAction.FLATTEN, "close out")
    assert reply.state is TradingState.REDUCING and reply.positions == {"BTCUSDT": "0"}
    actions = [(r["action"], r["status"]) for r in detail["flatten"]]
    assert actions == [("CANCEL", "CANCELLED"), ("CLOSE", "FILLED")]
    assert risk.engine.working == {} and risk.engine.ledger.qty("BTCUSDT") == 0
    closing = db_rows(rcfg.common.db, "SELECT side, qty, status FROM orders WHERE strategy = 'risk'")
    assert closing == [("SELL", "0.004", "FILLED")]
    assert client.request(order("again", "0.001")).reason["code"] == "REDUCING"


def test_a_daily_loss_halts_by_itself_publishes_and_persists(rcfg, risk_env, runner, md, make_book, feed, client,
                                                             db_rows, wait_until):
    cfg = load({**risk_env, "QF_START_CASH": "10", "QF_RISK_DAILY_LOSS": "0.02", "QF_RISK_DAILY_LOSS_SOFT": "0",
                "QF_RISK_MAX_DRAWDOWN": "0", "QF_RISK_DRAWDOWN_SOFT": "0"})
    broker = runner.start(BrokerService(cfg))
    risk = runner.start(RiskService(cfg))
    sub = Subscriber(cfg.bus.risk_pub, ["risk.state"], cfg.bus.hwm)
    try:
        feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in broker.books and "BTCUSDT" in
             risk.engine.book_ns)
        assert client.request(order("buy", "0.004")).order.status is OrderStatus.FILLED  # 0.402 + fee 0.000402
        feed(md, make_book(bids=[[40.0, 1.0]], asks=[[41.0, 1.0]]), lambda: risk.engine.state is TradingState.HALTED)
        assert (risk.engine.state_code, risk.engine.state_by) == ("DAILY_LOSS", "risk")

        def halted_message():
            while sub.sock.poll(0):
                msg = sub.recv()[1]
                if msg.state is TradingState.HALTED:
                    return msg
        msg = wait_until(halted_message, "risk.state HALTED")
        assert msg.equity < D("9.8")  # 10 - 0.402 + 0.004 × 40.5 - fee
        assert db_rows(cfg.common.db, "SELECT code, state FROM risk_events WHERE kind = 'STATE'") == [
            ("DAILY_LOSS", "HALTED")]
        assert client.request(order("more", "0.001")).reason["code"] == "HALTED"
    finally:
        sub.close()


def test_a_book_whose_mid_lies_is_refused_not_marked(rcfg, risk_env, runner, md, make_book, feed, client,
                                                   wait_until):
    """A peer on the market-data bus sent a crossed book with mid 1.0, and a book whose mid was
    half its levels': risk marked its position at them and the daily-loss breaker latched HALTED."""
    import dataclasses
    cfg = load({**risk_env, "QF_START_CASH": "10", "QF_RISK_DAILY_LOSS": "0.02", "QF_RISK_DAILY_LOSS_SOFT": "0",
                "QF_RISK_MAX_DRAWDOWN": "0", "QF_RISK_DRAWDOWN_SOFT": "0"})
    broker = runner.start(BrokerService(cfg))
    risk = runner.start(RiskService(cfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in broker.books and "BTCUSDT" in
         risk.engine.book_ns)
    assert client.request(order("buy", "0.004")).order.status is OrderStatus.FILLED
    marked = risk.engine._mids["BTCUSDT"]
    crossed = dataclasses.replace(make_book(bids=[[1.5, 1.0]], asks=[[0.5, 1.0]]), mid=1.0)
    halved = dataclasses.replace(make_book(bids=BIDS, asks=ASKS), mid=(BIDS[0][0] + ASKS[0][0]) / 4)
    for bad in (crossed, halved):
        seen = risk.stats["bad_books"]
        feed(md, bad, lambda: risk.stats["bad_books"] > seen)
    assert risk.engine._mids["BTCUSDT"] == marked and risk.engine.state is TradingState.ACTIVE
    assert client.request(order("more", "0.001")).verdict is Verdict.APPROVED


def test_cancels_of_orders_risk_holds_none_for_are_limited_and_a_working_orders_cancel_is_not(
        rcfg, runner, md, make_book, feed, client):
    """20,000 cancels of made-up ids kept the broker link so busy that a good order timed out."""
    import time as _time
    from services.risk.desk import STRAY_CANCELS_PER_S
    frozen = _time.time_ns()  # risk's clock stands still: its cancel bucket never refills here
    broker = runner.start(BrokerService(rcfg))
    risk = runner.start(RiskService(rcfg, clock=lambda: frozen))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in broker.books and "BTCUSDT" in
         risk.engine.book_ns)
    rest = client.request(order("gtc", "0.008", kind=OrderKind.LIMIT, price=D("100.5")))
    assert rest.order.status is OrderStatus.PARTIALLY_FILLED
    client.request(messages.Control(ts=1, action="STATE", by="test"))  # booked: risk holds it as working
    codes = [client.request(messages.Cancel(ts=2, client_order_id=f"made-up-{n}")).code
             for n in range(STRAY_CANCELS_PER_S + 20)]
    assert codes == ["UNKNOWN_ORDER"] * STRAY_CANCELS_PER_S + ["RATE_LIMIT"] * 20  # the broker asked 100 times
    assert risk.stats["cancels_limited"] == 20
    assert client.request(messages.Cancel(ts=3, client_order_id="gtc")).status is OrderStatus.CANCELLED


def test_restart_rebuilds_positions_and_halt_and_honours_retries(stack, client, risk_env, rcfg, runner,
                                                                  clients, md, make_book, feed):
    broker, risk = stack
    first = client.request(order("keep", "0.008"))
    assert first.verdict is Verdict.APPROVED
    assert control(client, ControlAction.HALT, "pause")[0].state is TradingState.HALTED
    runner.stop(risk)

    cfg2 = load({**risk_env, "QF_RISK_REP": rcfg.bus.risk_rep + "-2", "QF_RISK_PUB": rcfg.bus.risk_pub + "-2"})
    risk2 = runner.start(RiskService(cfg2))
    assert (risk2.engine.state, risk2.engine.state_reason, risk2.engine.state_by) == (
        TradingState.HALTED, "pause", "test")
    assert risk2.engine.ledger.qty("BTCUSDT") == D("0.008") and risk2.engine.peak == risk.engine.peak
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in risk2.engine.book_ns)
    c2 = clients(cfg2.bus.risk_rep)
    # halted and over the limit, yet a retry of an order the broker already took gets the broker's answer
    again = c2.request(order("keep", "0.008"))
    assert again.verdict is Verdict.APPROVED and again.order == first.order
    settled(c2)
    assert risk2.engine.ledger.qty("BTCUSDT") == D("0.008")
    assert c2.request(order("new", "0.001")).reason["code"] == "HALTED"
    control(c2, ControlAction.RESUME, "back")
    assert c2.request(order("new2", "0.002")).verdict is Verdict.APPROVED


@pytest.mark.parametrize("spin_us", ["0", "100000"])
def test_sleeping_or_busy_polling_risk_answers_alike(spin_us, risk_env, runner, md, make_book, feed, clients,
                                                    db_rows):
    """QF_RISK_SPIN_US: risk sleeps at once (0) or polls (yielding the core) between messages (the
    default, 2500, between the two); the answers, the bookkeeping and the stop at teardown are the same."""
    cfg = load({**risk_env, "QF_RISK_SPIN_US": spin_us})
    broker = runner.start(BrokerService(cfg))
    risk = runner.start(RiskService(cfg))
    feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in broker.books and "BTCUSDT" in risk.engine.book_ns)
    client = clients(cfg.bus.risk_rep)
    for i in range(3):
        decision = client.request(order(f"s{i}", "0.001"))
        assert decision.verdict is Verdict.APPROVED and decision.order.status is OrderStatus.FILLED
    over = client.request(order("s9", "0.01"))
    assert over.verdict is Verdict.REJECTED and over.reason["code"] == "MAX_POSITION"
    settled(client)
    assert risk.engine.ledger.qty("BTCUSDT") == D("0.003")
    assert count(db_rows, cfg, "fills") == 3
