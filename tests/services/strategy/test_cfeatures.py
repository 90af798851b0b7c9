"""The C features core (services/strategy/_cfeatures.c) against its Python reference
(features.PySymbolFeatures), and the C score (Scorer.score) against Scorer.__call__, bit for bit: the same FeatureVector (==, not close) and the same
head() after every event, over the real capture and over hostile random streams (missing levels,
crossed and equal prices, zero, negative, infinite, NaN and absurd quantities, a clock that jumps
back, rings that fill up, sums too large for 53 bits)."""
from __future__ import annotations

import dataclasses
import math
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.broker.replay import market_events
from services.strategy.features import FeatureParams, PySymbolFeatures, SymbolFeatures
from services.strategy.scoring import Scorer
from shared.config import load
from shared.enums import Side
from shared.messages import Book, Trade

CAPTURE = Path(__file__).resolve().parents[2] / "data" / "binance-spot-btcusdt-20240808.jsonl.gz"
SYMBOL = "BTCUSDT"


@pytest.fixture(scope="module")
def events() -> list:
    return list(market_events(CAPTURE, SYMBOL))


def feed(core, ev, now: int):
    return (core.on_book if isinstance(ev, Book) else core.on_trade)(ev, now)


SCORERS = [Scorer(load({}).strategy),
           Scorer(load({"QF_STRATEGY_ENTRY_SCORE": "0.05", "QF_STRATEGY_VOL_MIN_BPS": "0",
                        "QF_STRATEGY_VOL_MAX_BPS": "1000000", "QF_STRATEGY_MAX_SPREAD_RATIO": "1000000",
                        "QF_STRATEGY_W_OFI_L1": "0", "QF_STRATEGY_W_MICRO": "3"}).strategy)]


def same(c: SymbolFeatures, py: PySymbolFeatures, where: str) -> None:
    head = py.head()
    assert c.head() == head, where
    for scorer in SCORERS:
        assert scorer.score(c) == (*scorer(head), head[0], head[7]), where
    assert c.vector() == py.vector(), where
    assert (c.books, c.trades, c.dropped, c.skipped) == (py.books, py.trades, py.dropped, py.skipped), where


@pytest.mark.parametrize("params", [
    FeatureParams(),
    FeatureParams(levels=12, windows_ms=(250, 2000, 7000), horizons_s=(0.5, 3.0), vol_tau_s=2.0, spread_tau_s=5.0),
    FeatureParams(levels=1, windows_ms=(60_000, 100), horizons_s=(2.0, 0.1, 2.0), capacity=64),
], ids=["defaults", "deep-short", "small-ring"])
def test_bit_for_bit_over_the_real_capture(events, params):
    c, py = SymbolFeatures(params), PySymbolFeatures(params)
    seen = set()
    for k, ev in enumerate(events):
        assert feed(c, ev, ev.ts) is feed(py, ev, ev.ts)
        if isinstance(ev, Book):
            head = py.head()
            assert c.head() == head, f"event {k}"
            for scorer in SCORERS:
                got = scorer.score(c)
                assert got == (*scorer(head), head[0], head[7]), f"event {k}"
                seen.add((got[1], got[3]))
        if k % 50 == 0:
            same(c, py, f"event {k}")
    same(c, py, "end")
    assert c.vector().ready and c.books > 5000
    # every branch of the score compared: both sides, flat, not ready, filtered
    assert {(Side.BUY, ""), (Side.SELL, ""), (None, ""), (None, "not_ready")} <= seen
    assert params.levels != 5 or (None, "filtered") in seen
    if params.capacity == 64:
        assert c.dropped > 0  # the 60 s window overflowed the ring: drops compared too


# -- hostile random streams ---------------------------------------------------------------

PRICE = st.one_of(st.floats(50.0, 150.0), st.sampled_from([100.0, 100.5, 99.5]),
                  st.sampled_from([0.0, -1.0, math.inf, math.nan]))
QTY = st.one_of(st.floats(0.0, 50.0), st.sampled_from([0.0, 1e-8, 4e-9, 0.123456789]),
                st.floats(1e9, 4.7e10),  # sums past 53 bits: the exact (Python int) ratio path
                st.sampled_from([-1.0, math.inf, math.nan, 4.62e10]))  # 4.62e10: >= 2**62 units


# The strategies are built once here, not at every draw (building and validating them was a
# fifth of this test's time; the values drawn are the same).
N_LEVELS, GOOD_PRICE, GOOD_QTY = st.integers(0, 8), st.floats(50.0, 150.0), st.floats(0.0, 50.0)
N_EVENTS, GOODNESS, COIN = st.integers(1, 120), st.integers(0, 3), st.booleans()
STEP = st.one_of(st.integers(0, 400_000_000), st.sampled_from([0, -5_000_000_000, 9 * 10**9]))
TRADE_QTY = st.one_of(st.decimals(Decimal("0"), Decimal("5"), places=8),
                      st.sampled_from([Decimal("-1"), Decimal("0"), Decimal("NaN"), Decimal("sNaN"),
                                       Decimal("Infinity"), Decimal("1E-9"), Decimal("46200000000")]))


