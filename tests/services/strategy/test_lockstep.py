"""StrategyService and OfiService in a lock-step replay (QF_LOCKSTEP, shared/lockstep.py), over real sockets: the
test plays the conductor (an XPUB for market data, a PULL for the reports) and risk (a ROUTER it
answers itself, when it chooses)."""
from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest
import zmq

from services.strategy.core import OrderIntent
from services.strategy.live import OfiService
from services.strategy.ofi import CancelIntent
from services.strategy.service import StrategyService
from shared import messages
from shared.bus import Server
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TimeInForce, TradingState, Verdict
from shared.messages import (Ack, Cancel, Clock, Control, ControlReply, Decision, Error, Fill, OrderEvent, OrderRequest,
                             RiskState, Trade)
from tests.conftest import wait_for
from tests.fakes.lockstep_taps import WAIT_S, Reports, XPub

T1 = 1_700_000_000_000_000_000
T2, T3, T4 = T1 + 100_000_000, T1 + 200_000_000, T1 + 300_000_000


def filled(req: OrderRequest, price: str = "100.5") -> Decision:
    """Risk approves and the broker fills all of `req` at `price`."""
    oid = "o-" + req.client_order_id
    fill = Fill(ts=req.ts, fill_id=f"{oid}-1", order_id=oid, client_order_id=req.client_order_id, symbol=req.symbol,
                side=req.side, price=Decimal(price), qty=req.qty, fee=Decimal(0), fee_asset="USDT",
                liquidity=Liquidity.TAKER, exch_ts=1)
    ack = Ack(ts=req.ts, client_order_id=req.client_order_id, order_id=oid, status=OrderStatus.FILLED,
              filled_qty=req.qty, avg_price=Decimal(price), fills=[fill])
    return Decision(ts=req.ts, client_order_id=req.client_order_id, verdict=Verdict.APPROVED, qty=req.qty, order=ack)


class Risk:
    """A ROUTER standing for risk: `take()` the next request, `answer()` it when the test says."""

    def __init__(self, endpoint: str) -> None:
        self.server = Server(endpoint)

    def take(self) -> tuple[list[bytes], OrderRequest]:
        assert self.server.sock.poll(int(WAIT_S * 1000)), "no order reached risk"
        envelope, payload = self.server.recv()
        return envelope, messages.decode(payload, messages.REQUESTS)

    def answer(self, envelope: list[bytes], reply: messages.Message) -> None:
        self.server.reply(envelope, messages.encode(reply))


@pytest.fixture
def stage(config, tmp_path):
    """(service, md XPUB, reports, risk) for a lock-step strategy trading BTCUSDT and ETHUSDT, running."""
    tag = uuid.uuid4().hex[:10]
    md, reports, risk = XPub(f"inproc://{tag}-md"), Reports(f"inproc://{tag}-lockstep"), Risk(f"inproc://{tag}-risk")
    cfg = config(QF_MD_PUB=md.endpoint, QF_RISK_REP=f"inproc://{tag}-risk", QF_LOCKSTEP=f"inproc://{tag}-lockstep",
                 QF_RUN_DIR=str(tmp_path / "run"), QF_SYMBOLS="btcusdt,ethusdt", QF_BROKER_SEED="7",
                 QF_STRATEGY_IMBALANCE="0.6", QF_STRATEGY_COOLDOWN_MS="0", QF_HEARTBEAT_MS="50",
                 QF_STRATEGY_TIMEOUT_MS="10", QF_STRATEGY_RETRIES="1")  # no timeout may apply in lock-step
    svc = StrategyService(cfg)
    thread = threading.Thread(target=svc.run, name="strategy", daemon=True)
    thread.start()
    try:
        yield svc, md, reports, risk
    finally:
        svc.stop()
        thread.join(WAIT_S)
        for s in (md, reports):
            s.close()
        risk.server.close()
        assert not thread.is_alive(), "strategy did not stop within the bound"


