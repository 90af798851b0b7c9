"""The API's Prometheus collector: trading figures from the database, O(symbols) per scrape.

Positions, P&L, fills and fill quality come from the tables the broker keeps beside the fills
(`positions`: one row per symbol; `pnl_days`: one per UTC day and symbol; shared/db.py), never
from the fills themselves: a scrape every 15 s that re-read a million fills took seconds and
held a read transaction as long. Orders by status and the latest equity come from
services/control/queries.py, as the REST views read them.

Every family, its labels and its unit (quote = the symbol's quote asset; float64, as every
Prometheus sample; the JSON API stays exact). Counters only grow while the database is kept:

    qf_fills_total                                    counter  fills stored (sum of positions.fills)
    qf_orders{status}                                 gauge    orders per status now
    qf_equity, qf_cash                                gauge    quote, the latest equity snapshot
    qf_equity_timestamp_seconds                       gauge    UNIX s of that snapshot
    qf_position{symbol}                               gauge    base qty (signed)
    qf_position_cost{symbol}                          gauge    quote, signed: qty × average entry
    qf_unrealized_pnl{symbol}                         gauge    quote, open qty at the last fill price
    qf_realized_pnl{symbol}                           gauge    quote, before fees
    qf_fees{symbol}                                   gauge    quote-asset fees
    qf_other_fees{symbol,asset}                       gauge    fees paid in another asset, in it
    qf_open_trip_pnl{symbol}                          gauge    quote, net P&L of the open round trip
    qf_last_fill_timestamp_seconds{symbol}            gauge    UNIX s of the newest fill
    qf_fills_by_liquidity_total{symbol,liquidity}     counter  fills, MAKER / TAKER
    qf_notional_total{symbol,liquidity}               counter  quote, sum of price × qty
    qf_round_trips_total{symbol}                      counter  round trips closed
    qf_round_trip_wins_total{symbol}                  counter  of which net P&L > 0
    qf_round_trip_gross_win{symbol}                   gauge    quote, sum of winning trips (≥ 0)
    qf_round_trip_gross_loss{symbol}                  gauge    quote, sum of losing trips (≤ 0)
    qf_slippage_fills_total{symbol}                   counter  fills with an arrival slippage
    qf_slippage_sum{symbol}                           gauge    quote per unit, summed over them (> 0: cost)
    qf_slippage_cost{symbol}                          gauge    quote, Σ slippage × qty
    qf_day_realized_pnl{symbol}, qf_day_fees{symbol}  gauge    quote, today (UTC) so far
    qf_day_fills{symbol}                              gauge    fills today (UTC)

Mean slippage per fill = qf_slippage_sum / qf_slippage_fills_total; slippage cost in bps =
1e4 × qf_slippage_cost / Σ qf_notional_total; maker share = MAKER / all of qf_fills_by_liquidity_total
(queries.stats() gives the same figures to the JSON API).
"""
from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.control import queries
from shared.db import PnlDayRow, PositionRow, database
from shared.ledger import Position

NS_PER_S = 1_000_000_000
DAY_NS = 86_400 * NS_PER_S

Clock = Callable[[], int]  # ns since the epoch (time.time_ns)

# (name, help, PositionRow field): one sample per symbol
_PER_SYMBOL = (
    ("qf_position", "Base position per symbol.", "qty"),
    ("qf_position_cost", "Signed cost of the open position per symbol (qty × average entry, quote asset).", "cost"),
    ("qf_realized_pnl", "Realized P&L before fees per symbol (quote asset).", "realized"),
    ("qf_fees", "Fees paid in the symbol's quote asset.", "fees"),
    ("qf_open_trip_pnl", "Net P&L of the open round trip so far per symbol (quote asset; 0 when flat).",
     "trip_pnl"),
    ("qf_round_trip_gross_win", "Sum of the winning round trips' net P&L per symbol (quote asset).", "gross_win"),
    ("qf_round_trip_gross_loss", "Sum of the losing round trips' net P&L per symbol (quote asset, ≤ 0).",
     "gross_loss"),
    ("qf_slippage_sum", "Arrival slippage summed over the fills that have one (quote per unit; > 0 is a cost): "
     "÷ qf_slippage_fills_total is the mean per fill.", "slip_sum"),
    ("qf_slippage_cost", "Arrival slippage × qty summed over fills per symbol (quote asset; > 0 is a cost).",
     "slip_cost"),
)
_COUNTERS = (
    ("qf_round_trips", "Round trips closed (to flat or through it) per symbol.", "trips"),
    ("qf_round_trip_wins", "Round trips closed with net P&L > 0 per symbol.", "wins"),
    ("qf_slippage_fills", "Fills with an arrival slippage per symbol.", "slip_n"),
)


