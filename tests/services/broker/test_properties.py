"""FillModel properties: filled ≤ ordered, no displayed liquidity used twice, maker fills only at the limit."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal as D

from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.core import Order
from services.broker.fill_model import FillModel
from services.broker.latency import LatencyModel
from services.broker.queue import QueuePos, make_queue_model
from shared.enums import Liquidity, OrderKind, Side, TimeInForce
from shared.messages import Book, OrderRequest, Trade

TICK = D("0.01")
MID = D("100")


def book(bids, asks, t) -> Book:
    return Book(ts=t, symbol="BTCUSDT", exch_ts=1, update_id=t, bids=bids, asks=asks, mid=0.0, spread=0.0,
                spread_bps=0.0, imbalance=0.0, microprice=0.0)


# a side: distinct tick offsets from the spread, sizes on the 1e-8 grid
sizes = st.decimals(min_value=D("0.00000001"), max_value=D("2"), places=8)
sides = st.dictionaries(st.integers(0, 15), sizes, max_size=8)


def wire(levels: dict[int, D], buy: bool) -> list:
    out = []
    for k in sorted(levels):
        price = MID - TICK * (k + 1) if buy else MID + TICK * k
        out.append([float(price), float(levels[k])])
    return out


order_specs = st.tuples(
    st.sampled_from([Side.BUY, Side.SELL]), st.sampled_from(["MARKET", "IOC", "GTC"]),
    st.decimals(min_value=D("0.00000001"), max_value=D("3"), places=8), st.integers(-10, 20))


def make_order(i: int, spec) -> Order:
    side, kind, qty, ticks = spec
    price = None
    if kind != "MARKET":
        price = MID + TICK * ticks if side is Side.BUY else MID - TICK * (ticks - 1)
    req = OrderRequest(ts=i, client_order_id=f"c{i}", strategy="p", symbol="BTCUSDT", side=side,
                       kind=OrderKind.MARKET if kind == "MARKET" else OrderKind.LIMIT, qty=qty, price=price,
                       tif=TimeInForce.IOC if kind == "IOC" else TimeInForce.GTC)
    return Order.from_request(req, f"o{i}", i)


def model(queue: str = "power") -> FillModel:
    return FillModel(D("0.001"), D("0.0002"), make_queue_model(queue, 2), LatencyModel("constant", 0))


def check_order_invariants(updates, orders: dict, fills: dict) -> None:
    for u in updates:
        for f in u.fills:
            fills[u.client_order_id].append(f)
        o = u.order
        orders[u.client_order_id] = o
        assert 0 <= o.filled_qty <= o.qty
        assert o.filled_qty == sum((f.qty for f in fills[u.client_order_id]), D(0))
        for f in u.fills:
            assert f.qty > 0
            if f.liquidity is Liquidity.MAKER:
                assert f.price == o.price, "a maker fill away from the limit price"
            elif o.price is not None:
                assert (f.price <= o.price) if o.side is Side.BUY else (f.price >= o.price)


@settings(max_examples=150, deadline=None)
@given(bids=sides, asks=sides, specs=st.lists(order_specs, max_size=12), repeats=st.lists(st.booleans(), max_size=12))
def test_takers_never_share_displayed_liquidity(bids, asks, specs, repeats):
    m = model()
    b = book(wire(bids, True), wire(asks, False), 0)
    m.on_book(b, 0)
    taken: dict[tuple, D] = defaultdict(D)
    orders, fills = {}, defaultdict(list)
    for i, spec in enumerate(specs, 1):
        if i - 1 < len(repeats) and repeats[i - 1]:
            check_order_invariants(m.on_book(b, i), orders, fills)  # the same book again
        m.submit(make_order(i, spec), i)
        updates = m.advance(i)
        check_order_invariants(updates, orders, fills)
        for u in updates:
            for f in u.fills:
                taken[(f.side, f.price)] += f.qty
    shown = {(Side.BUY, D(repr(p))): D(repr(q)) for p, q in b.asks}
    shown.update({(Side.SELL, D(repr(p))): D(repr(q)) for p, q in b.bids})
    for key, qty in taken.items():
        assert qty <= shown[key], f"{key}: took {qty} of {shown[key]}"


events = st.lists(st.one_of(
    st.tuples(st.just("book"), sides, sides),
    st.tuples(st.just("trade"), st.integers(-12, 12), sizes, st.booleans()),
    st.tuples(st.just("order"), order_specs, st.none())), max_size=30)


@settings(max_examples=150, deadline=None)
@given(evs=events, queue=st.sampled_from(["risk_averse", "power", "log"]))
def test_random_markets_keep_every_order_consistent(evs, queue):
    m = model(queue)
    orders, fills = {}, defaultdict(list)
    for t, ev in enumerate(evs, 1):
        if ev[0] == "book":
            updates = m.on_book(book(wire(ev[1], True), wire(ev[2], False), t), t)
        elif ev[0] == "trade":
            price = MID + TICK * ev[1]
            updates = m.on_trade(Trade(ts=t, symbol="BTCUSDT", exch_ts=1, trade_id=t, price=price, qty=ev[2],
                                       buyer_is_maker=ev[3]), t)
        else:
            m.submit(make_order(t, ev[1]), t)
            updates = m.advance(t)
        check_order_invariants(updates, orders, fills)
    for w in m.working.values():
        assert w.order.is_open
        assert w.queue.ahead is None or w.queue.ahead >= 0


levels_and_trades = st.lists(st.one_of(st.tuples(st.just("level"), st.integers(0, 5 * 10**8)),
                                       st.tuples(st.just("trade"), st.integers(1, 10**8))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 5 * 10**8), steps=levels_and_trades, n=st.sampled_from([0.5, 1, 2, 3]))
def test_probabilistic_queue_is_never_behind_the_risk_averse_one(start, steps, n):
    averse, prob = make_queue_model("risk_averse"), make_queue_model("power", n)
    a, p = QueuePos(), QueuePos()
    averse.level(a, start)
    prob.level(p, start)
    for kind, x in steps:
        if kind == "level":
            averse.level(a, x)
            prob.level(p, x)
            assert 0 <= p.ahead <= x and 0 <= a.ahead <= x
        else:
            assert prob.trade(p, x) >= averse.trade(a, x)
        assert p.ahead <= a.ahead
