"""FillModel with hand-computed fills: latency, book walking, partial fills, queues, trade-through, fees."""
from __future__ import annotations

import dataclasses
from decimal import Decimal as D

import pytest

from services.broker import core
from services.broker import market as mkt
from services.broker.market import to_units
from services.broker.core import Order
from services.broker.fill_model import ARRIVED, CANCELLED, FILLED, NOT_OPEN, FillModel
from services.broker.latency import MS, LatencyModel
from services.broker.queue import make_queue_model
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import Book, OrderRequest, Trade

S = OrderStatus
ASKS = [[100.5, 0.4], [101.0, 0.5], [102.0, 10.0]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


def book(bids=BIDS, asks=ASKS, t=0, exch_ts=7) -> Book:
    return Book(ts=t, symbol="BTCUSDT", exch_ts=exch_ts, update_id=1, bids=[list(b) for b in bids],
                asks=[list(a) for a in asks], mid=0.0, spread=0.0, spread_bps=0.0, imbalance=0.0, microprice=0.0)


def trade(price, qty, seller_took: bool, t=0) -> Trade:
    return Trade(ts=t, symbol="BTCUSDT", exch_ts=9, trade_id=1, price=D(price), qty=D(qty),
                 buyer_is_maker=seller_took)


def order(coid="c1", qty="1.0", side=Side.BUY, kind=OrderKind.MARKET, price=None, tif=TimeInForce.GTC, t=0):
    req = OrderRequest(ts=t, client_order_id=coid, strategy="t", symbol="BTCUSDT", side=side, kind=kind,
                       qty=D(qty), price=None if price is None else D(price), tif=tif)
    return Order.from_request(req, f"o-{coid}", t)


def limit(coid, qty, side, price, tif=TimeInForce.GTC, t=0):
    return order(coid, qty, side, OrderKind.LIMIT, price, tif, t)


def model(latency_ms=0.0, queue="risk_averse", taker="0.001", maker="0.001", fee_asset="quote") -> FillModel:
    return FillModel(D(taker), D(maker), make_queue_model(queue, 2), LatencyModel("constant", latency_ms), fee_asset)


def place(m: FillModel, o: Order, t=0):
    m.submit(o, t)
    return m.advance(t)


def test_market_buy_walks_the_book_with_vwap_fees_and_slippage():
    m = model()
    m.on_book(book(), 0)
    [u] = place(m, order(qty="1.0"), 1)
    assert u.event == ARRIVED and u.order.status is S.FILLED and u.order.avg_price == D("100.9")
    assert [(f.fill_id, f.price, f.qty, f.fee, f.liquidity) for f in u.fills] == [
        ("o-c1-1", D("100.5"), D("0.4"), D("0.0402"), Liquidity.TAKER),
        ("o-c1-2", D("101"), D("0.5"), D("0.0505"), Liquidity.TAKER),
        ("o-c1-3", D("102"), D("0.1"), D("0.0102"), Liquidity.TAKER)]
    # mid = (100 + 100.5) / 2; slippage = price - mid for a buy, per level
    assert {(f.decision_mid, f.arrival_mid, f.fee_asset, f.queue_wait_ns, f.exch_ts) for f in u.fills} == {
        (D("100.25"), D("100.25"), "USDT", 0, 7)}
    assert [f.slippage_arrival for f in u.fills] == [D("0.25"), D("0.75"), D("1.75")]
    assert u.order.avg_price - D("100.25") == D("0.65")  # the order's VWAP slippage


def test_market_sell_walks_bids_and_cancels_what_the_book_cannot_fill():
    m = model()
    m.on_book(book(), 0)
    [u] = place(m, order(qty="3", side=Side.SELL), 1)
    assert [(f.price, f.qty, f.slippage_arrival) for f in u.fills] == [(D("100"), D("0.3"), D("0.25")),
                                                                       (D("99"), D("2"), D("1.25"))]
    assert (u.order.status, u.order.reason, u.order.filled_qty) == (S.CANCELLED, core.IOC_REMAINDER, D("2.3"))


def test_no_book_rejects_and_an_empty_side_cancels():
    m = model()
    [u] = place(m, order(), 1)
    assert (u.event, u.order.status, u.order.reason, u.fills) == (ARRIVED, S.REJECTED, core.NO_BOOK, [])
    m.on_book(book(asks=[]), 2)
    [u] = place(m, order("c2"), 3)
    assert (u.order.status, u.order.reason) == (S.CANCELLED, core.NO_LIQUIDITY)


def test_matched_against_the_book_at_arrival_not_at_decision():
    m = model(latency_ms=10)
    m.on_book(book(asks=[[100.5, 1.0]]), 0)
    assert m.submit(order(qty="0.2"), 1 * MS) == 11 * MS
    assert m.on_book(book(bids=[[100.0, 1.0]], asks=[[101.0, 1.0]]), 5 * MS) == []  # in flight
    # the next event comes after the arrival: the order met the 5 ms book, not the 15 ms one
    [u] = m.on_book(book(bids=[[104.0, 1.0]], asks=[[105.0, 1.0]]), 15 * MS)
    assert [(f.price, f.qty, f.ts) for f in u.fills] == [(D("101"), D("0.2"), 11 * MS)]
    f = u.fills[0]
    assert (f.decision_mid, f.arrival_mid, f.slippage_decision, f.slippage_arrival) == (
        D("100.25"), D("100.5"), D("0.75"), D("0.5"))


def test_a_timer_advance_processes_an_order_without_a_new_book():
    m = model(latency_ms=10)
    m.on_book(book(), 0)
    m.submit(order(qty="0.1"), 0)
    assert m.next_due() == 10 * MS and m.advance(10 * MS - 1) == [] and m.pending == 1
    [u] = m.advance(10 * MS)
    assert u.order.status is S.FILLED and m.pending == 0 and m.next_due() is None


def test_requests_never_overtake_each_other():
    class Scripted(LatencyModel):
        def __init__(self, values):
            super().__init__()
            self.values = list(values)

        def entry_ns(self):
            return self.values.pop(0)

    m = FillModel(D("0.001"), D("0.001"), make_queue_model("risk_averse"), Scripted([30 * MS, 5 * MS]))
    m.on_book(book(), 0)
    assert m.submit(order("a", "0.4"), 0) == 30 * MS
    assert m.submit(order("b", "0.4"), 1 * MS) == 30 * MS  # not 6 ms: one connection, in order
    first, second = m.advance(30 * MS)
    assert (first.client_order_id, first.fills[0].price) == ("a", D("100.5"))
    assert (second.client_order_id, second.fills[0].price) == ("b", D("101"))


def test_feed_lag_delays_processing_until_the_book_of_the_arrival_is_visible():
    lat = LatencyModel("constant", 5)
    for i in range(10):
        lat.feed.observe(recv_ns=1_000 * MS + 20 * MS + i, exch_ms=1_000)
    assert lat.feed.lag_ns == 20 * MS + 5 and lat.visible_ns() == 20 * MS + 5
    m = FillModel(D("0.001"), D("0.001"), make_queue_model("risk_averse"), lat)
    assert m.submit(order(), 0) == 25 * MS + 5


def test_two_orders_cannot_take_the_same_displayed_liquidity():
    m = model()
    m.on_book(book(), 0)
    [a] = place(m, order("a", "0.3"), 1)
    [b] = place(m, order("b", "0.3"), 2)
    assert [(f.price, f.qty) for f in a.fills] == [(D("100.5"), D("0.3"))]
    assert [(f.price, f.qty) for f in b.fills] == [(D("100.5"), D("0.1")), (D("101"), D("0.2"))]
    m.on_book(book(), 3)  # the same book again: what we took is still gone
    [c] = place(m, order("c", "0.5"), 4)
    assert [(f.price, f.qty) for f in c.fills] == [(D("101"), D("0.3")), (D("102"), D("0.2"))]
    m.on_book(book(asks=[[100.5, 1.0], [101.0, 0.5]]), 5)  # the level grew: only the new part is there
    [d] = place(m, order("d", "1"), 6)
    assert [(f.price, f.qty) for f in d.fills] == [(D("100.5"), D("0.6"))]
    m.on_book(book(asks=[[101.0, 0.5]]), 7)  # 100.5 was deleted: taken there is forgotten
    m.on_book(book(asks=[[100.5, 0.2], [101.0, 0.5]]), 8)
    [e] = place(m, order("e", "0.1"), 9)
    assert [(f.price, f.qty) for f in e.fills] == [(D("100.5"), D("0.1"))]


def test_ioc_limit_cancels_its_remainder_and_gtc_rests_at_the_front():
    m = model()
    m.on_book(book(), 0)
    [ioc] = place(m, limit("i", "1.0", Side.BUY, "100.6", TimeInForce.IOC), 1)
    assert (ioc.order.status, ioc.order.filled_qty, ioc.order.reason) == (S.CANCELLED, D("0.4"), core.IOC_REMAINDER)
    m.on_book(book(), 2)
    [gtc] = place(m, limit("g", "1.0", Side.BUY, "101"), 3)
    assert [(f.price, f.qty) for f in gtc.fills] == [(D("101"), D("0.5"))]  # 100.5 was taken by the IOC
    assert gtc.order.status is S.PARTIALLY_FILLED and m.working["g"].queue.ahead == 0  # a new best bid


def test_queue_advances_on_trades_at_its_price_then_fills_as_maker():
    m = model(taker="0.00075", maker="0.0002")
    m.on_book(book(), 0)
    assert place(m, limit("r", "0.5", Side.BUY, "100"), 1)[0].order.status is S.PENDING
    assert m.working["r"].queue.ahead == 30_000_000  # 0.3 displayed at 100 is ahead of us
    assert m.on_trade(trade("100", "0.2", seller_took=False), 2) == []  # a buy-aggressor trade: not against bids
    assert m.on_trade(trade("100", "0.2", seller_took=True), 3) == []
    assert m.working["r"].queue.ahead == 10_000_000
    [u] = m.on_trade(trade("100", "0.25", seller_took=True), 4)
    assert [(f.price, f.qty, f.liquidity, f.fee, f.queue_wait_ns) for f in u.fills] == [
        (D("100"), D("0.15"), Liquidity.MAKER, D("0.003"), 3)]  # 100 × 0.15 × 0.0002
    assert (u.event, u.order.status) == (FILLED, S.PARTIALLY_FILLED)
    [u] = m.on_trade(trade("100", "0.5", seller_took=True), 5)
    assert [(f.qty, f.slippage_arrival) for f in u.fills] == [(D("0.35"), D("-0.25"))]  # bought below mid
    assert u.order.status is S.FILLED and "r" not in m.working


def test_trade_through_fills_the_whole_remainder_at_the_limit():
    m = model()
    m.on_book(book(), 0)
    place(m, limit("s", "0.5", Side.SELL, "101"), 1)
    assert m.working["s"].queue.ahead == 50_000_000
    assert m.on_trade(trade("100.9", "5", seller_took=False), 2) == []  # below our ask: nothing
    [u] = m.on_trade(trade("101.5", "0.01", seller_took=False), 3)
    assert [(f.price, f.qty, f.liquidity) for f in u.fills] == [(D("101"), D("0.5"), Liquidity.MAKER)]


def test_one_trade_is_shared_by_our_orders_in_time_priority():
    m = model()
    m.on_book(book(bids=[[100.0, 0.1]]), 0)
    place(m, limit("first", "0.3", Side.BUY, "100"), 1)
    place(m, limit("second", "0.3", Side.BUY, "100"), 2)
    a, b = m.on_trade(trade("100", "0.5", seller_took=True), 3)
    assert (a.client_order_id, a.fills[0].qty) == ("first", D("0.3"))
    assert (b.client_order_id, b.fills[0].qty) == ("second", D("0.1"))  # 0.5 - 0.1 ahead - 0.3 to `first`


def test_a_book_that_crosses_a_resting_order_fills_it_as_maker_once():
    m = model()
    m.on_book(book(), 0)
    place(m, limit("r", "1.0", Side.BUY, "100"), 1)
    crossed = book(bids=[[99.8, 1.0]], asks=[[99.9, 0.4], [100.0, 0.2], [100.5, 3.0]])
    [u] = m.on_book(crossed, 2)
    assert [(f.price, f.qty, f.liquidity, f.exch_ts) for f in u.fills] == [(D("100"), D("0.6"), Liquidity.MAKER, 7)]
    assert m.on_book(crossed, 3) == []  # that liquidity is ours now
    [taker] = place(m, order("t", "0.1"), 4)
    assert [(f.price, f.qty) for f in taker.fills] == [(D("100.5"), D("0.1"))]


def test_level_decreases_advance_the_probabilistic_queue_not_the_risk_averse_one():
    outcomes = {}
    for name in ("risk_averse", "power", "log"):
        m = model(queue=name)
        m.on_book(book(bids=[[100.0, 0.5]]), 0)
        place(m, limit("r", "0.1", Side.BUY, "100"), 1)
        m.on_book(book(bids=[[100.0, 2.0]]), 2)  # 1.5 joins behind us
        m.on_book(book(bids=[[100.0, 1.5]]), 3)  # 0.5 cancelled: in front of us, or behind?
        outcomes[name] = m.working["r"].queue.ahead / 1e8
    # power 2: p(behind) = 1.5² / (1.5² + 0.5²) = 0.9 → 0.5 - 0.1 × 0.5 = 0.45
    # log: p = ln 2.5 / (ln 2.5 + ln 1.5) = 0.69324 → 0.5 - 0.30676 × 0.5 = 0.34662
    assert outcomes["risk_averse"] == 0.5
    assert outcomes["power"] == 0.45
    assert outcomes["log"] == pytest.approx(0.34662, abs=1e-5)


def test_trades_are_not_counted_twice_by_the_level_decrease_that_follows():
    m = model(queue="power")
    m.on_book(book(bids=[[100.0, 0.5]]), 0)
    place(m, limit("r", "0.1", Side.BUY, "100"), 1)
    m.on_book(book(bids=[[100.0, 2.0]]), 2)
    m.on_trade(trade("100", "0.2", seller_took=True), 3)  # ahead 0.5 → 0.3
    m.on_book(book(bids=[[100.0, 1.5]]), 4)  # down 0.5: 0.2 traded, 0.3 cancelled
    # front 0.3, back 2.0 - 0.3 = 1.7: p = 2.89 / (2.89 + 0.09) → 0.3 - (1 - p) × 0.3 = 0.29094
    assert m.working["r"].queue.ahead / 1e8 == pytest.approx(0.29094, abs=1e-5)


def test_an_order_deeper_than_the_book_shows_joins_when_its_level_is_seen():
    m = model()
    m.on_book(book(bids=[[100.0, 1.0], [99.0, 1.0]]), 0)
    place(m, limit("deep", "0.1", Side.BUY, "98"), 1)
    assert m.working["deep"].queue.ahead is None
    assert m.on_trade(trade("98", "5", seller_took=True), 2) == []  # we cannot tell where we stand
    m.on_book(book(bids=[[99.0, 1.0], [98.0, 0.7]]), 3)
    assert m.working["deep"].queue.ahead == 70_000_000


def test_cancels_take_effect_after_the_latency():
    m = model(latency_ms=10)
    m.on_book(book(), 0)
    m.submit(limit("a", "0.5", Side.BUY, "100"), 0)
    m.advance(10 * MS)
    assert m.cancel("a", 20 * MS, token=1) and not m.cancel("nope", 20 * MS, token=2)
    [u] = m.on_trade(trade("99", "1", seller_took=True, t=25 * MS), 25 * MS)  # before the cancel lands
    assert u.order.status is S.FILLED
    [late] = m.advance(30 * MS)
    assert (late.event, late.cancel_token, late.order) == (NOT_OPEN, 1, None)  # the shell answers from storage
    m.submit(limit("b", "0.5", Side.BUY, "100"), 40 * MS)
    m.cancel("b", 41 * MS, token=3)  # in flight together: the order lands first, then the cancel
    arrived, cancelled = m.advance(51 * MS)
    assert (arrived.event, arrived.order.status) == (ARRIVED, S.PENDING)
    assert (cancelled.event, cancelled.cancel_token, cancelled.order.status) == (CANCELLED, 3, S.CANCELLED)
    assert cancelled.order.reason == core.CANCELLED_BY_CLIENT and m.on_trade(trade("99", "1", True), 60 * MS) == []


def test_fee_in_the_asset_received():
    m = model(taker="0.001", fee_asset="received")
    m.on_book(book(), 0)
    [buy] = place(m, order("b", "0.4"), 1)
    assert [(f.fee, f.fee_asset) for f in buy.fills] == [(D("0.0004"), "BTC")]
    [sell] = place(m, order("s", "0.3", side=Side.SELL), 2)
    assert [(f.fee, f.fee_asset) for f in sell.fills] == [(D("0.03"), "USDT")]


def test_off_grid_orders_are_refused_before_anything_changes():
    m = model()
    with pytest.raises(ValueError):
        m.submit(order(qty="0.000000001"), 0)
    with pytest.raises(ValueError):
        m.submit(limit("x", "1", Side.BUY, "100.000000001"), 0)
    assert m.working == {} and m.pending == 0


def test_restored_orders_rejoin_the_back_of_their_level():
    m = model()
    o = limit("r", "1", Side.SELL, "100.5")
    m.restore(o, arrival_ts=5, decision_mid=D("100"), arrival_mid=D("100.1"))
    assert m.working["r"].queue.ahead is None
    m.on_book(book(), 10)
    assert m.working["r"].queue.ahead == 40_000_000
    [u] = m.on_trade(trade("100.5", "0.5", seller_took=False), 20)
    assert [(f.qty, f.queue_wait_ns, f.decision_mid) for f in u.fills] == [(D("0.1"), 15, D("100"))]


# -- books and trades the broker will not trust (issue #11) ------------------------------------------

@pytest.mark.parametrize("bids,asks,reason", [
    ([[1e-300, 1.0]], ASKS, mkt.LEVEL_RANGE),  # positive, but 0 on the 1e-8 grid: a fill at price 0
    (BIDS, [[1e-300, 1.0]], mkt.LEVEL_RANGE),
    (BIDS, [[1e300, 1.0]], mkt.LEVEL_RANGE),  # its mid overflowed the Decimal context: `internal`
    (BIDS, [[100.5, 1e300]], mkt.LEVEL_RANGE),
    (BIDS, [[100.5, 1e-300]], mkt.LEVEL_RANGE),
    (BIDS, [[100.5, 0.0]], mkt.LEVEL_RANGE),
    (BIDS, [[100.5, -1.0]], mkt.LEVEL_RANGE),
    ([[-100.0, 1.0]], ASKS, mkt.LEVEL_RANGE),
    ([[0.0, 1.0]], ASKS, mkt.LEVEL_RANGE),
    ([[110.0, 1.0]], [[90.0, 1.0]], mkt.CROSSED),  # it used to fill a sell at 110, through the mid
    ([[100.5, 1.0]], [[100.5, 1.0]], mkt.CROSSED),  # locked
    ([[99.0, 1.0], [100.0, 1.0]], ASKS, mkt.UNSORTED),  # worst bid first
    (BIDS, [[101.0, 1.0], [100.5, 1.0]], mkt.UNSORTED),
    (BIDS, [[100.5, 1.0], [100.5, 2.0]], mkt.UNSORTED),  # one price twice
])
def test_a_book_it_cannot_trust_is_refused_and_orders_are_rejected_until_a_sane_one(bids, asks, reason):
    m = model()
    m.on_book(book(), 0)
    assert m.on_book(book(bids=bids, asks=asks), 1) == []
    counts, last = m.refusals()
    assert counts == {reason: 1} and last.reason == reason
    assert m.refusals() == ({}, None)  # handed over once
    for side in (Side.BUY, Side.SELL):
        [u] = place(m, order(f"c-{side.value}", side=side), 2)
        assert (u.order.status, u.order.reason, u.fills) == (S.REJECTED, core.BAD_BOOK, [])
    assert m.mark("BTCUSDT") == D("100.25")  # marks stay those of the last trusted book
    m.on_book(book(), 3)
    [u] = place(m, order("after", "0.1"), 4)
    assert [(f.price, f.qty) for f in u.fills] == [(D("100.5"), D("0.1"))]


def test_a_first_book_that_is_refused_leaves_the_symbol_without_a_book():
    m = model()
    m.on_book(book(bids=[[1e-300, 1.0]]), 0)
    [u] = place(m, order(), 1)
    assert (u.order.status, u.order.reason) == (S.REJECTED, core.NO_BOOK)
    assert m.markets == {} and m.refusals()[0] == {mkt.LEVEL_RANGE: 1}


def test_a_refused_book_neither_fills_nor_moves_resting_orders():
    m = model()
    m.on_book(book(), 0)
    [rest] = place(m, limit("r", "0.5", Side.BUY, "100.2"), 1)
    assert rest.order.status is S.PENDING and m.working["r"].queue.ahead == 0
    # crossed through the resting bid (ask 90 <= 100.2): a trusted book would fill it as maker
    assert m.on_book(book(bids=[[100.0, 1.0]], asks=[[90.0, 5.0]]), 2) == []
    assert m.working["r"].order.filled_qty == 0
    assert m.refusals()[0] == {mkt.CROSSED: 1}


@pytest.mark.parametrize("exch_ts", [-1, mkt.MAX_EXCH_MS + 1, 2**64 - 1])
def test_an_exchange_time_out_of_range_is_refused(exch_ts):
    # 2**64 - 1 decodes from msgpack, but no fill stamped with it fits SQLite's INTEGER:
    # the journal's rows would never store
    m = model()
    m.on_book(book(exch_ts=exch_ts), 0)
    assert m.markets == {} and m.refusals()[0] == {mkt.EXCH_TS: 1}


def test_books_of_symbols_it_does_not_trade_are_refused():
    m = FillModel(D("0.001"), D("0.001"), make_queue_model("risk_averse"), LatencyModel("constant", 0),
                  symbols=["BTCUSDT"])
    m.on_book(dataclasses.replace(book(), symbol="DOGEUSDT"), 0)
    m.on_book(book(), 1)
    assert list(m.markets) == ["BTCUSDT"] and m.refusals()[0] == {mkt.SYMBOL: 1}
    unbounded = model()  # not told the symbols: at most MAX_MARKETS of them
    for i in range(mkt.MAX_MARKETS + 5):
        unbounded.on_book(dataclasses.replace(book(), symbol=f"S{i}USDT"), i)
    assert len(unbounded.markets) == mkt.MAX_MARKETS and unbounded.refusals()[0] == {mkt.SYMBOL: 5}


@pytest.mark.parametrize("price,qty", [("0", "1"), ("-100.5", "1"), ("100.5", "0"), ("100.5", "-1"),
                                       ("100.000000001", "1"), ("100.5", "1e-20"), ("1e29", "1"), ("100.5", "1e29")])
def test_a_trade_it_cannot_trust_fills_nothing(price, qty):
    m = model()
    m.on_book(book(), 0)
    place(m, limit("b", "0.5", Side.BUY, "100.0"), 1)
    place(m, limit("s", "0.5", Side.SELL, "100.5"), 1)
    # a price of 0 or below "traded through" every resting bid; off-grid ones raised ValueError
    assert m.on_trade(trade(price, qty, seller_took=True), 2) == []
    assert m.on_trade(trade(price, qty, seller_took=False), 3) == []
    assert m.refusals()[0] == {mkt.TRADE: 2}
    assert [w.order.filled_qty for w in m.working.values()] == [0, 0]


@pytest.mark.parametrize("qty", ["9e999999", "1e13", "1e-9", "12345678901234567890123456789.12345678"])
def test_orders_beyond_the_bounds_or_the_grid_are_refused_never_rounded(qty):
    # 9e999999 overflowed the Decimal context (`internal`); the 37-digit one was rounded to 28
    # digits and accepted as another quantity
    m = model()
    m.on_book(book(), 0)
    req = OrderRequest(ts=0, client_order_id="x", strategy="t", symbol="BTCUSDT", side=Side.BUY,
                       kind=OrderKind.MARKET, qty=D(qty))
    with pytest.raises(ValueError):
        m.submit(Order.from_request(req, "o-x", 0), 0)
    assert m.working == {} and m.pending == 0


def test_to_units_is_exact_or_refuses():
    assert to_units(D("92233720368.54775807")) == 2**63 - 1
    assert to_units(D("1E+2")) == 10**10
    for bad in ("1e-9", "NaN", "sNaN", "Infinity", "9e999999", "1.000000000000000000000000000000000000000000000001"):
        with pytest.raises(ValueError):
            to_units(D(bad))
