"""The report's column-wise fold (services/report/trips.py) against the ledger it stands in for:
every round trip where `Position.apply` closes one, with the same exact P&L, and the same net P&L,
however the fills are cut into batches."""
from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.report.trips import BadFill, FillBatch, Holding, fold, make_batch
from shared.enums import Side
from shared.ledger import Position

SYMBOLS = ("BTCUSDT", "ETHBTC", "XYZ")  # a USDT pair, a BTC-quoted pair, a symbol with no known quote


def batch(fills: list[tuple]) -> FillBatch:
    """(symbol, side, qty, price, fee, fee_asset) texts → a FillBatch (ts: the index)."""
    n = len(fills)
    symbol, side, qty, price, fee, asset = zip(*fills) if fills else ((),) * 6
    return make_batch(list(range(n)), symbol, side, ",".join(price), ",".join(qty), ",".join(fee), asset,
                      ["MAKER"] * n, ",".join("0" for _ in fills), [False] * n)


def ledger(fills: list[tuple]) -> tuple[list[tuple[int, Decimal]], dict[str, Position]]:
    positions: dict[str, Position] = {}
    trips = []
    for i, (symbol, side, qty, price, fee, asset) in enumerate(fills):
        pos = positions.setdefault(symbol, Position(symbol))
        trip = pos.apply(Side(side), Decimal(qty), Decimal(price), Decimal(fee), asset)
        if trip is not None:
            trips.append((i, trip))
    return trips, positions


def folded(fills: list[tuple], cuts: list[int]) -> tuple[list[tuple[int, Decimal]], dict[str, Holding]]:
    holdings: dict[str, Holding] = {}
    trips = []
    edges = sorted({0, len(fills), *(c for c in cuts if 0 < c < len(fills))})
    for lo, hi in zip(edges, edges[1:]):
        done = fold(holdings, batch(fills[lo:hi]))
        trips += [(lo + i, p) for i, p in zip(done.trip_index, done.trip_pnl)]
    return trips, holdings


def net(p: Position) -> Decimal:
    return p.net_realized + p.unrealized()


amount = st.integers(1, 3000).map(lambda u: str(Decimal(u).scaleb(-3)))  # 0.001 .. 3
fee = st.integers(0, 500).map(lambda u: str(Decimal(u).scaleb(-6)))
fill = st.tuples(st.sampled_from(SYMBOLS), st.sampled_from(("BUY", "SELL")),
                 st.sampled_from(("0.5", "1", "1.5", "0.25")) | amount,
                 st.integers(90, 110).map(str) | st.integers(9000, 11000).map(lambda u: str(Decimal(u).scaleb(-2))),
                 fee, st.sampled_from(("", "USDT", "BTC", "ETH", "BNB")))


@settings(max_examples=300, deadline=None)
@given(st.lists(fill, max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_fold_closes_the_same_trips_with_the_same_pnl_as_the_ledger(fills, cuts):
    want_trips, positions = ledger(fills)
    got_trips, holdings = folded(fills, cuts)
    assert got_trips == want_trips
    for symbol, pos in positions.items():
        h = holdings[symbol]
        assert (h.held, h.net) == (pos.qty, net(pos)), symbol
        assert h.quote == pos.quote


def test_a_flip_closes_the_trip_and_carries_the_rest_into_the_next():
    fills = [("BTCUSDT", "BUY", "1", "100", "0.1", "USDT"),  # long 1 @ 100
             ("BTCUSDT", "SELL", "3", "110", "0.3", "USDT"),  # closes (+10 - 0.4 fees), short 2 @ 110
             ("BTCUSDT", "BUY", "2", "105", "0", "USDT")]  # closes the short: +10
    trips, holdings = folded(fills, [])
    assert trips == [(1, Decimal("9.6")), (2, Decimal("10"))]
    assert holdings["BTCUSDT"].held == 0 and holdings["BTCUSDT"].net == Decimal("19.6")


def test_a_base_asset_fee_comes_off_the_quantity_held():
    # bought 1 BTC paying 0.001 BTC: 0.999 held; selling 0.999 closes the trip
    fills = [("BTCUSDT", "BUY", "1", "100", "0.001", "BTC"), ("BTCUSDT", "SELL", "0.999", "110", "0.1", "USDT")]
    trips, holdings = folded(fills, [])
    assert trips == ledger(fills)[0]
    assert trips == [(1, Decimal("109.89") - Decimal("100") - Decimal("0.1"))]
    assert holdings["BTCUSDT"].held == 0


@pytest.mark.parametrize("column, value, text", [
    ("side", "HOLD", "side 'HOLD' is neither BUY nor SELL"),
    ("price", "0", "price 0 is not positive"),
    ("qty", "-1", "qty -1 is not positive"),
    ("price", "1e5", "price '1e5'"),
])
def test_a_fill_the_ledger_cannot_book_is_named(column, value, text):
    fills = [["BTCUSDT", "BUY", "1", "100", "0", "USDT"] for _ in range(3)]
    fills[2][{"side": 1, "qty": 2, "price": 3}[column]] = value
    with pytest.raises(BadFill) as caught:
        batch([tuple(f) for f in fills])
    assert caught.value.index == 2 and text in str(caught.value)


def test_net_delta_sums_to_the_change_of_net_pnl():
    fills = [("BTCUSDT", "BUY", "1", "100", "0.1", "USDT"), ("ETHBTC", "BUY", "2", "0.05", "0.0001", "BTC"),
             ("BTCUSDT", "SELL", "0.5", "120", "0.06", "USDT"), ("BTCUSDT", "BUY", "0.5", "90", "0", "")]
    holdings: dict[str, Holding] = {}
    done = fold(holdings, batch(fills), net_delta=True)
    total = np.cumsum(done.net_delta)
    _, positions = ledger(fills)
    assert Decimal(int(total[-1])).scaleb(-done.scale) == sum(net(p) for p in positions.values())
