"""Post-only (GTX) LIMIT orders: rejected WOULD_TAKE where they would take, else resting exactly as GTC."""
from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.broker import core
from services.broker.core import Order
from services.broker.fill_model import ARRIVED, FILLED, FillModel
from services.broker.latency import LatencyModel
from services.broker.queue import make_queue_model
from services.broker.service import BrokerService
from shared.config import load
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import Ack, Book, OrderEvent, OrderRequest, Trade
from shared.bus import Subscriber

S = OrderStatus
GTX, GTC = TimeInForce.GTX, TimeInForce.GTC
ASKS = [[100.5, 0.4], [101.0, 0.5], [102.0, 10.0]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


def book(bids=BIDS, asks=ASKS) -> Book:
    return Book(ts=0, symbol="BTCUSDT", exch_ts=7, update_id=1, bids=[list(b) for b in bids],
                asks=[list(a) for a in asks], mid=0.0, spread=0.0, spread_bps=0.0, imbalance=0.0, microprice=0.0)


def request(coid: str, qty: str, side: Side, price: str | None, tif=GTX, kind=OrderKind.LIMIT) -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="test", symbol="BTCUSDT", side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price), tif=tif)


def limit(coid: str, qty: str, side: Side, price: str, tif=GTX) -> Order:
    return Order.from_request(request(coid, qty, side, price, tif), f"o-{coid}", 0)


def model(maker="0.0002", taker="0.001") -> FillModel:
    return FillModel(D(taker), D(maker), make_queue_model("risk_averse", 2), LatencyModel("constant", 0))


def place(m: FillModel, o: Order, t: int):
    m.submit(o, t)
    [u] = m.advance(t)
    return u


# -- the fill model -------------------------------------------------------------------------

@pytest.mark.parametrize("side, price", [(Side.BUY, "100.5"), (Side.BUY, "101.5"), (Side.SELL, "100"),
                                         (Side.SELL, "99")], ids=["buy-at-ask", "buy-through", "sell-at-bid",
                                                                  "sell-through"])
def test_a_post_only_order_that_would_take_is_rejected_and_takes_nothing(side, price):
    m = model()
    m.on_book(book(), 0)
    u = place(m, limit("p", "0.2", side, price), 1)
    assert (u.event, u.order.status, u.order.reason, u.order.filled_qty, u.fills) == (
        ARRIVED, S.REJECTED, core.WOULD_TAKE, D(0), [])
    assert u.working.arrival_mid == D("100.25")  # stored with the order: the book it was refused against
    assert "p" not in m.working and not m.resting.get("BTCUSDT")
    assert m.markets["BTCUSDT"].taken == {True: {}, False: {}}  # nothing of the book was consumed
    best = "0.4" if side is Side.BUY else "0.3"  # what the opposite best level shows
    taker = place(m, Order.from_request(request("m", best, side, None, GTC, OrderKind.MARKET), "o-m", 2), 2)
    assert taker.order.filled_qty == D(best) and len(taker.fills) == 1  # the best level is all still there


def test_post_only_at_the_touch_rests_and_fills_as_maker_through_the_queue():
    m = model()
    m.on_book(book(), 0)
    u = place(m, limit("b", "0.5", Side.BUY, "100"), 1)
    assert (u.order.status, u.fills, u.order.tif) == (S.PENDING, [], GTX)
    assert m.working["b"].queue.ahead == 30_000_000  # 0.3 displayed at 100 is ahead of it
    assert m.on_trade(Trade(ts=2, symbol="BTCUSDT", exch_ts=9, trade_id=1, price=D("100"), qty=D("0.2"),
                            buyer_is_maker=True), 2) == []
    [u] = m.on_trade(Trade(ts=3, symbol="BTCUSDT", exch_ts=9, trade_id=2, price=D("100"), qty=D("0.35"),
                           buyer_is_maker=True), 3)
    assert (u.event, u.order.status) == (FILLED, S.PARTIALLY_FILLED)
    assert [(f.price, f.qty, f.liquidity, f.fee, f.queue_wait_ns) for f in u.fills] == [
        (D("100"), D("0.25"), Liquidity.MAKER, D("0.005"), 2)]  # 0.35 - 0.1 still ahead; 100 × 0.25 × 0.0002
    # inside the spread: nobody ahead; a book whose asks come down to it fills it, as maker, at its price
    inside = place(m, limit("s", "0.1", Side.SELL, "100.25"), 4)
    assert inside.order.status is S.PENDING and m.working["s"].queue.ahead == 0
    [u] = m.on_book(book(bids=[[100.25, 0.5]], asks=[[100.5, 1.0]]), 5)
    assert (u.client_order_id, [(f.price, f.qty, f.liquidity) for f in u.fills]) == (
        "s", [(D("100.25"), D("0.1"), Liquidity.MAKER)])


