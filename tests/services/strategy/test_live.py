"""OfiService (services/strategy/live.py, QF_STRATEGY_KIND=ofi) over real ZeroMQ sockets: the test plays
marketdata, the broker and risk's PUB (real Publishers on inproc://), risk's ROUTER (a thread that
records and answers every request by a policy), and listens on QF_STRATEGY_PUB; signals go to a real
SQLite file. The service runs in a thread, on the wall clock.

The score is the book's depth imbalance alone (as in test_ofi.py): a book with bid qty 9 and ask qty 1
is a BUY of confidence 0.8, ask-heavy a SELL of 0.8 (a reversal exit at 0.7), 1/1 flat. Windows,
horizons and time constants of 20 ms make the features ready 20 ms of wall time after the first book."""
from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from decimal import Decimal
from typing import Callable

import pytest
import zmq

from services.strategy import signals as signals_mod
from services.strategy.live import OfiService
from services.strategy.ofi import Signal
from shared import messages
from shared.bus import Publisher, Server
from shared.config import load
from shared.enums import ControlAction, Liquidity, OrderKind, OrderStatus, Side, TimeInForce, TradingState, Verdict
from shared.messages import (Ack, Book, Cancel, Control, ControlReply, Decision, Fill, Heartbeat, OrderEvent,
                             OrderRequest, RiskState, SignalEvent)
from tests.conftest import wait_for
from tests.services.conftest import endpoints

SYM = "BTCUSDT"
WAIT_S = 5.0  # bound of every wait; the happy path takes milliseconds
BID = 60000.0
QTY = Decimal("0.00266")  # 200 USDT × 0.8 / 60000.00, down to the 0.00001 lot

BASE = dict(QF_STRATEGY_KIND="ofi", QF_STRATEGY_WINDOWS_MS="20", QF_STRATEGY_HORIZONS_S="0.02",
            QF_STRATEGY_VOL_TAU_S="0.02", QF_STRATEGY_SPREAD_TAU_S="0.02", QF_STRATEGY_W_OFI="0",
            QF_STRATEGY_W_OFI_L1="0", QF_STRATEGY_W_FLOW="0", QF_STRATEGY_W_DEPTH="1", QF_STRATEGY_W_MICRO="0",
            QF_STRATEGY_VOL_MIN_BPS="0", QF_STRATEGY_VOL_MAX_BPS="1000000", QF_STRATEGY_MAX_SPREAD_RATIO="1000000",
            QF_STRATEGY_COOLDOWN_MS="0", QF_STRATEGY_MARKET_CONFIDENCE="2", QF_STRATEGY_ENTRY_SCORE="0.5",
            QF_STRATEGY_CANCEL_SCORE="0", QF_STRATEGY_REVERSAL_CONFIDENCE="0.7",
            QF_STRATEGY_ENTRY_TTL_MS="60000", QF_STRATEGY_AWAY_BPS="1", QF_STRATEGY_TAKE_PROFIT_BPS="5",
            QF_STRATEGY_STOP_LOSS_BPS="5", QF_STRATEGY_MAX_HOLD_MS="60000", QF_STRATEGY_NOTIONAL="200",
            QF_STRATEGY_TARGET_VOL_BPS="1", QF_HEARTBEAT_MS="50")

HOLD = object()  # a policy's answer: keep the request, answer it at `FakeRisk.release()`


# -- risk's answers ---------------------------------------------------------------------------------

def state_reply(positions: dict[str, str] | None = None, state: TradingState = TradingState.ACTIVE) -> ControlReply:
    return ControlReply(ts=time.time_ns(), state=state, reason="", positions=dict(positions or {}),
                        equity=Decimal("10000"))


def pending(req: OrderRequest) -> Decision:
    """Approved; the broker's ack says the order rests (nothing filled yet)."""
    ack = Ack(ts=time.time_ns(), client_order_id=req.client_order_id, order_id="o-" + req.client_order_id,
              status=OrderStatus.PENDING, filled_qty=Decimal(0))
    return Decision(ts=time.time_ns(), client_order_id=req.client_order_id, verdict=Verdict.APPROVED, qty=req.qty,
                    order=ack)


