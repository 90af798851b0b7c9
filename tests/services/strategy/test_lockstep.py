"""StrategyService in a lock-step replay (QF_LOCKSTEP, shared/lockstep.py), over real sockets: the
test plays the conductor (an XPUB for market data, a PULL for the reports) and risk (a ROUTER it
answers itself, when it chooses)."""
from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest
import zmq

from services.strategy.service import StrategyService
from shared import messages
from shared.bus import Server
from shared.enums import Liquidity, OrderStatus, Side, Verdict
from shared.messages import Ack, Clock, Decision, Fill, OrderRequest
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