def test_orders_on_the_books_time_every_book_to_the_core_while_waiting_and_counted(stage, book):
    svc, md, reports, risk = stage
    md.joined("book.", "clock")
    md.publish("clock", Clock(ts=0))  # the handshake: hello, and no time
    assert reports.until(hello=True) == {"service": "strategy", "hello": True, "md": 0, "orders_sent": 0,
                                         "answers_in": 0}

    md.publish("book.BTCUSDT", book(imbalance=0.9, recv_ts=T1 - 500, ts=T1))
    env_btc, buy = risk.take()
    # the capture's time, and the backtest's names (f"{strategy}-r{seed}-n")
    assert (buy.ts, buy.signal_ts, buy.client_order_id, buy.side) == (T1, T1 - 500, "imbalance-r7-1", Side.BUY)
    reports.until(md=1, orders_sent=1, answers_in=0)  # told before it waits

    # While BTCUSDT's order waits: its book still reaches the core (ignored: an order in flight), a
    # tick is counted, and ETHUSDT's signal is an order at once, on its own REQ.
    md.publish("book.BTCUSDT", book(imbalance=-0.9, recv_ts=T2, update_id=2))
    md.publish("clock", Clock(ts=T2 + 1))
    md.publish("book.ETHUSDT", book(symbol="ETHUSDT", imbalance=0.9, recv_ts=T3, update_id=3))
    env_eth, eth = risk.take()
    assert (eth.ts, eth.client_order_id, eth.symbol, eth.side) == (T3, "imbalance-r7-2", "ETHUSDT", Side.BUY)
    reports.until(md=4, orders_sent=2, answers_in=0)
    assert svc.core.features.imbalance["BTCUSDT"] == -0.9 and svc.core.features.books == 3
    # past QF_STRATEGY_TIMEOUT_MS (10 ms): no Lazy Pirate resend, no local rejection
    assert not risk.server.sock.poll(100) and svc.stats["no_reply"] == 0

    risk.answer(env_eth, filled(eth))
    risk.answer(env_btc, filled(buy))
    reports.until(answers_in=2)
    assert (svc.core.position("BTCUSDT"), svc.core.position("ETHUSDT")) == (Decimal("0.001"), Decimal("0.001"))
    assert svc.core.in_flight("BTCUSDT") is None and svc.core.in_flight("ETHUSDT") is None

    md.publish("book.BTCUSDT", book(imbalance=-0.9, recv_ts=T4, update_id=4))
    env, sell = risk.take()
    assert (sell.ts, sell.client_order_id, sell.side, sell.qty) == (T4, "imbalance-r7-3", Side.SELL, Decimal("0.001"))
    reports.until(md=5, orders_sent=3, answers_in=2)
    risk.answer(env, filled(sell))
    assert reports.until(answers_in=3) == {"service": "strategy", "hello": True, "md": 5, "orders_sent": 3,
                                           "answers_in": 3}
    assert svc.core.position("BTCUSDT") == 0 and svc.stats["stale_books"] == 0


def test_every_book_counts_traded_or_not_and_an_unreadable_frame_does_not(stage, book):
    """The conductor counts the books it published: each counts once handled, whatever its symbol; a
    frame that cannot be read counts as nothing (the conductor then names the strategy as behind)."""
    svc, md, reports, risk = stage
    md.joined("book.", "clock")
    md.publish("clock", Clock(ts=0))
    reports.until(hello=True)
    md.publish("book.DOGEUSDT", book(symbol="DOGEUSDT", imbalance=0.9, recv_ts=T1))
    md.sock.send_multipart([b"book.BTCUSDT", b"\xc1 not msgpack"])
    md.publish("book.BTCUSDT", book(imbalance=0.1, recv_ts=T2))
    assert reports.until(md=2)["orders_sent"] == 0
    assert (svc.stats["other_symbols"], svc.stats["books"], svc.stats["decode_errors"]) == (1, 1, 1)
    assert not risk.server.sock.poll(0)


# -- the OFI strategy (OfiService), a stepped strategy ------------------------------------------