def rejected(req: OrderRequest, code: str) -> Decision:
    return Decision(ts=time.time_ns(), client_order_id=req.client_order_id, verdict=Verdict.REJECTED,
                    reason={"code": code, "text": "denied by the test"})


def cancelled(req: Cancel) -> Ack:
    return Ack(ts=time.time_ns(), client_order_id=req.client_order_id, order_id="o-" + req.client_order_id,
               status=OrderStatus.CANCELLED, filled_qty=Decimal(0))


def policy(positions: dict[str, str] | None = None, order: Callable = pending) -> Callable:
    """Risk as it normally answers: STATE with `positions`, orders by `order`, cancels done."""
    def answer(req):
        if isinstance(req, Control):
            return state_reply(positions)
        if isinstance(req, OrderRequest):
            return order(req)
        if isinstance(req, Cancel):
            return cancelled(req)
        return None
    return answer


def fill_of(req: OrderRequest, fill_id: str, qty: Decimal | None = None, price: str = "60000") -> Fill:
    return Fill(ts=time.time_ns(), fill_id=fill_id, order_id="o-" + req.client_order_id,
                client_order_id=req.client_order_id, symbol=req.symbol, side=req.side, price=Decimal(price),
                qty=req.qty if qty is None else qty, fee=Decimal(0), fee_asset="USDT", liquidity=Liquidity.MAKER,
                exch_ts=1)


def order_event(req: OrderRequest, status: OrderStatus, filled: Decimal) -> OrderEvent:
    return OrderEvent(ts=time.time_ns(), order_id="o-" + req.client_order_id, client_order_id=req.client_order_id,
                      symbol=req.symbol, status=status, filled_qty=filled)


class FakeRisk(threading.Thread):
    """risk's ROUTER (shared.bus.Server), bound before the service starts, in a thread of its own: every
    request is decoded and recorded (with its bytes), then answered by `policy(request)`: a message,
    raw bytes, None (silence) or HOLD. The test may swap `policy` at any time."""

    def __init__(self, endpoint: str, answer: Callable) -> None:
        super().__init__(name="fake-risk", daemon=True)
        self.server = Server(endpoint)
        self.policy = answer
        self._seen: list[tuple[bytes, object]] = []
        self._lock = threading.Lock()
        self._held: list = []
        self._jobs: queue.Queue = queue.Queue()
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        while not self._halt.is_set():
            while not self._jobs.empty():
                self._jobs.get_nowait()()
            if not poller.poll(5):
                continue
            envelope, payload = self.server.recv()
            req = messages.decode(payload, messages.REQUESTS)
            with self._lock:
                self._seen.append((payload, req))
            self._answer(envelope, req)

    def _answer(self, envelope, req) -> None:
        reply = self.policy(req)
        if reply is HOLD:
            self._held.append((envelope, req))
        elif reply is not None:
            self.server.reply(envelope, reply if isinstance(reply, bytes) else messages.encode(reply))

    def release(self) -> None:
        """Answer the held requests by the policy now in place (in risk's thread, which owns the socket)."""
        def job():
            held, self._held = self._held, []
            for envelope, req in held:
                self._answer(envelope, req)
        self._jobs.put(job)

    def seen(self, kind: type = object) -> list:
        with self._lock:
            return [req for _, req in self._seen if isinstance(req, kind)]

    def payloads(self, kind: type = object) -> list[bytes]:
        with self._lock:
            return [raw for raw, req in self._seen if isinstance(req, kind)]

    def close(self) -> None:
        self._halt.set()
        self.join(WAIT_S)
        self.server.close()


# -- the stage ------------------------------------------------------------------------------------

