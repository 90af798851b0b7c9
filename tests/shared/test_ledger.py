"""The shared ledger: average cost, exactly-once fills, round trips, and a brute-force cross-check."""
from __future__ import annotations

from decimal import Decimal as D
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.enums import Side
from shared.ledger import Ledger, Position


def test_average_cost_realized_and_flip():
    pos = Position("BTCUSDT")
    assert pos.apply(Side.BUY, D("1"), D("100"), D("0.1"), "USDT") is None
    pos.apply(Side.BUY, D("1"), D("110"), D("0.11"), "USDT")
    assert (pos.qty, pos.cost, pos.avg_price) == (D("2"), D("210"), D("105"))
    assert pos.apply(Side.SELL, D("1.5"), D("120")) is None  # partly closed: no round trip yet
    assert (pos.qty, pos.cost, pos.realized) == (D("0.5"), D("52.5"), D("22.5"))
    trip = pos.apply(Side.SELL, D("1"), D("100"))  # closes 0.5 at a loss (-2.5), opens 0.5 short
    assert trip == D("22.5") - D("2.5") - D("0.21")
    assert (pos.qty, pos.cost, pos.realized, pos.avg_price) == (D("-0.5"), D("-50"), D("20"), D("100"))
    pos.mark = D("90")
    assert pos.unrealized() == D("5") and pos.fees == D("0.21") and pos.net_realized == D("19.79")
    assert pos.apply(Side.BUY, D("0.5"), D("100")) == D("0")  # a round trip at cost is still a trip


def test_partial_close_rounds_the_cost_share_once_and_cash_still_balances():
    pos = Position("BTCUSDT")
    for price in ("100", "101", "103"):
        pos.apply(Side.BUY, D("1"), D(price))
    pos.apply(Side.SELL, D("1"), D("104"))  # removes 304/3, not a terminating decimal
    assert pos.cost == D("202.666666666667") and pos.realized == D("2.666666666667")
    assert pos.realized - pos.cost == D("-304") + D("104")  # the cash flows, exactly


def test_fees_in_the_quote_asset_count_others_are_kept_apart():
    pos = Position("ETHBTC")
    pos.apply(Side.BUY, D("1"), D("0.05"), D("0.00005"), "BTC")
    pos.apply(Side.SELL, D("1"), D("0.06"), D("0.001"), "BNB")
    assert pos.fees == D("0.00005") and pos.other_fees == {"BNB": D("0.001")}
    assert pos.fees_by_asset() == {"BTC": D("0.00005"), "BNB": D("0.001")}


def test_ledger_applies_each_fill_once_and_refuses_malformed_maps():
    led = Ledger(D("1000"))
    f = {"fill_id": "a", "symbol": "BTCUSDT", "side": "BUY", "price": "100", "qty": "0.002", "fee": "0.0002",
         "fee_asset": "USDT"}
    assert led.apply_map(f) is not None and led.apply_map(f) is None
    assert led.qty("BTCUSDT") == D("0.002") and led.fees() == D("0.0002")
    for bad in ({"fill_id": "b"}, {**f, "fill_id": "b", "price": 1.5}, {**f, "fill_id": "b", "side": "UP"},
                {**f, "fill_id": "b", "qty": "nan"}, {**f, "fill_id": "b", "qty": "0"},
                {**f, "fill_id": 7}, {**f, "fill_id": "b", "qty": True}, {**f, "fill_id": "b", "price": "x"}):
        with pytest.raises(ValueError):
            led.apply_map(bad)
    assert led.qty("BTCUSDT") == D("0.002")
    assert led.apply_map({**f, "fill_id": "b"}) is not None  # a refused id was not burned
    assert Ledger(remember=0).apply("x", "BTCUSDT", Side.BUY, D(1), D(1)) is not None


def test_a_position_knows_its_quote_asset_and_keeps_one_of_an_unknown_symbol_with_every_fee_in_it():
    assert Position("BTCUSDT").quote == "USDT" and Position("USDM:ETHFDUSD").quote == "FDUSD"
    odd = Position("NOQUOTE")  # the API shows what the database holds: no error, no quote asset
    odd.apply(Side.BUY, D("1"), D("10"), D("0.01"), "XYZ")
    assert (odd.quote, odd.fees, odd.other_fees) == ("", D("0.01"), {})


def test_apply_map_refuses_floats_through_the_one_money_contract():
    led = Ledger()
    f = {"fill_id": "a", "symbol": "BTCUSDT", "side": "BUY", "price": "100", "qty": "0.002"}
    for key in ("price", "qty", "fee"):
        with pytest.raises(ValueError, match=f"{key}: a float"):
            led.apply_map({**f, key: 0.5})
    assert not led.positions


# -- property: the ledger against a brute force of exact fractions ---------------------------

SYMBOLS = ("BTCUSDT", "ETHUSDT")
fills_st = st.lists(st.tuples(st.sampled_from(SYMBOLS), st.sampled_from(Side),
                              st.integers(1, 300_000_000).map(lambda n: D(n).scaleb(-8)),  # qty, 8 dp
                              st.integers(1, 10_000_000).map(lambda n: D(n).scaleb(-2)),  # price, 2 dp
                              st.integers(0, 500_000_000).map(lambda n: D(n).scaleb(-8))),  # fee
                    max_size=40)


