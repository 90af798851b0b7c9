"""FillModel on the real BTCUSDT capture: resting orders at several depths fill only as the recorded trades allow."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal as D

import pytest

from services.broker.core import Order
from services.broker.fill_model import ARRIVED, FillModel
from services.broker.latency import LatencyModel
from services.broker.market import to_units
from services.broker.queue import make_queue_model
from services.broker.replay import market_events
from shared.enums import Liquidity, OrderKind, Side, TimeInForce
from shared.messages import Book, OrderRequest, Trade
from tests.conftest import SPOT_CAPTURE

TICK = D("0.01")
DEPTHS = (0, 1, 3, 10, 30, 100)  # ticks behind the best price of the order's own side
PLACE_EVERY_NS = 60 * 10**9
QTY = D("0.002")


@pytest.fixture(scope="module")
def capture_events() -> list:
    return list(market_events(SPOT_CAPTURE, "BTCUSDT"))


def run(events: list, queue: str) -> dict:
    """Replay `events` through a FillModel, placing a ladder of GTC orders every minute;
    returns per order: side, price, arrival time and queue ahead then, fills with their trigger."""
    m = FillModel(D("0.001"), D("0.001"), make_queue_model(queue, 2), LatencyModel("constant", 5))
    placed: dict[str, dict] = {}
    next_place, n = events[0].ts + 5 * 10**9, 0
    for ev in events:
        if isinstance(ev, Book) and ev.ts >= next_place:
            next_place += PLACE_EVERY_NS
            best_bid, best_ask = D(repr(ev.bids[0][0])), D(repr(ev.asks[0][0]))
            for depth in DEPTHS:
                for side, price in ((Side.BUY, best_bid - TICK * depth), (Side.SELL, best_ask + TICK * depth)):
                    n += 1
                    coid = f"{side.value[0]}{depth}-{n}"
                    req = OrderRequest(ts=ev.ts, client_order_id=coid, strategy="replay", symbol="BTCUSDT",
                                       side=side, kind=OrderKind.LIMIT, qty=QTY, price=price, tif=TimeInForce.GTC)
                    m.submit(Order.from_request(req, coid, ev.ts), ev.ts)
                    placed[coid] = {"side": side, "price": price, "depth": depth, "placed": ev.ts, "fills": []}
        updates = m.on_book(ev, ev.ts) if isinstance(ev, Book) else m.on_trade(ev, ev.ts)
        for u in updates:
            info = placed[u.client_order_id]
            if u.event == ARRIVED:
                assert u.fills == [], "a passive order took liquidity"
                info["arrival"], info["w"] = u.working.arrival_ts, u.working
                continue
            info["fills"].extend((f, ev) for f in u.fills)
    for info in placed.values():
        info["ahead"] = info["w"].queue.joined  # units ahead when it took its place in the queue
    return placed


def queue_exhausted(events: list, o: dict, until: int) -> bool:
    """Whether, from the recorded data alone, the displayed queue ahead of `o` was used up
    by `until`: at its arrival or at some later book, the size shown at its price was at
    most the volume that traded against that price afterwards (the risk-averse rule)."""
    buy, price = o["side"] is Side.BUY, o["price"]
    marks = [(o["arrival"], o["ahead"])] if o["ahead"] is not None else []
    volume_after: list[tuple[int, int]] = []
    for ev in events:
        if ev.ts <= o["arrival"] or ev.ts > until:
            continue
        if isinstance(ev, Trade):
            if ev.price == price and ev.buyer_is_maker == buy:
                volume_after.append((ev.ts, to_units(ev.qty)))
        else:
            levels = ev.bids if buy else ev.asks
            shown = {D(repr(p)): to_units(D(repr(q))) for p, q in levels}
            worst = D(repr(levels[-1][0]))
            if (price >= worst) if buy else (price <= worst):
                marks.append((ev.ts, shown.get(price, 0)))
    return any(size < sum(q for t, q in volume_after if t > start) for start, size in marks)


@pytest.mark.parametrize("queue", ["risk_averse", "power"])
def test_resting_fills_are_justified_by_the_recorded_market(capture_events, queue):
    placed = run(capture_events, queue)
    trades = [e for e in capture_events if isinstance(e, Trade)]
    filled_depths = set()
    for coid, o in placed.items():
        buy = o["side"] is Side.BUY
        total = sum((f.qty for f, _ in o["fills"]), D(0))
        assert total <= QTY
        for f, trigger in o["fills"]:
            assert f.liquidity is Liquidity.MAKER and f.price == o["price"] and f.ts >= o["arrival"]
            if isinstance(trigger, Trade):
                if trigger.price == f.price:  # reached through the queue by trades at our price
                    assert trigger.buyer_is_maker == buy and f.qty <= trigger.qty
                    if queue == "risk_averse":
                        assert queue_exhausted(capture_events, o, f.ts), coid
                else:  # traded through our price
                    assert (trigger.price < f.price) if buy else (trigger.price > f.price)
                    assert f.qty == QTY - sum((g.qty for g, _ in o["fills"] if g.ts < f.ts), D(0))
            else:  # the book crossed our price
                best = D(repr(trigger.asks[0][0] if buy else trigger.bids[0][0]))
                assert (best <= f.price) if buy else (best >= f.price)
        if total:
            filled_depths.add(o["depth"])
        else:  # never filled: the market never traded through its price after it arrived
            through = [t for t in trades if t.ts > o["arrival"]
                       and ((t.price < o["price"]) if buy else (t.price > o["price"]))]
            assert not through, coid
    assert {0, 1, 3, 10} <= filled_depths  # the capture moves enough to reach several depths


def completion(o: dict) -> int | None:
    done = sum((f.qty for f, _ in o["fills"]), D(0))
    return o["fills"][-1][0].ts if done == QTY else None


def test_deeper_orders_never_fill_before_shallower_ones(capture_events):
    placed = run(capture_events, "power")
    ladders = defaultdict(dict)
    for o in placed.values():
        ladders[(o["placed"], o["side"])][o["depth"]] = completion(o)
    for ladder in ladders.values():
        times = [ladder[d] for d in DEPTHS]
        for shallow, deep in zip(times, times[1:]):
            assert deep is None or (shallow is not None and shallow <= deep), times


def test_the_probabilistic_queue_fills_no_later_than_the_risk_averse_one(capture_events):
    averse, prob = run(capture_events, "risk_averse"), run(capture_events, "power")
    earlier = 0
    for coid, a in averse.items():
        p = prob[coid]
        qa, qp = (sum((f.qty for f, _ in o["fills"]), D(0)) for o in (a, p))
        assert qp >= qa, coid
        ta, tp = completion(a), completion(p)
        if ta is not None:
            assert tp is not None and tp <= ta, coid
            earlier += tp < ta
    assert earlier > 0  # cancels in front of us do move the probabilistic queue