class RecordingCore:
    """Stands for OfiStrategy inside OfiService: records each call `(what, now)` and answers with
    the actions the test scripted for it (`script[what]`: a list, taken once)."""

    def __init__(self, id_prefix: str) -> None:
        from collections import defaultdict
        self.id_prefix = id_prefix
        self.calls: list[tuple[str, int]] = []
        self.script: dict[str, list] = defaultdict(list)
        self.stats: dict[str, int] = {}
        self.rejections: dict[str, int] = {}
        self.synced = None

    def _did(self, what: str, now: int) -> list:
        self.calls.append((what, now))
        return self.script.pop(what, [])

    def trades(self, symbol: str) -> bool:
        return symbol == "BTCUSDT"

    def position(self, symbol: str) -> Decimal:
        return Decimal(0)

    def on_book(self, book, now):
        return self._did("book", now)

    def on_trade(self, trade, now):
        self._did("trade", now)

    def on_fill(self, fill, now):
        return self._did("fill", now)

    def on_order(self, event, now):
        return self._did("order", now)

    def on_risk_state(self, state, now):
        return self._did(f"state:{state.value}", now)

    def on_decision(self, decision, now):
        return self._did(f"decision:{decision.verdict.value}", now)

    def on_cancel_answer(self, cid, ack, code, now):
        return self._did(f"cancel_answer:{code}", now)

    def tick(self, now):
        return self._did("tick", now)

    def sync(self, positions, now):
        self.synced = positions

    def set_risk_reachable(self, ok, now):
        pass

    def take_signals(self):
        return []


@pytest.fixture
def ofi_stage(config, tmp_path):
    """(service, its recording core, md, broker PUB, risk PUB, reports, risk ROUTER): an OfiService in
    lock-step, running (QF_BROKER_SEED=7)."""
    tag = uuid.uuid4().hex[:10]
    md, broker_pub, risk_pub = (XPub(f"inproc://{tag}-{n}") for n in ("md", "broker-pub", "risk-pub"))
    reports, risk = Reports(f"inproc://{tag}-lockstep"), Risk(f"inproc://{tag}-risk")
    cfg = config(QF_STRATEGY_KIND="ofi", QF_MD_PUB=md.endpoint, QF_BROKER_PUB=broker_pub.endpoint,
                 QF_RISK_PUB=risk_pub.endpoint, QF_RISK_REP=f"inproc://{tag}-risk",
                 QF_STRATEGY_PUB=f"inproc://{tag}-strategy-pub", QF_LOCKSTEP=f"inproc://{tag}-lockstep",
                 QF_RUN_DIR=str(tmp_path / "run"), QF_DB=str(tmp_path / "qf.db"), QF_SYMBOLS="btcusdt",
                 QF_BROKER_SEED="7", QF_HEARTBEAT_MS="50", QF_STRATEGY_TIMEOUT_MS="60000",
                 QF_STRATEGY_RETRIES="1")
    svc = OfiService(cfg)
    assert svc.core.id_prefix == "ofi-r7"  # the backtest's names (`{name}-r{seed}`), not a start time
    core = svc.core = RecordingCore(svc.core.id_prefix)
    thread = threading.Thread(target=svc.run, name="ofi-strategy", daemon=True)
    thread.start()
    try:
        yield svc, core, md, broker_pub, risk_pub, reports, risk
    finally:
        svc.stop()
        thread.join(WAIT_S)
        for s in (md, broker_pub, risk_pub, reports):
            s.close()
        risk.server.close()
        assert not thread.is_alive(), "the OFI strategy did not stop within the bound"


def test_the_ofi_strategy_says_hello_once_every_link_is_up_and_risk_told_it_its_positions(ofi_stage):
    svc, core, md, broker_pub, risk_pub, reports, risk = ofi_stage
    env, state = risk.take()  # STATE first, once its DEALER is connected
    assert isinstance(state, Control) and state.action.value == "STATE" and state.ts == 0
    md.joined("book.", "trade.", "clock", "step")
    broker_pub.joined("fill.", "order.", "clock")
    risk_pub.joined("risk.state", "clock")
    risk.answer(env, ControlReply(ts=0, state=TradingState.ACTIVE, reason="", positions={}, equity=Decimal(0)))
    wait_for(lambda: svc.synced, WAIT_S, "the STATE answer")
    md.publish("clock", Clock(ts=0))
    broker_pub.publish("clock", Clock(ts=0))
    wait_for(lambda: svc._links.get("md") and svc._links.get("broker"), WAIT_S, "the md and broker ticks")
    assert not svc.reporter.hello and not any(r.get("hello") for r in reports.seen)  # risk's PUB unheard
    risk_pub.publish("clock", Clock(ts=0))
    rep = reports.until(hello=True)
    assert rep["stepped"] is True and rep["held"] == 0 and rep["next_tick"] == 0
    assert core.synced == {} and core.calls == [("state:ACTIVE", 0)]


