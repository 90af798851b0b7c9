"""The API's TradingCollector over a real SQLite file: per-symbol figures from the `positions` rows
(one per symbol, as the broker keeps them), today's from `pnl_days`, totals from the same rows,
never from the fills; and the same samples through the app's /metrics."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app
from services.api.collector import DAY_NS, TradingCollector
from shared.db import EquitySnapshot, FillRow, OrderCountRow, PnlDayRow, PositionRow

NOW = 20_000 * DAY_NS + 3_600 * 1_000_000_000  # 1 h into UTC day 20000


def position(symbol: str, **fields) -> dict:
    """A `positions` row: a flat, untraded symbol unless `fields` say otherwise (strings → Decimal)."""
    row = {"symbol": symbol, "qty": "0", "cost": "0", "realized": "0", "fees": "0", "other_fees": "{}",
           "fills": 0, "last_price": None, "last_ts": None, "trip_pnl": "0", "trips": 0, "wins": 0,
           "gross_win": "0", "gross_loss": "0", "maker_fills": 0, "notional": "0", "maker_notional": "0",
           "slip_n": 0, "slip_sum": "0", "slip_cost": "0"}
    row.update(fields)
    return {k: Decimal(v) if isinstance(v, str) and k not in ("symbol", "other_fees") else v for k, v in row.items()}


@pytest.fixture
def book(db):
    """Two symbols' positions, today's and yesterday's P&L rows, order counts and equity snapshots."""
    with db.bind_ctx([PositionRow, PnlDayRow, OrderCountRow, EquitySnapshot]):
        PositionRow.create(**position(
            "BTCUSDT", qty="0.002", cost="120.5", realized="1.25", fees="0.125", fills=7, last_price="60300",
            last_ts=NOW - 5_000_000_000, trip_pnl="-0.5", trips=3, wins=2, gross_win="2.5", gross_loss="-1.25",
            maker_fills=4, notional="840.25", maker_notional="480.25", slip_n=6, slip_sum="3.6",
            slip_cost="0.0021", other_fees=json.dumps({"BNB": "0.0003"})))
        PositionRow.create(**position("ETHUSDT", qty="-0.5", cost="-1500", realized="-2", fees="0.5", fills=2,
                                      last_price="3010", last_ts=NOW - 60_000_000_000, notional="3000"))
        PnlDayRow.create(day=NOW // DAY_NS, symbol="BTCUSDT", realized=Decimal("0.75"), fees=Decimal("0.05"),
                         fills=3, trips=1, wins=1, notional=Decimal("360"))
        PnlDayRow.create(day=NOW // DAY_NS - 1, symbol="ETHUSDT", realized=Decimal("-2"), fees=Decimal("0.5"),
                         fills=2, trips=0, wins=0, notional=Decimal("3000"))
        for status, n in (("FILLED", 5), ("CANCELLED", 3), ("PENDING", 1)):
            OrderCountRow.create(status=status, n=n)
        EquitySnapshot.create(ts=NOW - 2_000_000_000, equity=Decimal("9999"), cash=Decimal("9000"))
        EquitySnapshot.create(ts=NOW - 1_000_000_000, equity=Decimal("10001.5"), cash=Decimal("8879.5"))
    return db


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape(clock_ns: int = NOW) -> dict[tuple, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TradingCollector(clock=lambda: clock_ns))
    return samples(generate_latest(registry).decode())


def sym(symbol: str, **more: str) -> tuple:
    return tuple(sorted({"symbol": symbol, **more}.items()))


