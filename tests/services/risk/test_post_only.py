"""Risk and post-only (GTX) LIMIT orders: they count as resting; a broker WOULD_TAKE is relayed, not refused."""
from __future__ import annotations

from decimal import Decimal as D

import msgpack
import pytest

from services.broker import core as broker_core
from services.broker.core import Order, ack_for
from services.broker.service import BrokerService
from services.risk.checks import Reason, SymbolRules
from services.risk.core import Approval, RiskEngine
from services.risk.limits import RiskLimits
from services.risk.service import RiskService
from services.risk.vet import vet_ack
from shared import messages
from shared.bus import Publisher
from shared.config import load
from shared.enums import OrderKind, OrderStatus, Side, TimeInForce, Verdict
from shared.messages import Cancel, OrderRequest

S = 1_000_000_000
T0 = 1_700_000_000 * S
RULES = SymbolRules("BTCUSDT", lot_size=D("0.001"), tick_size=D("0.5"), min_notional=D("0.1"),
                    max_order_notional=D("2"), max_position=D("0.01"), max_notional=D("1.5"))
ASKS = [[100.5, 0.004], [101.0, 0.5]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


def order(coid: str, qty: str = "0.005", side=Side.BUY, kind=OrderKind.LIMIT, price: str | None = "100",
          tif=TimeInForce.GTX) -> OrderRequest:
    return OrderRequest(ts=T0, client_order_id=coid, strategy="test", symbol="BTCUSDT", side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price), tif=tif)


# -- the pure core and the vetting ---------------------------------------------------------------

def test_a_post_only_limit_counts_as_an_open_order():
    eng = RiskEngine(RiskLimits(rules={"BTCUSDT": RULES}, stale_book_ms=1000, max_open_orders=1, orders_per_s=100,
                                orders_per_min=6000), D("1000"))
    eng.on_book("BTCUSDT", 100.25, T0)
    assert isinstance(eng.check(order("a"), T0), Approval)
    eng.on_sent("a", "BTCUSDT", Side.BUY, D("0.005"), True, T0)  # what the desk reports for it (below)
    assert eng.check(order("b"), T0).code == Reason.MAX_OPEN_ORDERS  # a second post-only: too many
    assert eng.check(order("c", tif=TimeInForce.GTC), T0).code == Reason.MAX_OPEN_ORDERS
    assert isinstance(eng.check(order("d", tif=TimeInForce.IOC), T0), Approval)  # never rests
    assert isinstance(eng.check(order("e", kind=OrderKind.MARKET, price=None, tif=TimeInForce.GTC), T0), Approval)


def test_a_would_take_rejection_without_fills_passes_the_vetting():
    req = order("w", price="100.5")
    rejected = Order.rejected(req, "o-w", T0, broker_core.WOULD_TAKE)
    wire = msgpack.unpackb(messages.encode(ack_for(rejected, [], T0)))
    status, filled, fills = vet_ack(wire, "w", "BTCUSDT", Side.BUY, D("0.005"), D("100.5"),
                                    {"BTCUSDT": ("USDT", "BTC")}, {"BTCUSDT": D("100.25")}, D(1000))
    assert (status, filled, fills, wire["reason"]) == (OrderStatus.REJECTED, D(0), [], "WOULD_TAKE")


# -- risk in front of a real broker, over real sockets -------------------------------------------

@pytest.fixture
def risk_env(env):
    return {**env, "QF_RISK_BROKER_TIMEOUT_MS": "500", "QF_RISK_MAX_POSITION": "0.01",
            "QF_RISK_STALE_BOOK_MS": "5000", "QF_RISK_ADJUST": "false", "QF_RISK_MAX_OPEN_ORDERS": "1"}


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
def stack(rcfg, runner, md, make_book, feed):
    broker = runner.start(BrokerService(rcfg))
    risk = runner.start(RiskService(rcfg))
    feed(md, make_book(bids=BIDS, asks=ASKS),
         lambda: "BTCUSDT" in broker.books and "BTCUSDT" in risk.engine.book_ns)
    return broker, risk


@pytest.fixture
def client(rcfg, clients):
    return clients(rcfg.bus.risk_rep)


def settled(client) -> None:
    """Risk answers first and settles after; a request behind the answer sees it settled."""
    client.request(messages.Control(ts=1, action="STATE", by="test"))


def test_a_would_take_rejection_is_relayed_in_an_approved_decision(stack, client, rcfg, db_rows):
    broker, risk = stack
    decision = client.request(order("cross", "0.002", price="100.5"))  # the best ask: it would take
    assert (decision.verdict, decision.reason, decision.qty) == (Verdict.APPROVED, None, D("0.002"))
    assert (decision.order.status, decision.order.reason, decision.order.fills) == (
        OrderStatus.REJECTED, "WOULD_TAKE", [])
    settled(client)
    assert risk.stats["broker_rejected"] == 1 and risk.stats["bad_acks"] == 0
    assert risk.engine.working == {} and risk.engine.ledger.qty("BTCUSDT") == 0
    assert db_rows(rcfg.common.db, "SELECT tif, status, reason FROM orders WHERE client_order_id = 'cross'") == [
        ("GTX", "REJECTED", "WOULD_TAKE")]


def test_a_resting_post_only_order_holds_the_open_order_slot_until_cancelled(stack, client, rcfg, runner,
                                                                             risk_env, clients):
    broker, risk = stack
    rest = client.request(order("touch", "0.003", price="100"))  # at the best bid: it rests
    assert rest.verdict is Verdict.APPROVED and rest.order.status is OrderStatus.PENDING
    settled(client)
    work = risk.engine.working["touch"]
    assert (work.rests, work.remaining, work.expires_ns) == (True, D("0.003"), 0)
    assert client.request(order("second", "0.001", price="99.5")).reason["code"] == "MAX_OPEN_ORDERS"
    assert client.request(order("ioc", "0.001", price="99.5", tif=TimeInForce.IOC)).verdict is Verdict.APPROVED

    runner.stop(risk)  # a restarted risk rebuilds it from the database as resting, too
    cfg2 = load({**risk_env, "QF_RISK_REP": rcfg.bus.risk_rep + "-2", "QF_RISK_PUB": rcfg.bus.risk_pub + "-2"})
    risk2 = runner.start(RiskService(cfg2))
    assert risk2.engine.working["touch"].rests is True
    c2 = clients(cfg2.bus.risk_rep)
    assert c2.request(Cancel(ts=2, client_order_id="touch")).status is OrderStatus.CANCELLED
    settled(c2)
    assert risk2.engine.working == {}
