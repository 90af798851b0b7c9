"""FillModel properties: filled ≤ ordered, no displayed liquidity used twice, maker fills only at the limit."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal as D

from hypothesis import event, given, settings
from hypothesis import strategies as st

from services.broker import core, store
from services.broker.core import Account, Order
from services.broker.fill_model import ARRIVED, FillModel
from services.broker.latency import LatencyModel
from services.broker.market import to_units
from services.broker.queue import QueuePos, make_queue_model
from shared import messages
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.errors import DecodeError
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


# -- hostile books and orders (issue #11) --------------------------------------------------------------

HOSTILE_FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # NaN/inf: refused when the frame is decoded
    st.sampled_from([1e-300, 1e300, 5e-324, 1.7976931348623157e308, -0.0, 0.0, -1.0, 4e-9, 6e-9, 1e-8,
                     1e15, 1e15 + 1, 1e12, 100.0, 100.5, 101.0]),
    st.integers(-2**63, 2**64 - 1))  # msgpack carries ints where floats are expected
HOSTILE_LEVELS = st.lists(st.lists(HOSTILE_FLOATS, min_size=2, max_size=2), max_size=5)
SANE_SIDE = st.lists(st.tuples(st.integers(1, 400), st.integers(1, 10**9)), max_size=4, unique_by=lambda x: x[0])
HOSTILE_DECIMALS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.decimals(min_value=D("0.00000001"), max_value=D("5"), places=8).map(str),
    st.sampled_from(["9e999999", "1e-999999", "1e29", "1e-30", "0", "-1", "1e12", "1000000000000.00000001",
                     "1e15", "0.000000001", "1" * 40, "0E-999999", "nan", "1_000"]))
SANE_QTY = st.decimals(min_value=D("0.00000001"), max_value=D("3"), places=8).map(str)
SANE_PRICE = st.decimals(min_value=D("96"), max_value=D("104"), places=2).map(str)
SYMBOLS = st.sampled_from(["BTCUSDT", "ETHUSDT"])
EXCH_MS = 1_700_000_000_000


def sane_levels(bids_in: list, asks_in: list) -> list:
    """A sane book: bids below 100, asks from 100.01, best first, on the 1e-8 grid."""
    bids = [[float(D(100) - TICK * k), float(D(q) / 10**8)] for k, q in sorted(bids_in)]
    asks = [[float(D(100) + TICK * k), float(D(q) / 10**8)] for k, q in sorted(asks_in)]
    return [bids, asks]


def trusted(bids: list, asks: list) -> bool:
    """The test's own idea of a book to fill on (independent of market.check_book): every level
    in [1e-8, 1e15] x [1e-8, 1e12] on the 1e-8 grid, each side strictly best first, not crossed."""
    def side(levels, buy):
        if not all(0 < p <= 1e15 and 0 < q <= 1e12 for p, q in levels):
            return None
        units = [(round(p * 10**8), round(q * 10**8)) for p, q in levels]
        if not all(pu and qu for pu, qu in units):
            return None
        ordered = all((a > b) if buy else (a < b) for (a, _), (b, _) in zip(units, units[1:]))
        return units if ordered else None
    b, a = side(bids, True), side(asks, False)
    return b is not None and a is not None and not (b and a and b[0][0] >= a[0][0])


# half hostile, half sane: the sane ones are what lets orders fill between the hostile ones
book_events = st.tuples(st.just("book"), SYMBOLS, st.one_of(st.tuples(HOSTILE_LEVELS, HOSTILE_LEVELS),
                                                           st.tuples(SANE_SIDE, SANE_SIDE).map(
                                                               lambda s: sane_levels(*s))),
                        st.sampled_from([EXCH_MS] * 7 + [-1, 10**13 + 1, 2**64 - 1]))
order_events = st.tuples(st.just("order"), SYMBOLS, st.sampled_from(["BUY", "SELL"]),
                         st.sampled_from([("MARKET", "GTC"), ("LIMIT", "GTC"), ("LIMIT", "IOC")]),
                         st.one_of(HOSTILE_DECIMALS, SANE_QTY), st.one_of(HOSTILE_DECIMALS, SANE_PRICE))


@settings(max_examples=400, deadline=None)
@given(evs=st.lists(st.one_of(book_events, order_events), max_size=25))
def test_any_book_and_any_decodable_order_give_sane_fills_or_a_typed_rejection(evs):
    m = model()
    account = Account(D("100000"))
    last_book: dict[str, tuple[list, list] | None] = {}  # the latest book the test published, if decodable
    orders: dict[str, Order] = {}
    for t, ev in enumerate(evs, 1):
        if ev[0] == "book":
            _, symbol, (bids, asks), exch_ts = ev
            wire = {**book([], [], t).to_wire(), "symbol": symbol, "bids": bids, "asks": asks, "exch_ts": exch_ts}
            try:
                msg = messages.from_wire(wire)
            except DecodeError:
                continue  # refused when read: the broker counts it and never sees it
            last_book[symbol] = (bids, asks) if trusted(bids, asks) and 0 <= exch_ts <= 10**13 else None
            updates = m.on_book(msg, t)
        else:
            _, symbol, side, (kind, tif), qty, price = ev
            wire = {"v": 1, "type": "order", "ts": t, "client_order_id": f"c{t}", "strategy": "p",
                    "symbol": symbol, "side": side, "kind": kind, "qty": qty, "price": price, "tif": tif}
            try:
                req = messages.from_wire(wire, messages.REQUESTS)
            except DecodeError:
                continue  # a typed `error` reply (bad_field)
            try:  # what BrokerService.place does: a ValueError is REJECTED BAD_ORDER
                order = Order.from_request(req, f"o{t}", t)
                m.submit(order, t)
            except ValueError:
                continue
            updates = m.advance(t)
            [arrived] = [u for u in updates if u.client_order_id == f"c{t}"]
            if arrived.order.status is OrderStatus.REJECTED:
                assert arrived.order.reason in (core.NO_BOOK, core.BAD_BOOK)
                assert (arrived.order.reason == core.NO_BOOK) == (symbol not in m.markets)
            event(f"order {arrived.order.status.value} {arrived.order.reason}".strip())
            if arrived.fills:  # it took liquidity: from the latest book, which must be one worth trusting
                shown = last_book.get(symbol)
                assert shown is not None, "filled on a book the broker should not trust"
                opposite = shown[1] if side == "BUY" else shown[0]
                prices = {to_units(D(repr(float(p))).quantize(D("1e-8"))) for p, _ in opposite}
                for f in arrived.fills:
                    assert to_units(f.price) in prices
        for u in updates:
            o = u.order
            orders[u.client_order_id] = o
            assert D(0) <= o.filled_qty <= o.qty
            for f in u.fills:
                assert f.price.is_finite() and f.price > 0 and 0 < f.qty <= o.qty
                assert messages.from_wire(f.to_wire()) == f  # every fill is readable by its subscribers
            # the money path: notional, fee, cash and equity, as the broker journals them
            change = store.Change(o, u.event == ARRIVED, u.fills)
            _, account = store.statements([change], account, m.marks())
