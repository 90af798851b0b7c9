"""Risk core: each check, the engine's decisions, trading state, and the position ledger's properties."""
from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.risk import core
from services.risk.core import Position, Reason, RiskEngine
from shared.enums import ControlAction, OrderKind, Side, TradingState
from shared.messages import OrderRequest

MS = 1_000_000
T0 = 1_700_000_000_000_000_000


def order(qty="0.005", side=Side.BUY, symbol="BTCUSDT", kind=OrderKind.MARKET, price=None,
          coid="c1") -> OrderRequest:
    return OrderRequest(ts=T0, client_order_id=coid, strategy="t", symbol=symbol, side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price))


def fill(fill_id, side, qty, price, fee="0", symbol="BTCUSDT", coid="c1") -> dict:
    return {"fill_id": fill_id, "client_order_id": coid, "symbol": symbol, "side": side.value,
            "price": str(price), "qty": str(qty), "fee": str(fee)}


@pytest.fixture
def engine() -> RiskEngine:
    eng = RiskEngine(["btcusdt", "ETHUSDT"], max_position=D("0.01"), stale_book_ms=1000)
    eng.on_book("BTCUSDT", 100.25, T0)
    return eng


# -- the checks one by one ----------------------------------------------------------------

def test_check_state():
    assert core.check_state(TradingState.ACTIVE, D(0), order()) is None
    assert core.check_state(TradingState.HALTED, D(0), order()) == Reason.HALTED
    assert core.check_state(TradingState.REDUCING, D("0.003"), order("0.003", Side.SELL)) is None
    assert core.check_state(TradingState.REDUCING, D("0.003"), order("0.004", Side.SELL)) == Reason.REDUCE_ONLY
    assert core.check_state(TradingState.REDUCING, D("0.003"), order("0.001", Side.BUY)) == Reason.REDUCE_ONLY
    assert core.check_state(TradingState.REDUCING, D("-0.003"), order("0.001", Side.BUY)) is None
    assert core.check_state(TradingState.REDUCING, D(0), order("0.001", Side.SELL)) == Reason.REDUCE_ONLY


def test_check_qty_price_symbol_book():
    assert core.check_qty(order("0")) == core.check_qty(order("-1")) == Reason.NON_POSITIVE_QTY
    assert core.check_qty(order("0.00000001")) is None
    assert core.check_price(order(kind=OrderKind.LIMIT)) == Reason.BAD_PRICE
    assert core.check_price(order(kind=OrderKind.LIMIT, price="0")) == Reason.BAD_PRICE
    assert core.check_price(order(kind=OrderKind.LIMIT, price="1")) is None
    assert core.check_symbol(order(symbol="DOGEUSDT"), frozenset({"BTCUSDT"})) == Reason.UNKNOWN_SYMBOL
    assert core.check_book(None, T0, 1000 * MS) == Reason.STALE_BOOK
    assert core.check_book(T0, T0 + 1000 * MS, 1000 * MS) is None
    assert core.check_book(T0, T0 + 1000 * MS + 1, 1000 * MS) == Reason.STALE_BOOK


def test_check_max_position_counts_position_working_and_order():
    limit = D("0.01")
    assert core.check_max_position(D(0), D(0), order("0.01"), limit) is None
    assert core.check_max_position(D(0), D(0), order("0.01000001"), limit) == Reason.MAX_POSITION
    assert core.check_max_position(D("0.006"), D(0), order("0.005"), limit) == Reason.MAX_POSITION
    assert core.check_max_position(D("0.006"), D(0), order("0.016", Side.SELL), limit) is None
    assert core.check_max_position(D("0.006"), D(0), order("0.017", Side.SELL), limit) == Reason.MAX_POSITION
    assert core.check_max_position(D(0), D("0.006"), order("0.005"), limit) == Reason.MAX_POSITION


# -- the engine ------------------------------------------------------------------------------