def test_every_family_comes_from_the_positions_rows(book):
    got = scrape()
    btc, eth = sym("BTCUSDT"), sym("ETHUSDT")
    assert got[("qf_fills_total", ())] == 9  # the positions' counts
    assert got[("qf_position", btc)] == 0.002 and got[("qf_position", eth)] == -0.5
    assert got[("qf_position_cost", btc)] == 120.5
    assert got[("qf_realized_pnl", btc)] == 1.25 and got[("qf_realized_pnl", eth)] == -2
    assert got[("qf_fees", btc)] == 0.125
    assert got[("qf_other_fees", sym("BTCUSDT", asset="BNB"))] == 0.0003
    assert got[("qf_unrealized_pnl", btc)] == pytest.approx(0.002 * 60300 - 120.5)  # 0.1 at the last fill price
    assert got[("qf_unrealized_pnl", eth)] == pytest.approx(-0.5 * 3010 + 1500)  # short: -5
    assert got[("qf_open_trip_pnl", btc)] == -0.5
    assert got[("qf_last_fill_timestamp_seconds", btc)] == (NOW - 5_000_000_000) / 1e9
    assert got[("qf_fills_by_liquidity_total", sym("BTCUSDT", liquidity="MAKER"))] == 4
    assert got[("qf_fills_by_liquidity_total", sym("BTCUSDT", liquidity="TAKER"))] == 3
    assert got[("qf_fills_by_liquidity_total", sym("ETHUSDT", liquidity="MAKER"))] == 0
    assert got[("qf_notional_total", sym("BTCUSDT", liquidity="MAKER"))] == 480.25
    assert got[("qf_notional_total", sym("BTCUSDT", liquidity="TAKER"))] == 360
    assert got[("qf_round_trips_total", btc)] == 3 and got[("qf_round_trip_wins_total", btc)] == 2
    assert got[("qf_round_trip_gross_win", btc)] == 2.5 and got[("qf_round_trip_gross_loss", btc)] == -1.25
    assert got[("qf_slippage_fills_total", btc)] == 6
    assert got[("qf_slippage_sum", btc)] / got[("qf_slippage_fills_total", btc)] == pytest.approx(0.6)
    assert got[("qf_slippage_cost", btc)] == 0.0021


def test_orders_and_equity_as_the_query_layer_gives_them(book):
    got = scrape()
    assert got[("qf_orders", (("status", "FILLED"),))] == 5
    assert got[("qf_orders", (("status", "CANCELLED"),))] == 3
    assert got[("qf_orders", (("status", "REJECTED"),))] == 0  # every status, zero when none
    assert got[("qf_equity", ())] == 10001.5 and got[("qf_cash", ())] == 8879.5  # the newest snapshot
    assert got[("qf_equity_timestamp_seconds", ())] == (NOW - 1_000_000_000) / 1e9


def test_today_is_the_clocks_utc_day(book):
    got = scrape()
    assert got[("qf_day_realized_pnl", sym("BTCUSDT"))] == 0.75
    assert got[("qf_day_fees", sym("BTCUSDT"))] == 0.05
    assert got[("qf_day_fills", sym("BTCUSDT"))] == 3
    assert ("qf_day_realized_pnl", sym("ETHUSDT")) not in got  # yesterday's row
    yesterday = scrape(NOW - DAY_NS)
    assert yesterday[("qf_day_realized_pnl", sym("ETHUSDT"))] == -2
    assert ("qf_day_realized_pnl", sym("BTCUSDT")) not in yesterday


def test_fills_alone_are_not_read(db):
    """A fill the broker has not yet folded into `positions` counts nowhere: the collector never
    reads the fills table (a million of them made every scrape take seconds)."""
    with db.bind_ctx([FillRow]):
        FillRow.create(fill_id="f1", order_id="o1", client_order_id="c1", symbol="BTCUSDT", side="BUY",
                       price=Decimal("100"), qty=Decimal("1"), fee=Decimal(0), fee_asset="USDT",
                       liquidity="TAKER", exch_ts=1, ts=1)
    got = scrape()
    assert got[("qf_fills_total", ())] == 0
    assert not [k for k in got if k[0] == "qf_position"]
    assert ("qf_equity", ()) not in got  # no snapshot yet: no equity sample rather than a made-up 0


def test_a_flat_untraded_symbol_has_zeros_and_no_last_fill(db):
    with db.bind_ctx([PositionRow]):
        PositionRow.create(**position("SOLUSDT"))
    got = scrape()
    assert got[("qf_position", sym("SOLUSDT"))] == 0
    assert got[("qf_unrealized_pnl", sym("SOLUSDT"))] == 0
    assert ("qf_last_fill_timestamp_seconds", sym("SOLUSDT")) not in got


def test_the_apps_metrics_serve_the_collector(api_config, book):
    app = create_app(api_config)
    try:
        resp = app.test_client().get("/metrics")
        assert resp.status_code == 200
        got = samples(resp.get_data(as_text=True))
    finally:
        handle = app.extensions["qf_db"]
        if handle.db is not None:
            handle.db.close()
    assert got[("qf_fills_total", ())] == 9
    assert got[("qf_slippage_cost", sym("BTCUSDT"))] == 0.0021
    assert ("qf_trading_paused", (("reason", "shabbat"),)) in got  # the pause's gauges beside it