class TradingCollector:
    """Prometheus collector over the bound database, read when collected, in one read transaction
    (a fresh registry per request, so every gunicorn worker reports the database, not its own
    memory). `clock` (ns since the epoch) picks today's UTC row of `pnl_days`. A query that fails
    raises its peewee error out of `collect()` (the API answers 503)."""

    def __init__(self, clock: Clock = time.time_ns) -> None:
        self.clock = clock

    def collect(self):
        day = self.clock() // DAY_NS
        with database.atomic():  # one snapshot: the positions, the counts and equity agree
            rows = list(PositionRow.select().order_by(PositionRow.symbol))
            days = list(PnlDayRow.select(PnlDayRow.symbol, PnlDayRow.realized, PnlDayRow.fees, PnlDayRow.fills)
                        .where(PnlDayRow.day == day).order_by(PnlDayRow.symbol).tuples())
            orders = queries.order_counts()
            equity = queries.latest_equity()

        yield CounterMetricFamily("qf_fills", "Fills stored in the database (the positions' fill counts).",
                                  value=sum(r.fills for r in rows))
        by_status = GaugeMetricFamily("qf_orders", "Orders by status.", labels=["status"])
        for status, n in sorted(orders.items()):
            by_status.add_metric([status], n)
        yield by_status
        if equity is not None:
            yield GaugeMetricFamily("qf_equity", "Latest equity snapshot (quote asset).", value=float(equity["equity"]))
            yield GaugeMetricFamily("qf_cash", "Cash at the latest equity snapshot.", value=float(equity["cash"]))
            yield GaugeMetricFamily("qf_equity_timestamp_seconds", "Time of the latest equity snapshot, UNIX seconds.",
                                    value=equity["ts"] / NS_PER_S)
        yield from _positions(rows)
        yield from _today(days)


def _positions(rows: list[PositionRow]):
    """The per-symbol families of the `positions` rows."""
    for name, doc, field in _PER_SYMBOL:
        fam = GaugeMetricFamily(name, doc, labels=["symbol"])
        for r in rows:
            fam.add_metric([r.symbol], float(getattr(r, field)))
        yield fam
    for name, doc, field in _COUNTERS:
        fam = CounterMetricFamily(name, doc, labels=["symbol"])
        for r in rows:
            fam.add_metric([r.symbol], getattr(r, field))
        yield fam
    unrealized = GaugeMetricFamily("qf_unrealized_pnl", "Open position marked at the last fill price minus its "
                                   "cost per symbol (quote asset).", labels=["symbol"])
    last = GaugeMetricFamily("qf_last_fill_timestamp_seconds", "Time of the symbol's newest fill, UNIX seconds.",
                             labels=["symbol"])
    other = GaugeMetricFamily("qf_other_fees", "Fees paid in an asset other than the symbol's quote asset, "
                              "in that asset.", labels=["symbol", "asset"])
    fills = CounterMetricFamily("qf_fills_by_liquidity", "Fills per symbol, as maker or taker.",
                                labels=["symbol", "liquidity"])
    notional = CounterMetricFamily("qf_notional", "Traded notional (price × qty) per symbol, as maker or taker "
                                   "(quote asset).", labels=["symbol", "liquidity"])
    for r in rows:
        pos = Position(r.symbol, qty=r.qty, cost=r.cost, last_price=r.last_price)
        unrealized.add_metric([r.symbol], float(pos.unrealized()) if r.last_price is not None else 0.0)
        if r.last_ts is not None:
            last.add_metric([r.symbol], r.last_ts / NS_PER_S)
        for asset, amount in sorted(json.loads(r.other_fees or "{}").items()):
            other.add_metric([r.symbol, asset], float(Decimal(amount)))
        fills.add_metric([r.symbol, "MAKER"], r.maker_fills)
        fills.add_metric([r.symbol, "TAKER"], r.fills - r.maker_fills)
        notional.add_metric([r.symbol, "MAKER"], float(r.maker_notional))
        notional.add_metric([r.symbol, "TAKER"], float(r.notional - r.maker_notional))
    yield from (unrealized, last, other, fills, notional)


def _today(days: list[tuple]):
    """Today's (UTC) families from its `pnl_days` rows: (symbol, realized, fees, fills)."""
    realized = GaugeMetricFamily("qf_day_realized_pnl", "Realized P&L before fees today (UTC) per symbol "
                                 "(quote asset).", labels=["symbol"])
    fees = GaugeMetricFamily("qf_day_fees", "Quote-asset fees paid today (UTC) per symbol.", labels=["symbol"])
    fills = GaugeMetricFamily("qf_day_fills", "Fills today (UTC) per symbol.", labels=["symbol"])
    for symbol, day_realized, day_fees, n in days:
        realized.add_metric([symbol], float(Decimal(day_realized)))
        fees.add_metric([symbol], float(Decimal(day_fees)))
        fills.add_metric([symbol], n)
    yield from (realized, fees, fills)