class Stage:
    """The service and everything around it. `stop()` stops and joins the service (bounded)."""

    def __init__(self, tmp_path, answer: Callable, **env: str) -> None:
        self.cfg = load({**BASE, **endpoints(), "QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
                         **env})
        bus = self.cfg.bus
        self.risk = FakeRisk(bus.risk_rep, answer)
        self.md = Publisher(bus.md_pub, bus.hwm)
        self.broker = Publisher(bus.broker_pub, bus.hwm)
        self.risk_pub = Publisher(bus.risk_pub, bus.hwm)
        self.out = zmq.Context.instance().socket(zmq.SUB)  # what the strategy publishes
        self.out.setsockopt(zmq.LINGER, 0)
        for topic in (b"signal.", b"heartbeat.strategy"):
            self.out.setsockopt(zmq.SUBSCRIBE, topic)
        self.out.connect(bus.strategy_pub)  # inproc: connecting before the bind is fine
        self.svc = OfiService(self.cfg)
        self.uid = 0
        self.risk.start()
        self.thread = threading.Thread(target=self.svc.run, name="ofi-strategy", daemon=True)
        self.thread.start()

    @property
    def core(self):
        return self.svc.core

    def stop(self) -> None:
        self.svc.stop()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the strategy did not stop within the bound"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.risk.close()
            for sock in (self.md, self.broker, self.risk_pub):
                sock.close()
            self.out.close(linger=0)

    # market data
    def book(self, bq: float = 9.0, aq: float = 1.0, symbol: str = SYM, bid: float = BID) -> None:
        """Publish one book (by default a BUY signal of confidence 0.8), stamped now."""
        self.uid += 1
        now = time.time_ns()
        ask = round(bid + 0.01, 2)
        mid = (bid + ask) / 2
        self.md.publish(f"book.{symbol}", Book(
            ts=now, symbol=symbol, exch_ts=now // 1_000_000, update_id=self.uid, bids=[[bid, bq]],
            asks=[[ask, aq]], mid=mid, spread=ask - bid, spread_bps=(ask - bid) / mid * 1e4,
            imbalance=(bq - aq) / (bq + aq), microprice=mid, recv_ts=now))

    def pump(self, until: Callable[[], object], what: str, **book):
        """Publish books until `until()` holds (returned): the features need 20 ms of them to be ready,
        and a SUB misses what is sent before it has joined."""
        def step():
            self.book(**book)
            return until()
        return wait_for(step, WAIT_S, what, step=0.002)

    def settled(self) -> None:
        """Wait until the service handled every book published so far (and sent what they asked
        for): a book of a symbol it does not trade, published last, has been counted."""
        seen = self.svc.stats["other_symbols"]
        self.book(symbol="SOLUSDT")  # never traded here
        wait_for(lambda: self.svc.stats["other_symbols"] > seen, WAIT_S, "the books to be handled", step=0.002)

    def until_order(self, n: int = 1, **book) -> OrderRequest:
        """Publish books until risk has seen `n` orders; returns the n-th."""
        self.pump(lambda: len(self.risk.seen(OrderRequest)) >= n, f"order #{n} to reach risk", **book)
        return self.risk.seen(OrderRequest)[n - 1]

    def until_working(self, phase: str = "open"):
        return wait_for(lambda: (w := self.core.working(SYM)) is not None and w.phase == phase and w,
                        WAIT_S, f"a working order {phase}", step=0.002)

    # the broker's and risk's streams
    def publish_until(self, pub: Publisher, topic: str, msg: messages.Message, until: Callable[[], object],
                      what: str):
        """Publish `msg` until `until()` holds (the service ignores repeats: a fill once per fill_id)."""
        def step():
            pub.publish(topic, msg)
            return until()
        return wait_for(step, WAIT_S, what, step=0.002)

    # what the strategy publishes
    def heard(self, pred: Callable[[str, messages.Message], bool], what: str) -> tuple[str, messages.Message]:
        """The first (topic, message) on QF_STRATEGY_PUB that `pred` accepts."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.out.poll(20):
                topic, payload = self.out.recv_multipart()
                msg = messages.decode(payload)
                if pred(topic.decode(), msg):
                    return topic.decode(), msg
        raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")


@pytest.fixture
def stage(tmp_path):
    """`stage(answer, **QF_vars)` -> a running Stage; each one stopped, joined and closed after the test."""
    made: list[Stage] = []

    def make(answer: Callable = policy(), **env: str) -> Stage:
        made.append(Stage(tmp_path, answer, **env))
        return made[-1]
    try:
        yield make
    finally:
        for s in made:
            s.close()


# -- start-up -------------------------------------------------------------------------------------

def test_it_asks_risk_for_state_first_and_sends_no_order_before_the_answer(stage):
    s = stage(lambda req: HOLD if isinstance(req, Control) else pending(req))
    wait_for(lambda: s.risk.seen(), WAIT_S, "the first request")
    first = s.risk.seen()[0]
    assert isinstance(first, Control) and first.action is ControlAction.STATE and first.by == "strategy"
    # the features get ready and the signal says BUY: the core wants to enter, but risk has not answered
    s.pump(lambda: s.core.stats["blocked_unreachable"] > 0, "an entry held back")
    s.settled()
    assert s.risk.seen(OrderRequest) == [] and s.svc.stats["orders"] == 0
    assert s.svc.status == "starting" and not s.svc.reachable

    s.risk.policy = policy({})
    s.risk.release()
    req = s.until_order()
    assert req.side is Side.BUY and s.svc.stats["state_syncs"] >= 1 and s.svc.status == "ok"
    seen = s.risk.seen()
    before = seen[:seen.index(req)]
    assert before and all(isinstance(r, Control) and r.action is ControlAction.STATE for r in before)


def test_the_position_risk_reports_at_start_is_the_strategys_own(stage):
    # 0.005 BTC held (say, from a run before): a BUY signal sends no entry; the time stop sells it
    s = stage(policy({SYM: "0.005"}), QF_STRATEGY_MAX_HOLD_MS="150")
    wait_for(lambda: s.svc.stats["state_syncs"] == 1, WAIT_S, "the STATE answer")
    assert s.core.position(SYM) == Decimal("0.005")
    req = s.until_order()
    assert (req.side, req.kind, req.qty, req.symbol) == (Side.SELL, OrderKind.MARKET, Decimal("0.005"), SYM)
    assert s.core.stats["exits_time_stop"] == 1 and s.core.stats["entries_limit"] == 0


# -- an entry ---------------------------------------------------------------------------------------

def test_an_entry_rests_then_the_brokers_fill_and_order_events_fill_and_end_it(stage):
    s = stage()
    req = s.until_order()
    assert (req.side, req.kind, req.tif, req.symbol) == (Side.BUY, OrderKind.LIMIT, TimeInForce.GTX, SYM)
    assert req.price == Decimal("60000.00") and req.qty == QTY  # post-only at the best bid
    assert req.strategy == "ofi" and req.client_order_id.startswith(f"ofi-{s.svc.start_ns:x}-")
    assert req.confidence == pytest.approx(0.8) and req.signal_ts > 0
    w = s.until_working("open")  # answered PENDING: it rests
    assert w.client_order_id == req.client_order_id and s.core.position(SYM) == 0

    # the broker fills it: published until heard (the same fill_id again and again counts once)
    s.publish_until(s.broker, f"fill.{SYM}", fill_of(req, "f-1"), lambda: s.core.position(SYM) != 0, "the fill")
    assert s.core.position(SYM) == QTY and s.core.stats["fills"] == 1
    assert s.core.working(SYM) is w  # filled whole, but the broker has not said the order ended
    s.publish_until(s.broker, f"order.{SYM}", order_event(req, OrderStatus.FILLED, QTY),
                    lambda: s.core.working(SYM) is None, "the FILLED order event")
    s.settled()
    assert s.core.position(SYM) == QTY and s.svc.stats["orders"] == 1  # long: a BUY signal sends no more
    assert s.svc.stats["approved"] == 1 and s.svc.stats["errors"] == 0


# -- risk silent -------------------------------------------------------------------------------------

def test_silent_risk_stops_trading_and_state_is_asked_every_heartbeat_until_it_answers(stage):
    talks = threading.Event()
    talks.set()
    held = {SYM: "0"}

    def answer(req):
        if isinstance(req, OrderRequest) and talks.is_set() and not silenced:
            talks.clear()  # the first order meets a silent risk, and so does every STATE after it
            silenced.append(req)
        if not talks.is_set():
            return None
        return policy(held)(req)

    silenced: list = []
    s = stage(answer, QF_STRATEGY_TIMEOUT_MS="50", QF_STRATEGY_RETRIES="2")
    req = s.until_order()
    wait_for(lambda: s.core.rejections.get("NO_REPLY"), WAIT_S, "the order given up")
    assert not s.svc.reachable and s.svc.status == "risk_silent" and s.svc.stats["risk_silent"] == 1
    wait_for(lambda: len(s.risk.seen(OrderRequest)) == 2, WAIT_S, "the second attempt")
    attempts = s.risk.payloads(OrderRequest)
    assert attempts == [attempts[0]] * 2, "a retry resends the same bytes"

    # no more orders: the BUY signal goes on, the core is held back
    blocked = s.core.stats["blocked_unreachable"]
    s.pump(lambda: s.core.stats["blocked_unreachable"] > blocked, "an entry held back")
    s.settled()
    assert s.svc.stats["orders"] == 1 and len(s.risk.seen(OrderRequest)) == 2

    # STATE asked again every heartbeat: new requests (a new ts each), each tried RETRIES times
    states_before = len(set(s.risk.payloads(Control)))
    wait_for(lambda: len(set(s.risk.payloads(Control))) >= states_before + 2, WAIT_S, "STATE asked again")

    # the broker had the order all the same, and fills it: in the position though risk never answered
    s.publish_until(s.broker, f"fill.{SYM}", fill_of(req, "f-1"), lambda: s.core.position(SYM) == QTY,
                    "the fill of the unanswered order")
    s.publish_until(s.broker, f"order.{SYM}", order_event(req, OrderStatus.FILLED, QTY),
                    lambda: s.core.working(SYM) is None, "its FILLED event")
    assert s.svc.stats["orders"] == 1 and not s.svc.reachable

    # risk answers again (it holds what the broker filled): trading resumes; a strong SELL exits
    held[SYM] = str(QTY)
    talks.set()
    wait_for(lambda: s.svc.reachable, WAIT_S, "risk reachable again")
    assert s.svc.status == "ok" and s.core.position(SYM) == QTY
    exit_ = s.until_order(3, bq=1.0, aq=9.0)
    assert (exit_.side, exit_.kind, exit_.qty) == (Side.SELL, OrderKind.MARKET, QTY)
    assert exit_.client_order_id != req.client_order_id and s.core.stats["exits_reversal"] == 1


# -- REDUCING / HALTED -------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [TradingState.REDUCING, TradingState.HALTED])
def test_reducing_or_halted_cancels_the_resting_entry_and_stops_entries(stage, state):
    s = stage()
    req = s.until_order()
    s.until_working("open")
    news = RiskState(ts=time.time_ns(), state=state, reason="test", equity=Decimal("10000"), drawdown=Decimal(0))
    s.publish_until(s.risk_pub, "risk.state", news, lambda: s.risk.seen(Cancel), "the cancel")
    [cancel] = s.risk.seen(Cancel)
    assert cancel.client_order_id == req.client_order_id and s.core.stats["cancels_state"] == 1
    wait_for(lambda: s.core.working(SYM) is None, WAIT_S, "the cancel's answer")

    for _ in range(20):  # a BUY signal all along: no entry
        s.book()
    s.settled()
    assert s.svc.stats["orders"] == 1 and s.core.state is state

    active = RiskState(ts=time.time_ns(), state=TradingState.ACTIVE, reason="test", equity=Decimal("10000"),
                       drawdown=Decimal(0))
    s.publish_until(s.risk_pub, "risk.state", active, lambda: s.core.state is TradingState.ACTIVE, "ACTIVE")
    again = s.until_order(2)  # it was the state that held the entries back
    assert again.side is Side.BUY and again.client_order_id != req.client_order_id


# -- signals --------------------------------------------------------------------------------------

def test_each_orders_signal_is_published_and_stored(stage, tmp_path):
    s = stage(policy(order=lambda req: rejected(req, "MAX_POSITION")), QF_STRATEGY_COOLDOWN_MS="60000")
    s.heard(lambda topic, msg: topic == "heartbeat.strategy", "a heartbeat (our SUB has joined)")
    req = s.until_order()
    topic, sig = s.heard(lambda topic, msg: isinstance(msg, SignalEvent) and msg.client_order_id, "the order's signal")
    assert topic == f"signal.{SYM}" and sig.TYPE == "signal"
    assert (sig.symbol, sig.side, sig.action, sig.client_order_id) == (SYM, "BUY", "entry", req.client_order_id)
    assert sig.confidence == pytest.approx(0.8) and sig.features["depth_imbalance"] == pytest.approx(0.8)
    assert set(sig.features) >= {"mid", "spread_bps", "ofi_l1_20ms", "ofi_multi_20ms", "trade_flow_20ms",
                                 "vol_1s", "momentum_0.02s", "spread_ratio"}
    assert sig.update_id > 0 and sig.recv_ts == req.signal_ts
    s.settled()
    published = s.svc.stats["signals"]
    s.stop()  # the writer stores what it holds before it stops

    con = sqlite3.connect(str(tmp_path / "qf.db"))
    try:
        rows = con.execute("SELECT symbol, side, confidence, features, client_order_id, action FROM signals "
                           "WHERE client_order_id != ''").fetchall()
        total = con.execute("SELECT COUNT(*) FROM signals").fetchone()[0]
    finally:
        con.close()
    [(symbol, side, confidence, features, cid, action)] = rows
    assert (symbol, side, cid, action) == (SYM, "BUY", req.client_order_id, "entry")
    assert confidence == pytest.approx(0.8) and json.loads(features)["depth_imbalance"] == pytest.approx(0.8)
    assert total == published and s.svc.writer.stats["signal_rows_stored"] == published


# -- heartbeat --------------------------------------------------------------------------------------

def test_the_heartbeat_carries_decision_times_and_rejections_by_reason(stage):
    s = stage(policy(order=lambda req: rejected(req, "MAX_POSITION")), QF_STRATEGY_COOLDOWN_MS="60000")
    s.until_order()
    _, beat = s.heard(lambda topic, msg: isinstance(msg, Heartbeat) and (msg.stats or {}).get("rejected_MAX_POSITION"),
                      "a heartbeat after the rejection")
    stats = beat.stats
    assert beat.service == "strategy" and beat.status == "ok"
    assert stats["rejected_MAX_POSITION"] == 1 and stats["rejected"] == 1 and stats["orders"] == 1
    assert isinstance(stats["decision_us_p50"], int) and isinstance(stats["decision_us_p99"], int)
    assert 0 <= stats["decision_us_p50"] <= stats["decision_us_p99"] <= stats["decision_us_max"]
    assert stats["decision_n"] >= 1 and stats["risk_reachable"] is True
    assert s.core.working(SYM) is None  # a sure rejection: nothing works


# -- bad input -----------------------------------------------------------------------------------------

def test_garbage_on_every_socket_is_counted_and_trading_goes_on(stage):
    foreign = Decision(ts=1, client_order_id="someone-else-1", verdict=Verdict.APPROVED, qty=Decimal(1))
    answers = [b"\xc1 not msgpack", foreign, state_reply()]  # the first three orders' answers

    def answer(req):
        if isinstance(req, OrderRequest) and answers:
            return answers.pop(0)
        return policy()(req)

    s = stage(answer)
    # first the SUBs on the broker's and risk's PUBs must have joined: a garbage frame is sent once
    stranger = OrderEvent(ts=1, order_id="x", client_order_id="other-1", symbol=SYM, status=OrderStatus.FILLED,
                          filled_qty=Decimal(0))
    s.publish_until(s.broker, f"order.{SYM}", stranger, lambda: s.svc.stats["order_events"], "the broker SUB")
    reducing = RiskState(ts=1, state=TradingState.REDUCING, reason="t", equity=Decimal(1), drawdown=Decimal(0))
    s.publish_until(s.risk_pub, "risk.state", reducing, lambda: s.core.state is TradingState.REDUCING,
                    "the risk SUB")
    s.pump(lambda: s.svc.stats["books"], "the md SUB")
    s.settled()
    assert s.svc.stats["decode_errors"] == 0
    s.md.sock.send_multipart([f"book.{SYM}".encode(), b"\xc1 not msgpack"])
    s.broker.sock.send_multipart([f"fill.{SYM}".encode(), b"\x93\x01\x02\x03"])  # msgpack, not a message
    s.risk_pub.sock.send_multipart([b"risk.state", b"\xc1"])
    s.risk_pub.publish("risk.state", RiskState(ts=1, state=TradingState.ACTIVE, reason="t", equity=Decimal(1),
                                               drawdown=Decimal(0)))
    wait_for(lambda: s.core.state is TradingState.ACTIVE, WAIT_S, "ACTIVE after the garbage")
    s.settled()
    assert s.svc.stats["decode_errors"] == 3

    # risk answers garbage, a decision of another order, a reply of another kind: each a BAD_ANSWER
    # (the order's fate unknown: its fills would still count); the fourth order is answered right
    fourth = s.until_order(4)
    s.until_working("open")
    assert s.core.working(SYM).client_order_id == fourth.client_order_id
    assert s.core.rejections == {"BAD_ANSWER": 3} and s.svc.stats["rejected"] == 3
    assert s.svc.stats["decode_errors"] == 4 and s.svc.stats["errors"] == 0

    # a fill that is not credible of its order (a SELL of a BUY, below a flat spot position): refused, counted
    wrong = Fill(ts=1, fill_id="f-x", order_id="o-" + fourth.client_order_id, client_order_id=fourth.client_order_id,
                 symbol=SYM, side=Side.SELL, price=Decimal("60000"), qty=QTY, fee=Decimal(0), fee_asset="USDT",
                 liquidity=Liquidity.MAKER, exch_ts=1)
    s.broker.publish(f"fill.{SYM}", wrong)
    wait_for(lambda: s.svc.stats["errors"], WAIT_S, "the fill refused")
    assert s.svc.stats["errors"] == 1 and s.core.position(SYM) == 0 and s.core.stats["fills"] == 0
    s.publish_until(s.broker, f"fill.{SYM}", fill_of(fourth, "f-4"), lambda: s.core.position(SYM) == QTY,
                    "a credible fill after it")
    assert s.thread.is_alive()


def test_an_unwritable_database_costs_signal_rows_never_orders(stage, tmp_path):
    (tmp_path / "a-directory").mkdir()
    s = stage(policy(order=lambda req: rejected(req, "MAX_POSITION")), QF_DB=str(tmp_path / "a-directory"))
    s.until_order()
    wait_for(lambda: s.svc.writer.stats["signal_store_failures"], WAIT_S, "the signals' store to fail")
    n = len(s.risk.seen(OrderRequest))
    s.until_order(n + 1)  # after the failure, orders still go out
    assert s.svc.writer.stats["signal_rows_stored"] == 0 and s.svc.writer.failing
    assert s.svc.writer.stats["signal_rows_waiting"] >= 1
    s.stop()  # a writer that cannot store does not hold up the stop
    assert not s.svc.writer._thread.is_alive()


# -- races and recoveries ------------------------------------------------------------------------------

def test_a_pending_answer_slower_than_the_brokers_stream_does_not_reopen_a_filled_order(stage):
    # risk relays the broker's ack (PENDING: taken when the order was accepted); the broker's own PUB is a
    # hop shorter, so the order's fill and its FILLED event can come first
    s = stage(policy(order=lambda req: HOLD))
    req = s.until_order()
    s.publish_until(s.broker, f"fill.{SYM}", fill_of(req, "f-1"), lambda: s.core.position(SYM) == QTY, "the fill")
    seen = s.svc.stats["order_events"]
    s.broker.publish(f"order.{SYM}", order_event(req, OrderStatus.FILLED, QTY))
    s.broker.publish(f"order.{SYM}", OrderEvent(ts=1, order_id="x", client_order_id="other-1", symbol=SYM,
                                                status=OrderStatus.FILLED, filled_qty=Decimal(0)))
    wait_for(lambda: s.svc.stats["order_events"] >= seen + 2, WAIT_S, "both order events")
    s.risk.policy = policy()
    s.risk.release()
    wait_for(lambda: s.svc.stats["approved"] == 1, WAIT_S, "the late decision")
    assert s.core.working(SYM) is None, "the filled order came back as a resting one"
    assert s.core.position(SYM) == QTY and s.core.stats["fills"] == 1


def test_a_state_risk_tells_on_its_return_cancels_the_resting_entry_at_once(stage):
    s = stage(policy(), QF_SYMBOLS="btcusdt,ethusdt", QF_STRATEGY_TIMEOUT_MS="50", QF_STRATEGY_RETRIES="1")
    btc = s.until_order()
    s.until_working("open")

    def silent_on_eth(req):
        if isinstance(req, Control):
            return HOLD
        if isinstance(req, OrderRequest) and req.symbol == "ETHUSDT":
            return None
        return policy()(req)
    s.risk.policy = silent_on_eth
    s.until_order(2, symbol="ETHUSDT")
    wait_for(lambda: s.core.rejections.get("NO_REPLY"), WAIT_S, "the ETH order given up")
    s.settled()
    blocked = s.core.stats["blocked_unreachable"]
    assert not s.svc.reachable and s.core.working(SYM).phase == "open"

    s.risk.policy = lambda req: state_reply(state=TradingState.REDUCING) if isinstance(req, Control) else \
        policy()(req)
    s.risk.release()
    wait_for(lambda: s.risk.seen(Cancel), WAIT_S, "the cancel")
    assert s.risk.seen(Cancel)[0].client_order_id == btc.client_order_id
    assert s.core.stats["blocked_unreachable"] == blocked, "the state's cancel waited for a tick"
    assert s.core.stats["cancels_state"] == 1


def _signal(k: int) -> Signal:
    return Signal(symbol=SYM, ts=k, side=Side.BUY, confidence=0.5, score=0.5, features={"mid": 1.0}, update_id=k,
                  recv_ts=k)


def test_the_signal_writer_retries_every_retry_s_not_at_every_signal_and_then_stores_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(signals_mod, "RETRY_S", 1.5)
    target = tmp_path / "later.db"
    target.mkdir()  # a directory: refused until it goes
    writer = signals_mod.SignalWriter(str(target))
    writer.start()
    try:
        writer.put([_signal(0)])
        wait_for(lambda: writer.stats["signal_store_failures"], WAIT_S, "the first failure")
        for k in range(1, 11):  # a signal every 20 ms: none of them may start a retry before RETRY_S
            time.sleep(0.02)  # pacing: puts that find the writer waiting (not a synchronisation)
            writer.put([_signal(k)])
        target.rmdir()
        wait_for(lambda: writer.stats["signal_rows_stored"] == 11, WAIT_S, "the retry")
        assert writer.stats["signal_store_failures"] == 1 and writer.failing is None
        assert writer.stats["signal_rows_waiting"] == 0
    finally:
        writer.stop()
    con = sqlite3.connect(str(target))
    try:
        assert [r[0] for r in con.execute("SELECT update_id FROM signals ORDER BY id")] == list(range(11))
    finally:
        con.close()


def test_the_signal_writer_stores_what_it_holds_when_stopped(tmp_path):
    writer = signals_mod.SignalWriter(str(tmp_path / "qf.db"))
    writer.put([_signal(k) for k in range(5)])  # before the thread runs: its notify reaches no one
    writer.start()
    writer.stop()
    assert writer.stats["signal_rows_stored"] == 5 and not writer._thread.is_alive()
    con = sqlite3.connect(str(tmp_path / "qf.db"))
    try:
        assert con.execute("SELECT COUNT(*) FROM signals").fetchone()[0] == 5
    finally:
        con.close()
