"""Maker fills on the symbol's lot (docs/fill-model.md, rule 4 "On the lot"): a resting order's share
of a trade, or of a book that crosses it, is rounded down to the quantity step; the rest keeps
resting, no fill is 0 and none exceeds what remains. The step is risk's lot size (lot_sizes)."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal as D

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from services.broker.core import Order
from services.broker.fill_model import FILLED, FillModel, lot_sizes, lot_units
from services.broker.latency import LatencyModel
from services.broker.market import to_units
from services.broker.queue import make_queue_model
from services.risk.limits import from_config
from shared.config import load
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import Book, OrderRequest, Trade

SYM = "BTCUSDT"
TICK = D("0.01")
MID = D("100")


def book(bids, asks, t=0) -> Book:
    return Book(ts=t, symbol=SYM, exch_ts=7, update_id=t, bids=[list(b) for b in bids],
                asks=[list(a) for a in asks], mid=0.0, spread=0.0, spread_bps=0.0, imbalance=0.0, microprice=0.0)


def trade(price, qty, seller_took: bool, t=0) -> Trade:
    return Trade(ts=t, symbol=SYM, exch_ts=9, trade_id=t, price=D(price), qty=D(qty), buyer_is_maker=seller_took)


def limit(coid: str, qty, side: Side, price, tif=TimeInForce.GTC, t=0) -> Order:
    req = OrderRequest(ts=t, client_order_id=coid, strategy="t", symbol=SYM, side=side, kind=OrderKind.LIMIT,
                       qty=D(qty), price=D(price), tif=tif)
    return Order.from_request(req, f"o-{coid}", t)


def model(lot: str | None = "0.00001", queue: str = "risk_averse") -> FillModel:
    return FillModel(D("0.001"), D("0.001"), make_queue_model(queue, 2), LatencyModel("constant", 0),
                     lots=None if lot is None else {SYM: D(lot)})


def fills_of(updates) -> list:
    return [f for u in updates for f in u.fills]


# -- by hand ----------------------------------------------------------------------------------------

def test_the_testers_case_a_share_of_a_trade_is_rounded_down_to_the_lot_and_the_rest_rests():
    # 0.5 BTC displayed ahead of our bid (plus 246 units): a 0.501 trade leaves 0.00099754 for us
    for lot, first in ((None, D("0.00099754")), ("0.00001", D("0.00099"))):
        m = model(lot)
        m.on_book(book([[100.0, 0.50000246]], [[101.0, 1.0]]), 0)
        m.submit(limit("c1", "0.001", Side.BUY, "100"), 0)
        m.advance(0)
        [f] = fills_of(m.on_trade(trade("100", "0.501", True, 1), 1))
        assert (f.qty, f.price, f.liquidity) == (first, D("100"), Liquidity.MAKER)
    assert m.working["c1"].order.remaining == D("0.00001") and m.working["c1"].order.status is OrderStatus.PARTIALLY_FILLED
    assert fills_of(m.on_trade(trade("100", "0.000004", True, 2), 2)) == []  # below one lot: no fill of 0
    [u] = m.on_trade(trade("100", "0.00002", True, 3), 3)  # covers the remainder: that, not more
    assert u.event == FILLED and [f.qty for f in u.fills] == [D("0.00001")] and u.order.status is OrderStatus.FILLED


def test_our_later_order_shares_the_trade_after_what_the_earlier_one_actually_filled():
    m = model("0.001")
    m.on_book(book([[100.0, 0.2]], [[101.0, 1.0]]), 0)
    for coid in ("a", "b"):
        m.submit(limit(coid, "0.005", Side.BUY, "100"), 0)
    m.advance(0)
    ups = m.on_trade(trade("100", "0.2065", True, 1), 1)  # 0.0065 beyond the queue: a gets 0.005, b 0.001
    assert [(u.client_order_id, [f.qty for f in u.fills]) for u in ups] == [("a", [D("0.005")]), ("b", [D("0.001")])]


def test_a_book_crossing_a_resting_order_fills_it_on_the_lot_and_counts_only_that_as_taken():
    m = model("0.0001")
    m.on_book(book([[99.0, 1.0]], [[101.0, 1.0]]), 0)
    m.submit(limit("c1", "0.01", Side.BUY, "100"), 0)  # inside the spread: rests, nobody ahead
    m.advance(0)
    [f] = fills_of(m.on_book(book([[99.0, 1.0]], [[99.5, 0.00054321], [100.0, 0.0012]]), 1))
    assert f.qty == D("0.0017") and f.price == D("100") and f.liquidity is Liquidity.MAKER  # 0.00174321 shown
    market = m.markets[SYM]
    assert market.taken[False] == {to_units(D("99.5")): to_units(D("0.00054321")),
                                   to_units(D("100")): to_units(D("0.00115679"))}  # 0.0017 in all, best first
    # the same book again: 0.00004321 left at 100, below one lot: no fill, nothing more taken
    assert fills_of(m.on_book(book([[99.0, 1.0]], [[99.5, 0.00054321], [100.0, 0.0012]]), 2)) == []
    [g] = fills_of(m.on_book(book([[99.0, 1.0]], [[99.5, 0.00054321], [100.0, 0.5]]), 3))
    assert g.qty == D("0.0083") and m.working.get("c1") is None  # the remainder, whole


def test_a_trade_through_fills_the_whole_remainder_and_a_restored_order_keeps_its_lot():
    m = model("0.00001", queue="power")
    o = limit("c1", "0.00300", Side.SELL, "101")
    m.restore(o, 0, None, None)
    m.on_book(book([[100.0, 1.0]], [[101.0, 0.7]]), 1)
    assert fills_of(m.on_trade(trade("101", "0.70000123", False, 2), 2)) == []  # 0.00000123 beyond the queue
    assert fills_of(m.on_trade(trade("101", "0.00001999", False, 3), 3))[0].qty == D("0.00001")  # 1 lot of it
    [f] = fills_of(m.on_trade(trade("101.5", "0.00000001", False, 4), 4))  # through our ask
    assert f.qty == D("0.00299") and f.price == D("101")


def test_the_lot_is_risks_per_symbol_lot_size_from_the_shared_settings():
    cfg = load({"QF_SYMBOLS": "btcusdt,ethusdt,usdm:solusdt", "QF_RISK_LOT_SIZE": "0.0001",
                "QF_RISK_SYMBOL_LIMITS": "ethusdt lot_size=0.001; usdm:solusdt lot_size=1 max_position=5"})
    lots = lot_sizes(cfg)
    assert lots == {"BTCUSDT": D("0.0001"), "ETHUSDT": D("0.001"), "USDM:SOLUSDT": D("1")}
    assert lots == {sym: rule.lot_size for sym, rule in from_config(cfg).rules.items()}  # what risk checks
    assert lot_sizes(load({})) == {"BTCUSDT": D("0.00001")}  # the default: Binance BTCUSDT's stepSize


@pytest.mark.parametrize("lot, units", [("0.00000001", 1), ("0.00001", 1000), ("1", 10**8), ("0.000000015", 3),
                                        ("1E-5", 1000), ("0.00000000999", 999)])
def test_lot_units(lot, units):
    assert lot_units(D(lot)) == units


@pytest.mark.parametrize("lot", [D(0), D("-0.001"), D("NaN"), D("Infinity"), 0.001])
def test_a_lot_that_is_no_step_is_refused(lot):
    with pytest.raises(ValueError):
        lot_units(lot)
    with pytest.raises(ValueError):
        FillModel(D("0.001"), D("0.001"), make_queue_model("power", 2), LatencyModel("constant", 0), lots={SYM: lot})


# -- properties -----------------------------------------------------------------------------------

LOTS = st.sampled_from(["0.00000001", "0.00000007", "0.00001", "0.0001", "0.001", "0.01", "0.000000015"])
UNITS = st.integers(1, 3 * 10**8)  # sizes on the 1e-8 grid, not on any lot
# a book around a centre `c` ticks from 100: bids from 100 + (c - 1) ticks down, asks from 100 + c up
BOOKS = st.tuples(st.just("book"), st.integers(-4, 4), st.lists(UNITS, max_size=4), st.lists(UNITS, max_size=4))
TRADES = st.tuples(st.just("trade"), st.integers(-5, 5), UNITS, st.booleans())
ORDERS = st.tuples(st.just("order"), st.sampled_from([Side.BUY, Side.SELL]), st.integers(-4, 4), st.integers(1, 400))


def wire_book(c: int, bids: list[int], asks: list[int], t: int) -> Book:
    return book([[float(MID + TICK * (c - 1 - i)), q / 10**8] for i, q in enumerate(bids)],
                [[float(MID + TICK * (c + i)), q / 10**8] for i, q in enumerate(asks)], t)


@settings(max_examples=400, deadline=None)
@given(lot=LOTS, queue=st.sampled_from(["risk_averse", "power", "log"]), start=BOOKS,
       evs=st.lists(st.one_of(BOOKS, TRADES, ORDERS), max_size=40))
def test_every_maker_fill_is_a_positive_multiple_of_the_lot_and_never_more_than_ordered(lot, queue, start, evs):
    """For any sequence of books, trades and post-only orders (which can only rest, then fill as makers):
    every fill is a positive multiple of the lot, an order's fills add up to its filled qty and never
    exceed its qty (a multiple of the lot), and our fills at a trade's price share at most its qty."""
    m = model(lot, queue)
    step = lot_units(D(lot))
    m.on_book(wire_book(*start[1:], 0), 0)
    ordered: dict[str, int] = {}
    filled: dict[str, int] = defaultdict(int)
    for t, ev in enumerate(evs, 1):
        if ev[0] == "book":
            updates = m.on_book(wire_book(*ev[1:], t), t)
        elif ev[0] == "trade":
            _, ticks, qty, seller_took = ev
            price = MID + TICK * ticks
            updates = m.on_trade(trade(price, D(qty).scaleb(-8), seller_took, t), t)
            at_price = sum(to_units(f.qty) for f in fills_of(updates) if f.price == price)
            assert at_price <= qty, "our orders shared more of a trade than it had"
        else:
            _, side, ticks, lots = ev
            qty = D(lots * step).scaleb(-8)
            o = limit(f"c{t}", qty, side, MID + TICK * ticks, TimeInForce.GTX, t)
            ordered[o.client_order_id] = to_units(o.qty)
            m.submit(o, t)
            updates = m.advance(t)
            assert fills_of(updates) == []  # post-only: rejected or resting, never a taker
        for u in updates:
            for f in u.fills:
                units = to_units(f.qty)
                assert units > 0 and units % step == 0, f"fill {f.qty} is not a multiple of the lot {lot}"
                assert f.liquidity is Liquidity.MAKER and f.price == u.order.price
                filled[u.client_order_id] += units
            if u.fills:
                event("filled")
                assert filled[u.client_order_id] <= ordered[u.client_order_id]
                assert to_units(u.order.filled_qty) == filled[u.client_order_id]
                assert to_units(u.order.remaining) % step == 0  # what rests stays on the lot
                assert (u.order.status is OrderStatus.FILLED) == (u.order.remaining == 0)
    for w in m.working.values():
        assert w.order.is_open and to_units(w.order.remaining) % step == 0