def test_engine_approves_a_good_order(engine):
    assert engine.check(order(), T0 + 5 * MS) is None


@pytest.mark.parametrize("req,code", [
    (order("0"), Reason.NON_POSITIVE_QTY), (order(symbol="DOGEUSDT"), Reason.UNKNOWN_SYMBOL),
    (order(symbol="ETHUSDT"), Reason.STALE_BOOK), (order("0.02"), Reason.MAX_POSITION),
    (order(kind=OrderKind.LIMIT), Reason.BAD_PRICE)])
def test_engine_denials(engine, req, code):
    denial = engine.check(req, T0 + 5 * MS)
    assert denial.code == code and denial.as_reason() == {"code": code, "text": denial.text}
    assert core.TEXTS[code] in denial.text


def test_book_goes_stale_with_time(engine):
    assert engine.check(order(), T0 + 1000 * MS) is None
    assert engine.check(order(), T0 + 1001 * MS).code == Reason.STALE_BOOK
    engine.on_book("BTCUSDT", 100.3, T0 + 1001 * MS)
    assert engine.check(order(), T0 + 1002 * MS) is None


def test_max_position_includes_the_current_position(engine):
    engine.on_fill(fill("f1", Side.BUY, "0.008", "100"))
    assert engine.check(order("0.002"), T0) is None
    assert engine.check(order("0.003"), T0).code == Reason.MAX_POSITION
    assert engine.check(order("0.018", Side.SELL), T0) is None


def test_working_orders_count_until_filled_or_done(engine):
    engine.track("w1", "BTCUSDT", Side.BUY, D("0.006"))
    assert engine.check(order("0.005"), T0).code == Reason.MAX_POSITION
    assert engine.check(order("0.005", Side.SELL), T0) is None  # the other side is not made worse
    engine.on_fill(fill("wf1", Side.BUY, "0.004", "100", coid="w1"))
    assert engine.working["w1"][2] == D("0.002")  # position 0.004 + working 0.002
    assert engine.check(order("0.004"), T0) is None
    assert engine.check(order("0.0041"), T0).code == Reason.MAX_POSITION
    engine.untrack("w1")
    assert engine.check(order("0.006"), T0) is None


def test_halt_resume_flatten_state(engine):
    assert engine.control(ControlAction.HALT, "ops") is True
    assert engine.state is TradingState.HALTED and engine.state_reason == "ops"
    assert engine.check(order(), T0).code == Reason.HALTED
    assert engine.control(ControlAction.HALT, "again") is False
    assert engine.control(ControlAction.STATE) is False and engine.state is TradingState.HALTED
    assert engine.control(ControlAction.FLATTEN, "wind down") is True
    assert engine.check(order(), T0).code == Reason.REDUCE_ONLY
    assert engine.control(ControlAction.RESUME, "ok") is True
    assert engine.check(order(), T0) is None


def test_on_fill_applies_once_and_refuses_malformed(engine):
    assert engine.on_fill(fill("a", Side.BUY, "0.002", "100", fee="0.0002")) is True
    assert engine.on_fill(fill("a", Side.BUY, "0.002", "100", fee="0.0002")) is False
    assert engine.position("BTCUSDT").qty == D("0.002") and engine.fees() == D("0.0002")
    for bad in ({"fill_id": "b"}, {**fill("b", Side.BUY, 1, 1), "price": 1.5},
                {**fill("b", Side.BUY, 1, 1), "side": "UP"}, {**fill("b", Side.BUY, 1, 1), "qty": "nan"},
                fill("b", Side.BUY, "0", "1"), {**fill("b", Side.BUY, 1, 1), "fill_id": 7}):
        with pytest.raises(ValueError):
            engine.on_fill(bad)
    assert engine.position("BTCUSDT").qty == D("0.002")
    assert engine.on_fill(fill("b", Side.BUY, "0.001", "101")) is True  # a refused id was not burned