def test_the_ofi_strategy_works_only_on_steps_in_the_backtests_order_one_request_at_a_time(ofi_stage, book):
    svc, core, md, broker_pub, risk_pub, reports, risk = ofi_stage
    env, _ = risk.take()
    md.joined("book.", "trade.", "clock", "step")
    broker_pub.joined("fill.", "order.", "clock")
    risk_pub.joined("risk.state", "clock")
    for pub in (md, broker_pub, risk_pub):
        pub.publish("clock", Clock(ts=0))
    risk.answer(env, ControlReply(ts=0, state=TradingState.ACTIVE, reason="", positions={}, equity=Decimal(0)))
    reports.until(hello=True)
    core.calls.clear()

    # A record's book and trade are held (counted) and nothing decides until the step.
    entry = OrderIntent(client_order_id="ofi-r7-1", symbol="BTCUSDT", side=Side.BUY, qty=Decimal("0.001"),
                        kind=OrderKind.LIMIT, price=Decimal("100"), tif=TimeInForce.GTX, signal_ts=T1 - 5)
    core.script["book"] = [entry]
    md.publish("book.BTCUSDT", book(imbalance=0.9, recv_ts=T1 - 5, ts=T1))
    md.publish("trade.BTCUSDT", Trade(ts=T1, symbol="BTCUSDT", exch_ts=1, trade_id=1, price=Decimal("100"),
                                      qty=Decimal("0.01"), buyer_is_maker=False, recv_ts=T1))
    assert reports.until(md=2, held=2)["orders_sent"] == 0 and core.calls == []

    # The step: the book decides, its order goes out at the step's time, and the step ends there.
    md.publish("step.record", Clock(ts=T1))
    env, req = risk.take()
    assert (req.client_order_id, req.ts, req.tif, req.price) == ("ofi-r7-1", T1, TimeInForce.GTX, Decimal("100"))
    assert reports.until(steps=1, orders_sent=1, held=1)["next_tick"] == 0  # the trade waits, the timer too
    assert core.calls == [("book", T1)]

    # What came of it, and what came meanwhile: risk's answer, a broker event, a risk state.
    risk.answer(env, Decision(ts=T1, client_order_id="ofi-r7-1", verdict=Verdict.REJECTED,
                              reason={"code": "RATE_LIMIT", "text": "x"}))
    risk_pub.publish("risk.state", RiskState(ts=T1, state=TradingState.REDUCING, reason="r", equity=Decimal(1),
                                             drawdown=Decimal(0)))
    broker_pub.publish("order.BTCUSDT", OrderEvent(ts=T1, order_id="o", client_order_id="x", symbol="BTCUSDT",
                                                   status=OrderStatus.CANCELLED, filled_qty=Decimal(0)))
    reports.until(answers_in=1, events_in=1, states_in=1, held=4)
    assert core.calls == [("book", T1)]
    cancel = CancelIntent("ofi-r7-0", "BTCUSDT", "stale")
    core.script["tick"] = [cancel]
    md.publish("step.record", Clock(ts=T1))
    env, req = risk.take()
    assert isinstance(req, Cancel) and (req.client_order_id, req.ts) == ("ofi-r7-0", T1)
    # the answer first, the broker's event, risk's state, the rest of the record, then the timer
    assert core.calls == [("book", T1), ("decision:REJECTED", T1), ("order", T1), ("state:REDUCING", T1),
                          ("trade", T1), ("tick", T1)]
    assert reports.until(steps=2, cancels_sent=1, held=0)["next_tick"] == T1 + 50_000_000

    # The cancel's answer waits for a plain step (a broker due's): no timer there.
    risk.answer(env, Error(ts=T2, code="UNKNOWN_ORDER", text="ofi-r7-0"))
    reports.until(cancel_answers_in=1, held=1)
    md.publish("step", Clock(ts=T3))
    rep = reports.until(steps=3, held=0)
    assert core.calls[-1] == ("cancel_answer:UNKNOWN_ORDER", T3) and rep["next_tick"] == T1 + 50_000_000
    assert (rep["md"], rep["orders_sent"], rep["answers_in"], rep["cancels_sent"]) == (2, 1, 1, 1)