@settings(max_examples=300, deadline=None)
@given(lot=LOTS, queue=st.sampled_from(["risk_averse", "power", "log"]), lots=st.integers(1, 50),
       ahead=UNITS, trades=st.lists(st.tuples(UNITS, st.integers(0, 1)), max_size=30))
def test_any_sequence_of_trades_against_one_resting_order(lot, queue, lots, ahead, trades):
    """The brief's property: one resting order, any trades at (and through) its price; its fills are
    positive multiples of the lot whose sum never exceeds its qty, and it fills completely only when
    the trades that reached it (or one through it) cover it."""
    m = model(lot, queue)
    step = lot_units(D(lot))
    m.on_book(book([[100.0, ahead / 10**8]], [[100.01, 1.0]]), 0)
    qty = lots * step
    m.submit(limit("c1", D(qty).scaleb(-8), Side.BUY, "100"), 0)
    assert fills_of(m.advance(0)) == []
    total = 0
    for t, (units, through) in enumerate(trades, 1):
        price = "99.99" if through else "100"
        for f in fills_of(m.on_trade(trade(price, D(units).scaleb(-8), True, t), t)):
            assert to_units(f.qty) > 0 and to_units(f.qty) % step == 0
            total += to_units(f.qty)
            assert total <= qty
    reached = max(sum(u for u, through in trades if not through) - ahead, 0)
    if any(through for _, through in trades):
        assert total == qty
    else:
        assert total <= min(reached, qty)
        assert total == qty or total >= reached - (step - 1) * len(trades)  # each trade loses less than a lot