def brute_force(fills):
    """Per symbol: qty, cash flow, exact average-cost realized P&L as a Fraction, fees."""
    out = {s: [Fraction(0), Fraction(0), Fraction(0), Fraction(0), Fraction(0)] for s in SYMBOLS}
    for sym, side, qty, price, fee in fills:
        q, p, sign = Fraction(qty), Fraction(price), side.sign
        acc = out[sym]  # qty, cost, realized, cash, fees
        if acc[0] and (acc[0] > 0) != (sign > 0):
            closing = min(q, abs(acc[0]))
            avg = acc[1] / acc[0]
            acc[2] += closing * (p - avg) * (1 if acc[0] > 0 else -1)
            acc[1] -= avg * closing * (1 if acc[0] > 0 else -1)
            acc[0] += sign * closing
            q -= closing
        if q:
            acc[0] += sign * q
            acc[1] += sign * q * p
        acc[3] -= sign * Fraction(qty) * p
        acc[4] += Fraction(fee)
    return out


@settings(max_examples=300, deadline=None)
@given(fills=fills_st, marks=st.tuples(*[st.integers(1, 10_000_000).map(lambda n: D(n).scaleb(-2))] * 2))
def test_ledger_balances_against_a_brute_force(fills, marks):
    led = Ledger(D("10000"))
    for i, (sym, side, qty, price, fee) in enumerate(fills):
        led.apply(f"f{i}", sym, side, qty, price, fee, "USDT")
    for sym, mark in zip(SYMBOLS, marks):
        led.mark(sym, mark)
    want = brute_force(fills)
    for sym, mark in zip(SYMBOLS, marks):
        pos, (qty, _cost, realized, cash, fees) = led.position(sym), want[sym]
        assert pos.qty == qty and pos.fees == fees
        assert pos.realized - pos.cost == cash  # exact: only the split between the two is rounded
        assert abs(Fraction(pos.realized) - realized) <= Fraction(pos.fills, 2 * 10**12)
        if not pos.qty:
            assert pos.cost == 0  # a flat position carries no leftover cost
    cash = Fraction(10000) + sum(want[s][3] - want[s][4] for s in SYMBOLS)
    assert led.cash() == cash
    # equity = start cash + realized - fees + unrealized = cash + positions at their marks, to the digit
    assert led.equity() == cash + sum(want[s][0] * Fraction(m) for s, m in zip(SYMBOLS, marks))
    assert led.equity() == led.start_cash + led.realized() - led.fees() + led.unrealized()


# -- issue #13: a fee paid in the base asset comes off the quantity held ---------------------

def test_a_base_asset_fee_comes_off_the_quantity_and_the_round_trip_counts_it():
    pos = Position("BTCUSDT")
    pos.apply(Side.BUY, D("1"), D("100"), D("0.001"), "BTC")  # QF_BROKER_FEE_ASSET=received: 0.999 BTC received
    assert (pos.qty, pos.cost, pos.avg_price) == (D("0.999"), D("100"), D("100.1001001"))  # cost unchanged
    assert (pos.fees, pos.other_fees, pos.fees_by_asset()) == (D(0), {"BTC": D("0.001")}, {"BTC": D("0.001")})
    pos.mark = D("100")
    assert pos.unrealized() == D("-0.1")  # the fee's worth at the mark: 0.001 × 100
    trip = pos.apply(Side.SELL, D("0.999"), D("110"), D("0.10989"), "USDT")  # the SELL's fee is in the quote
    assert pos.qty == 0 and pos.realized == D("0.999") * D("110") - D("100") == D("9.89")
    assert trip == D("9.89") - D("0.10989")  # the base fee is in it, through the quantity
    assert pos.fees_by_asset() == {"USDT": D("0.10989"), "BTC": D("0.001")}


def test_ledger_cash_and_equity_agree_with_the_brokers_account_on_base_fees():
    from services.broker.core import Account
    led, acct = Ledger(D("1000")), Account(D("1000"))
    fills = [(Side.BUY, "0.5", "100", "0.0005", "BTC"), (Side.BUY, "0.25", "104", "0.00025", "BTC"),
             (Side.SELL, "0.3", "103", "0.0309", "USDT"), (Side.SELL, "0.44925", "99", "0.04447575", "USDT")]
    for i, (side, qty, price, fee, asset) in enumerate(fills):
        led.apply(f"f{i}", "BTCUSDT", side, D(qty), D(price), D(fee), asset)
        acct.apply("BTCUSDT", side, D(price), D(qty), D(fee), asset)
        assert led.qty("BTCUSDT") == acct.positions["BTCUSDT"] and led.cash() == acct.cash
        led.mark("BTCUSDT", D("101"))
        assert led.equity() == acct.equity({"BTCUSDT": D("101")})
    assert led.qty("BTCUSDT") == 0 and led.fees_by_asset() == {"BTC": D("0.00075"), "USDT": D("0.07537575")}
