"""The report's figures (services/report/core.py) against hand-computed ones, and against the API's
own `stats` on the same database."""
from __future__ import annotations

import math
import statistics
from datetime import datetime, timezone
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.report.core import (EquitySeries, StateChange, Span, Tally, hourly_closes, max_drawdown, ratios,
                                  state_spans, underwater)
from services.report.trips import make_batch

H = 3600 * 10**9
MON = int(datetime(2024, 7, 1, tzinfo=timezone.utc).timestamp()) * 10**9  # a Monday, 00:00 UTC


def fills_batch(rows: list[tuple]):
    """(hour offset ns, side, qty, price, fee, liquidity, slippage or "") of BTCUSDT, fees in USDT."""
    ts, side, qty, price, fee, liq, slip = zip(*rows)
    return make_batch([MON + t for t in ts], ["BTCUSDT"] * len(rows), side, ",".join(price), ",".join(qty),
                      ",".join(fee), ["USDT"] * len(rows), liq, ",".join(s or "0" for s in slip),
                      [bool(s) for s in slip])


FILLS = [
    (10 * 60 * 10**9, "BUY", "1", "100", "0.1", "MAKER", "0.01"),
    (H + 10 * 60 * 10**9, "SELL", "1", "110", "0.11", "TAKER", "0.02"),  # trip: +10 - 0.21 = 9.79
    (2 * H + 10 * 60 * 10**9, "SELL", "2", "105", "0.2", "MAKER", ""),
    (3 * H + 10 * 60 * 10**9, "BUY", "2", "107", "0.2", "TAKER", ""),  # trip: -4 - 0.4 = -4.4
    (4 * H + 10 * 60 * 10**9, "BUY", "1", "100", "0", "MAKER", ""),  # opens a long, flat at its price
]
EQUITY = EquitySeries([MON, MON + H, MON + 2 * H, MON + 3 * H, MON + 4 * H, MON + 5 * H, MON + 5 * H + H // 2],
                      ["1000", "1010", "1005", "1020", "1000", "1030", "1040"])
CHANGES = [StateChange(MON + H + H // 2, "HALTED"), StateChange(MON + 2 * H + H // 2, "ACTIVE"),
           StateChange(MON + 4 * H + H // 2, "PAUSED_SHABBAT")]


def report(start=None, end=None, equity=EQUITY, **kw):
    t = Tally(start, end, derive_curve=equity is None)
    t.add(fills_batch(FILLS[:2]))
    t.add(fills_batch(FILLS[2:]))
    return t.report(equity, CHANGES, **kw)


def test_round_trips_pnl_fees_and_shares_as_computed_by_hand():
    r = report()
    assert (r.fills, r.trips, r.wins, r.win_rate) == (5, 2, 1, 0.5)
    assert (r.gross_win, r.gross_loss) == (Decimal("9.79"), Decimal("-4.4"))
    assert r.profit_factor == pytest.approx(9.79 / 4.4)
    assert r.net_pnl == {"USDT": Decimal("5.39")}
    assert r.fees == {"USDT": Decimal("0.61")}
    assert r.maker_fills == 3 and r.maker_notional_share == pytest.approx(410 / 734)
    assert (r.slippage_fills, r.slippage_cost) == (2, {"USDT": Decimal("0.03")})
    assert r.slippage_bps == pytest.approx(0.03 / 734 * 1e4)
    assert list(r.trip_ts) == [MON + FILLS[1][0], MON + FILLS[3][0]]
    assert list(r.trip_pnl) == [9.79, -4.4]
    assert r.heat[0, 1] == pytest.approx(9.79) and r.heat[0, 3] == pytest.approx(-4.4)  # Monday 01h and 03h
    assert r.heat_trips.sum() == 2 and (r.start, r.end) == (MON, MON + 5 * H + H // 2)


def test_sharpe_sortino_and_drawdown_of_the_hourly_closes():
    r = report()
    closes = [1000, 1010, 1005, 1020, 1000, 1040]  # each hour's last snapshot: 05:30's, not 05:00's
    returns = [b / a - 1 for a, b in zip(closes, closes[1:])]
    mean = statistics.fmean(returns)
    assert r.hourly_closes == 6
    assert r.sharpe == pytest.approx(mean / statistics.stdev(returns) * math.sqrt(8760))
    assert r.sortino == pytest.approx(mean / math.sqrt(sum(min(x, 0) ** 2 for x in returns) / 5) * math.sqrt(8760))
    dd = r.drawdown
    assert dd.fraction == pytest.approx(20 / 1020) and dd.amount == Decimal("20")
    assert (dd.peak_ts, dd.trough_ts, dd.recovered_ts) == (MON + 3 * H, MON + 4 * H, MON + 5 * H)
    assert dd.duration_ns == 2 * H
    assert (r.equity_start, r.equity_end) == (Decimal("1000"), Decimal("1040"))


def test_halts_and_pauses_become_spans_clipped_to_the_range():
    r = report()
    assert r.spans == (Span(MON + H + H // 2, MON + 2 * H + H // 2, "HALTED"),
                       Span(MON + 4 * H + H // 2, MON + 5 * H + H // 2, "PAUSED_SHABBAT"))
    # a change before the range sets the state it starts in; changes known only from some time on
    assert state_spans([StateChange(0, "HALTED")], 10, 20) == [Span(10, 20, "HALTED")]
    assert state_spans([StateChange(15, "ACTIVE")], 10, 20, known_from=15) == []
    assert state_spans([StateChange(12, "REDUCING"), StateChange(13, "REDUCING"), StateChange(14, "HALTED")],
                       10, 20) == [Span(12, 14, "REDUCING"), Span(14, 20, "HALTED")]


def test_a_range_counts_its_own_fills_and_the_trips_closed_in_it():
    r = report(start=MON + 2 * H, end=MON + 5 * H)
    assert (r.fills, r.trips, r.gross_loss, r.wins) == (3, 1, Decimal("-4.4"), 0)
    assert r.net_pnl == {"USDT": Decimal("-4.4")}  # from 9.79 when the range began to 5.39
    assert r.fees == {"USDT": Decimal("0.4")}
    assert (r.start, r.end) == (MON + 2 * H, MON + 5 * H)


def test_without_snapshots_the_curve_is_the_net_pnl_after_each_fill():
    r = report(equity=None)
    c = r.curve
    assert c.derived and c.start is None and not c.fractional
    # 0, after each fill: -0.1 (fee), 9.79, 9.59 (fee; short 2 @ 105 marked at 105), 5.39, 5.39
    assert list(c.value) == pytest.approx([0, -0.1, 9.79, 9.59, 5.39, 5.39])
    assert r.sharpe is None and r.drawdown.fraction is None and r.drawdown.amount == Decimal("4.4")
    with_cash = report(equity=None, start_cash=Decimal("1000"))
    assert with_cash.curve.start == Decimal("1000") and with_cash.sharpe is not None


def test_nothing_to_report():
    r = Tally().report(EquitySeries([], []), [])
    assert (r.start, r.end, r.fills, r.trips, r.curve, r.drawdown, r.spans) == (None, None, 0, 0, None, None, ())
    assert r.win_rate is None and r.profit_factor is None and r.net_pnl == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=50))
def test_drawdown_is_the_deepest_fall_below_a_peak(values):
    v = np.array(values, dtype=np.float64)
    ts = np.arange(len(v), dtype=np.int64)
    dd = max_drawdown(ts, v, [str(x) for x in values], len(v))
    worst = max((max(values[:i + 1]) - x) / max(values[:i + 1]) for i, x in enumerate(values))
    assert dd.fraction == pytest.approx(worst)
    assert values[ts.tolist().index(dd.peak_ts)] - values[ts.tolist().index(dd.trough_ts)] == dd.amount
    assert dd.peak_ts <= dd.trough_ts
    if dd.amount:
        assert dd.recovered_ts is None or dd.recovered_ts > dd.trough_ts
    else:
        assert dd.duration_ns == 0
    under, fractional = underwater(v)
    assert fractional and (under >= 0).all() and under.max() == pytest.approx(worst)


def test_hourly_closes_and_ratios_need_two_returns():
    ts = np.array([0, H - 1, H, 3 * H], dtype=np.int64)
    assert list(hourly_closes(ts, np.array([1.0, 2.0, 3.0, 4.0]))) == [2.0, 3.0, 4.0]
    assert ratios(np.array([100.0, 101.0])) == (None, None)
    assert ratios(np.array([100.0, 101.0, 102.01])) == (None, None)  # no spread, no downside


def test_the_figures_agree_with_the_apis_stats_on_the_same_database(tmp_path):
    """/api/v1/stats answers from the broker's aggregates and SQL; the report folds the fills."""
    from bench.api import make_db
    from services.control import queries
    from services.report.sources import load_db
    from shared.db import close_db, init_db

    path = str(tmp_path / "qf.db")
    make_db(path, fills=3000, days=2, seed=11)
    loaded = load_db(path, None, None)
    t = Tally()
    for b in loaded.fills:
        t.add(b)
    r = t.report(loaded.equity, loaded.changes)
    init_db(path, create=False)
    try:
        s = queries.stats()
        positions = queries.positions()
    finally:
        close_db()
    assert (r.trips, r.wins, r.gross_win, r.gross_loss) == (s["round_trips"], s["wins"], s["gross_win"],
                                                            s["gross_loss"])
    assert r.profit_factor == pytest.approx(s["profit_factor"]) and r.maker_fills / r.fills == s["maker_share"]
    assert sum(r.slippage_cost.values()) == s["slippage"]["cost"]
    assert r.slippage_bps == pytest.approx(s["slippage"]["cost_bps"])
    assert r.sharpe == pytest.approx(s["equity"]["sharpe"]) and r.hourly_closes == s["equity"]["hourly_closes"]
    assert r.drawdown.fraction * 100 == pytest.approx(s["equity"]["max_drawdown_pct"])
    assert r.net_pnl == {"USDT": sum((p.net_realized + p.unrealized() for p in positions), Decimal(0))}
    assert r.fees == {"USDT": sum((p.fees for p in positions), Decimal(0))}