def test_average_cost_realized_and_flip():
    pos = Position()
    pos.apply(Side.BUY, D("1"), D("100"), D("0.1"))
    pos.apply(Side.BUY, D("1"), D("110"), D("0.11"))
    assert (pos.qty, pos.cost, pos.avg_price) == (D("2"), D("210"), D("105"))
    pos.apply(Side.SELL, D("1.5"), D("120"), D("0"))
    assert (pos.qty, pos.cost, pos.realized) == (D("0.5"), D("52.5"), D("22.5"))
    pos.apply(Side.SELL, D("1"), D("100"), D("0"))  # closes 0.5 at a loss, opens 0.5 short
    assert (pos.qty, pos.cost, pos.realized, pos.avg_price) == (D("-0.5"), D("-50"), D("20"), D("100"))
    pos.mark = D("90")
    assert pos.unrealized() == D("5")
    assert pos.fees == D("0.21")


def test_equity_and_drawdown(engine):
    engine.on_fill(fill("e1", Side.BUY, "0.01", "100", fee="0.001"))
    engine.on_mark("BTCUSDT", D("110"))
    assert engine.equity(D("1000")) == D("1000") - D("0.001") + D("0.1")
    assert engine.observe_equity(D("1000")) == 0
    assert engine.observe_equity(D("900")) == D("0.1")
    assert engine.observe_equity(D("1100")) == 0 and engine.peak == D("1100")
    assert engine.position_map() == {"BTCUSDT": "0.01"}


# -- ledger properties ---------------------------------------------------------------------------

SYMBOLS = ("BTCUSDT", "ETHUSDT")
fills_st = st.lists(st.tuples(st.sampled_from(SYMBOLS), st.sampled_from(Side),
                              st.decimals(min_value=D("0.00000001"), max_value=D("3"), places=8),
                              st.decimals(min_value=D("0.01"), max_value=D("100000"), places=2),
                              st.decimals(min_value=D("0"), max_value=D("5"), places=8)),
                    min_size=1, max_size=25, unique_by=lambda t: t)


@settings(max_examples=300, deadline=None)
@given(raw=fills_st, data=st.data(),
       marks=st.tuples(*[st.decimals(min_value=D("0.01"), max_value=D("100000"), places=2)] * 2))
def test_ledger_any_order_any_duplicates_balances_exactly(raw, data, marks):
    fills = [fill(f"f{i}", side, qty, price, fee, symbol=sym) for i, (sym, side, qty, price, fee) in enumerate(raw)]
    order_ = data.draw(st.permutations(fills))
    dups = data.draw(st.lists(st.sampled_from(fills), max_size=10))
    replay = list(order_) + dups
    replay = data.draw(st.permutations(replay))
    start = D("10000")

    engines = []
    for sequence in (fills, replay):
        eng = RiskEngine(SYMBOLS, D("1e9"), 1000)
        applied = sum(eng.on_fill(f) for f in sequence)
        assert applied == len(fills)
        for sym, mark in zip(SYMBOLS, marks):
            eng.on_mark(sym, mark)
        engines.append(eng)

    # brute force: positions are sums, cash moves by each fill's flow and fee
    want_pos = {s: sum((f_[2] * f_[1].sign for f_ in raw if f_[0] == s), D(0)) for s in SYMBOLS}
    cash = start - sum(f_[1].sign * f_[2] * f_[3] + f_[4] for f_ in raw)
    want_equity = cash + sum(want_pos[s] * m for s, m in zip(SYMBOLS, marks))
    for eng in engines:
        assert {s: eng.position(s).qty for s in SYMBOLS} == want_pos
        assert eng.equity(start) == start + eng.realized() - eng.fees() + eng.unrealized()
        assert eng.equity(start) == want_equity
        assert eng.fees() == sum(f_[4] for f_ in raw)
        for s in SYMBOLS:
            if not eng.position(s).qty:
                assert eng.position(s).cost == 0  # a flat position carries no leftover cost