def test_post_only_is_for_limit_orders_only():
    with pytest.raises(ValueError, match="post-only"):
        Order.from_request(request("m", "1", Side.BUY, None, GTX, OrderKind.MARKET), "o", 0)


PRICES = st.integers(9_850, 10_200).map(lambda c: D(c) / 100)  # 98.50 .. 102.00, both sides of the book


@given(side=st.sampled_from([Side.BUY, Side.SELL]), price=PRICES,
       qty=st.sampled_from(["0.05", "0.3", "1", "20"]))
def test_post_only_is_gtc_unless_gtc_would_have_taken(side, price, qty):
    """Against the same book, a GTX order is REJECTED WOULD_TAKE exactly when a GTC order at its
    price takes liquidity on arrival; otherwise both end alike, in the same queue place."""
    outcome = {}
    for tif in (GTC, GTX):
        m = model()
        m.on_book(book(), 0)
        u = place(m, limit("x", qty, side, str(price), tif), 1)
        w = m.working.get("x")
        outcome[tif] = (u.order.status, u.order.reason, u.order.filled_qty, len(u.fills),
                        w.queue.ahead if w else None, "x" in m.resting.get("BTCUSDT", {}))
    gtc_took = outcome[GTC][3] > 0
    if gtc_took:
        assert outcome[GTX] == (S.REJECTED, core.WOULD_TAKE, D(0), 0, None, False)
    else:
        assert outcome[GTX] == outcome[GTC] and outcome[GTX][0] is S.PENDING


# -- the broker service over real sockets ----------------------------------------------------

@pytest.fixture
def broker(cfg, runner, md_pub, make_book, feed):
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    return svc


def test_the_broker_rejects_a_crossing_post_only_order_with_would_take(broker, cfg, clients, db_rows,
                                                                        wait_until):
    events = Subscriber(cfg.bus.broker_pub, ["order.", "heartbeat."], cfg.bus.hwm)
    try:
        client = clients(cfg.bus.broker_rep)
        wait_until(lambda: events.sock.poll(0), "a broker heartbeat")  # the SUB is live
        ack = client.request(request("cross", "0.2", Side.BUY, "100.5"))
        assert isinstance(ack, Ack)
        assert (ack.status, ack.reason, ack.filled_qty, ack.avg_price, ack.fills) == (
            S.REJECTED, "WOULD_TAKE", D(0), None, [])
        assert client.request(request("cross", "0.2", Side.BUY, "100.5")) == ack  # a repeat: the same answer
        assert db_rows(cfg.common.db, "SELECT kind, tif, status, reason, filled_qty FROM orders "
                                      "WHERE client_order_id = 'cross'") == [
            ("LIMIT", "GTX", "REJECTED", "WOULD_TAKE", "0")]
        assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM fills WHERE client_order_id = 'cross'") == [(0,)]
        seen: list = []

        def rejected_event():
            while events.sock.poll(0):
                seen.append(events.recv()[1])
            return [e for e in seen if isinstance(e, OrderEvent) and e.client_order_id == "cross"]
        [event] = wait_until(rejected_event, "the order.BTCUSDT event of the rejection")
        assert (event.status, event.reason) == (S.REJECTED, "WOULD_TAKE")
        bad = client.request(request("mkt", "0.1", Side.BUY, None, GTX, OrderKind.MARKET))
        assert (bad.status, bad.reason, bad.fills) == (S.REJECTED, "BAD_ORDER", [])
    finally:
        events.close()


def test_a_resting_post_only_order_survives_a_restart_and_fills_as_maker(cfg, env, runner, md_pub, make_book,
                                                                          feed, clients, db_rows):
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    rest = clients(cfg.bus.broker_rep).request(request("keep", "0.6", Side.BUY, "100"))
    assert (rest.status, rest.fills) == (S.PENDING, [])
    runner.stop(svc)
    assert db_rows(cfg.common.db, "SELECT tif, status FROM orders WHERE client_order_id = 'keep'") == [
        ("GTX", "PENDING")]

    cfg2 = load({**env, "QF_BROKER_REP": cfg.bus.broker_rep + "-2", "QF_BROKER_PUB": cfg.bus.broker_pub + "-2"})
    svc2 = runner.start(BrokerService(cfg2))
    restored = svc2.open["keep"]
    assert (restored.tif, restored.kind, restored.status, restored.price) == (GTX, OrderKind.LIMIT, S.PENDING,
                                                                            D("100"))
    # asks that come down through it arrived after it: it buys from them at its own price, as maker
    feed(md_pub, make_book(bids=[[99.5, 1.0]], asks=[[99.9, 1.0]]), lambda: "keep" not in svc2.open,
         "the restored post-only order to fill")
    ack = clients(cfg2.bus.broker_rep).request(request("keep", "0.6", Side.BUY, "100"))
    assert (ack.status, [(str(f.price), str(f.qty), f.liquidity) for f in ack.fills]) == (
        S.FILLED, [("100", "0.6", Liquidity.MAKER)])