def level_list(draw, good: bool) -> list:
    n = draw(N_LEVELS)
    if good:
        return [[draw(GOOD_PRICE), draw(GOOD_QTY)] for _ in range(n)]
    return [[draw(PRICE), draw(QTY)] for _ in range(n)]


@st.composite
def streams(draw):
    base = 1_700_000_000 * 10**9
    t = base
    out = []
    for j in range(draw(N_EVENTS)):
        t += draw(STEP)  # a step back: the clock is clamped, never rewound
        if draw(COIN):
            qty = draw(TRADE_QTY)
            out.append(Trade(ts=t, symbol=SYMBOL, exch_ts=0, trade_id=j, price=Decimal("100"), qty=qty,
                             buyer_is_maker=draw(COIN)))
        else:
            good = draw(GOODNESS) > 0
            out.append(Book(ts=t, symbol=SYMBOL, exch_ts=0, update_id=j, bids=level_list(draw, good),
                            asks=level_list(draw, good), mid=0.0, spread=0.0, spread_bps=0.0, imbalance=0.0,
                            microprice=0.0))
    return out


PARAMS = st.builds(FeatureParams, levels=st.integers(1, 6),
                   windows_ms=st.lists(st.integers(1, 3000), min_size=1, max_size=3).map(tuple),
                   horizons_s=st.lists(st.floats(0.001, 3.0), min_size=1, max_size=3).map(tuple),
                   vol_tau_s=st.floats(0.01, 5.0), spread_tau_s=st.floats(0.01, 5.0),
                   capacity=st.integers(2, 40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=PARAMS, stream=streams())
def test_bit_for_bit_on_hostile_streams(params, stream):
    c, py = SymbolFeatures(params), PySymbolFeatures(params)
    for k, ev in enumerate(stream):
        assert feed(c, ev, ev.ts) is feed(py, ev, ev.ts), f"event {k}: {ev}"
        same(c, py, f"event {k}")
    c.advance(stream[-1].ts + 10**10)
    py.advance(stream[-1].ts + 10**10)
    same(c, py, "advanced")


def test_bad_books_and_trades_are_skipped_and_change_nothing(events):
    book = next(e for e in events if isinstance(e, Book))
    core = SymbolFeatures()
    assert core.on_book(book, book.ts) is True
    before = core.vector()
    for bids in ([[math.nan, 1.0]], [[100.0, -1.0]], [[100.0, math.inf]], [[0.0, 1.0]], [[100.0, 4.62e10]], [], None):
        assert core.on_book(dataclasses.replace(book, bids=bids), book.ts + 10**9) is False
    for qty in (Decimal("0"), Decimal("-2"), Decimal("NaN"), Decimal("sNaN"), Decimal("1E-9")):
        trade = Trade(ts=book.ts, symbol=SYMBOL, exch_ts=0, trade_id=1, price=Decimal("1"), qty=qty,
                      buyer_is_maker=False)
        assert core.on_trade(trade, book.ts + 10**9) is False
    after = core.vector()
    assert after == dataclasses.replace(before, skipped=12)  # not even the clock moved


def test_malformed_input_is_a_clear_type_error():
    core = SymbolFeatures()
    ok = Book(ts=1, symbol=SYMBOL, exch_ts=0, update_id=1, bids=[[100.0, 1.0]], asks=[[101.0, 1.0]], mid=0.0,
              spread=0.0, spread_bps=0.0, imbalance=0.0, microprice=0.0)
    with pytest.raises(TypeError, match=r"\[price, qty\] pair"):
        core.on_book(dataclasses.replace(ok, bids=[[100.0, 1.0, 3.0]]), 1)
    with pytest.raises(TypeError, match="sequences"):
        core.on_book(dataclasses.replace(ok, bids=5), 1)
    with pytest.raises(TypeError):
        core.on_book(dataclasses.replace(ok, bids=[["100", "1"]]), 1)
    with pytest.raises(OverflowError):
        core.on_book(ok, 2**70)
    with pytest.raises(TypeError):
        core.on_book(ok)
    assert core.books == 0 and core.vector().ts == 0
    assert core.on_book(ok, 1) is True and core.books == 1


def test_params_are_checked_and_kept():
    p = FeatureParams(levels=3, windows_ms=(100,), horizons_s=(1.0,), capacity=8)
    core = SymbolFeatures(p)
    assert core.params is p and core.capacity == 8
    assert SymbolFeatures().params == FeatureParams()
    for bad in (dict(levels=101), dict(capacity=2**22 + 1), dict(windows_ms=tuple(range(1, 18)))):
        with pytest.raises(ValueError):
            FeatureParams(**bad)
