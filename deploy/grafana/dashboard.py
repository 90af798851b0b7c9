"""Builds deploy/grafana/dashboards/quantumflow.json, the on-call dashboard: `python deploy/grafana/dashboard.py`.

Why a script: forty panels of Grafana JSON differ in a title, a query and a unit; written by hand,
ids collide, grid positions overlap and one panel forgets its data source. Here each panel is one
call, the layout is computed row by row, and tests/test_deploy_files.py checks that the JSON
checked in is what this script writes. Edit this file, run it, commit both.

Every query is plain PromQL on the metrics the services export (README, "Metrics and alerts";
services/api/collector.py lists the API's): no Grafana template variable, because
tests/test_compose.py sends each query to Prometheus as it stands, and
tests/prometheus/test_dashboard.py runs every one against a Prometheus scraping the real services.
Rate windows are fixed ([1m] for feed rates, [5m] elsewhere) and hold at least four samples at
the 15 s scrape interval (deploy/prometheus.yml).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "quantumflow.json"
DATASOURCE = {"type": "prometheus", "uid": "quantumflow-prometheus"}  # provisioning/datasources/prometheus.yml
WIDTH = 24  # Grafana's grid

MONEY = "currencyUSD"  # the quote asset: USDT for every configured symbol so far (≈ $)
GREEN, ORANGE, RED, BLUE, GRAY = "green", "orange", "red", "blue", "gray"


# -- building blocks ------------------------------------------------------------------------------

def q(expr: str, legend: str = "", instant: bool = False) -> dict:
    """One Prometheus query of a panel (its refId is given by position)."""
    return {"expr": expr, "legendFormat": legend or "__auto", "range": not instant, "instant": instant}


def steps(*pairs) -> dict:
    """Absolute thresholds: steps("green", 5, "orange", 30, "red") → green below 5, orange below 30, red."""
    out = [{"color": pairs[0], "value": None}]
    for value, color in zip(pairs[1::2], pairs[2::2]):
        out.append({"color": color, "value": value})
    return {"mode": "absolute", "steps": out}


def values(*items) -> list[dict]:
    """Value mappings: values((1, "SYNCED", "green"), (0, "NOT SYNCED", "red")); a value of None
    maps "no data" (null or NaN)."""
    exact = {str(v): {"text": text, "color": color, "index": i}
             for i, (v, text, color) in enumerate(items) if v is not None}
    out = [{"type": "value", "options": exact}] if exact else []
    for i, (v, text, color) in enumerate(items):
        if v is None:
            out.append({"type": "special", "options": {"match": "null+nan", "result": {"text": text, "color": color,
                                                                                  "index": i}}})
    return out


def panel(kind: str, title: str, description: str, targets: list[dict], *, w: int, h: int, unit: str = "short",
          thresholds: dict | None = None, mappings: list | None = None, decimals: int | None = None,
          minimum: float | None = None, maximum: float | None = None, options: dict | None = None,
          custom: dict | None = None, overrides: list | None = None, color: dict | None = None) -> dict:
    defaults = {"unit": unit, "thresholds": thresholds or steps(GREEN), "mappings": mappings or [],
                "color": color or {"mode": "thresholds" if kind in ("stat", "gauge", "state-timeline")
                                   else "palette-classic"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if custom:
        defaults["custom"] = custom
    for ref, target in zip("ABCDEFGHIJ", targets):
        target.update({"refId": ref, "datasource": dict(DATASOURCE)})
    return {"type": kind, "title": title, "description": description, "datasource": dict(DATASOURCE),
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": options or {}, "_size": (w, h)}


def timeseries(title: str, description: str, targets: list[dict], *, w: int = 12, h: int = 8, unit: str = "short",
               thresholds: dict | None = None, log: bool = False, bars: bool = False, zero: bool = True,
               **kw) -> dict:
    """A graph; thresholds, when given, are drawn as dashed lines. `zero`: the axis takes in 0 (not
    for a log scale, nor for figures far from it such as equity)."""
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 40 if bars else 8,
              "showPoints": "never", "spanNulls": False,
              "thresholdsStyle": {"mode": "dashed" if thresholds else "off"}}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    elif zero:
        custom["axisSoftMin"] = 0
    legend = {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull", "max"]}
    options = {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, description, targets, w=w, h=h, unit=unit, thresholds=thresholds,
                 custom=custom, options=options, **kw)


def stat(title: str, description: str, targets: list[dict], *, w: int = 4, h: int = 4, unit: str = "short",
         background: bool = True, graph: bool = False, **kw) -> dict:
    """The last value of each series, coloured by thresholds or value mappings (in the text colour
    when it has neither and no `background`)."""
    if not background and "thresholds" not in kw and "mappings" not in kw:
        kw["color"] = {"mode": "fixed", "fixedColor": "text"}
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "background" if background else "value", "graphMode": "area" if graph else "none",
               "textMode": "value_and_name" if any(t["legendFormat"] != "__auto" for t in targets) else "value",
               "justifyMode": "auto", "orientation": "auto", "wideLayout": True, "showPercentChange": False}
    return panel("stat", title, description, targets, w=w, h=h, unit=unit, options=options, **kw)


def row(title: str, *panels: dict) -> tuple[str, tuple[dict, ...]]:
    return title, panels


def quantiles(metric: str, by: str = "", window: str = "5m", qs=(0.5, 0.99), legend: str = "") -> list[dict]:
    """histogram_quantile targets of `metric` (a histogram's base name), grouped by `by` too."""
    group = f"le, {by}" if by else "le"
    label = f" {{{{{by}}}}}" if by else ""
    return [q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket[{window}])))",
              f"{legend}p{round(p * 100)}{label}") for p in qs]


# -- the queries both a panel and another need ------------------------------------------------------

STATE_CODE = ('sum(qf_risk_trading_state{state="ACTIVE"} or qf_risk_trading_state{state="REDUCING"} * 2'
              ' or qf_risk_trading_state{state="HALTED"} * 3 or qf_risk_trading_state{state="PAUSED_SHABBAT"} * 4)')
STATE_MAPPINGS = values((0, "NO STATE", GRAY), (1, "ACTIVE", GREEN), (2, "REDUCING", ORANGE), (3, "HALTED", RED),
                        (4, "PAUSED (SHABBAT)", BLUE))
SERVICES = 'job=~"quantumflow-.*"'
BY_SYMBOL_MAKER_SHARE = ('sum by (symbol) ({m}{{liquidity="MAKER"}}) / sum by (symbol) ({m})')
HOPS = (  # (title, histogram, description)
    ("Exchange → marketdata (event lag)", "qf_md_exchange_lag_seconds",
     "Local receive time minus Binance's event time (E), per symbol: the network and Binance's own "
     "delay, clock offset included."),
    ("marketdata: one depth event", "qf_md_event_seconds",
     "Parse, apply to the book, encode and publish one depth event (budget 25 µs)."),
    ("strategy: decision per book", "qf_strategy_decision_seconds",
     "Features and decision per book, wall time; the loop thread's CPU time beside it."),
    ("risk: checks (inside risk)", "qf_risk_check_seconds",
     "Time inside risk per order, the broker's round trip excluded."),
    ("risk: order decided (broker round trip included)", "qf_risk_decision_seconds",
     "From the order's arrival at risk to its answer: checks, the broker's acknowledgement, encoding."),
    ("broker: request → reply", "qf_broker_request_seconds",
     "Order or cancel received to reply sent, simulated exchange latency included."),
)


def dashboard_rows() -> list[tuple[str, tuple[dict, ...]]]:
    return [
        row("Services",
            stat("Up", "1 while Prometheus reads the service's /metrics (ServiceDown after 1 min of 0).",
                 [q(f"up{{{SERVICES}}}", "{{service}}")], w=8,
                 mappings=values((1, "UP", GREEN), (0, "DOWN", RED)), thresholds=steps(RED, 1, GREEN)),
            stat("Heartbeat age", "Time since each service's loop last touched its liveness file: the HTTP "
                 "thread answers while a stuck loop does not (ServiceHeartbeatStale over 10 s).",
                 [q(f"qf_heartbeat_age_seconds{{{SERVICES}}}", "{{service}}")], w=8, unit="s", decimals=1,
                 thresholds=steps(GREEN, 5, ORANGE, 10, RED), mappings=values((None, "NO FILE", GRAY))),
            stat("Restarts (1 h)", "New process start times per service in the last hour (ServiceRestarting "
                 "at 3 in 15 min).", [q(f"changes(process_start_time_seconds{{{SERVICES}}}[1h])", "{{service}}")],
                 w=4, thresholds=steps(GREEN, 1, ORANGE, 3, RED)),
            stat("Broker storage", "Whether the broker's journal and database take writes (new orders get "
                 "STORE_UNAVAILABLE while they do not).", [q("qf_broker_store_available")], w=2,
                 mappings=values((1, "OK", GREEN), (0, "REFUSED", RED)), thresholds=steps(RED, 1, GREEN)),
            stat("Journal backlog", "Broker journal records not yet stored into SQLite (JournalBacklog over 100 "
                 "for 1 min).", [q("qf_broker_journal_pending_records")], w=2,
                 thresholds=steps(GREEN, 10, ORANGE, 100, RED)),
            timeseries("Alerts raised (per 5 min)", "The services' own alert conditions (shared/alerts.py: what "
                       "the notifier sends), by service and code.",
                       [q("sum by (service, code) (increase(qf_alerts_total[5m]))", "{{service}} {{code}}")],
                       bars=True),
            timeseries("Errors per minute", "Messages whose handling failed, and frames that were not valid "
                       "messages, per service.",
                       [q("60 * sum(rate(qf_risk_failures_total[5m]))", "risk failures"),
                        q("60 * sum(rate(qf_broker_request_failures_total[5m]))", "broker failures"),
                        q("60 * sum(rate(qf_strategy_errors_total[5m]))", "strategy errors"),
                        q('60 * sum by (service) (rate({__name__=~"qf_(md|risk|broker|strategy)_decode_errors_total"}'
                          '[5m]))', "decode errors {{service}}"),
                        q("60 * sum by (reason) (rate(qf_broker_bad_market_data_total[5m]))",
                          "broker refused market data: {{reason}}")],
                       unit="cpm", thresholds=steps(GREEN, 1, RED))),

        row("Feed health",
            stat("Book synced", "1 while marketdata publishes a synced book of the symbol (FeedNotSynced after "
                 "1 min of 0): without one the strategy does not trade it and risk denies STALE_BOOK.",
                 [q("qf_md_synced", "{{symbol}}")], w=6,
                 mappings=values((1, "SYNCED", GREEN), (0, "NOT SYNCED", RED)), thresholds=steps(RED, 1, GREEN)),
            stat("Book age", "Time since the book last applied a depth event (NoBook over 30 s).",
                 [q("qf_md_book_age_seconds", "{{symbol}}")], w=6, unit="s", decimals=1,
                 thresholds=steps(GREEN, 5, ORANGE, 30, RED), mappings=values((None, "NO EVENT YET", GRAY))),
            stat("Without a book now", "How long the symbol has had no synced book (0 while it has one).",
                 [q("qf_md_unsynced_seconds", "{{symbol}}")], w=6, unit="s", decimals=0,
                 thresholds=steps(GREEN, 5, ORANGE, 60, RED)),
            stat("Without a book (24 h)", "Time the symbol had no synced book over the last 24 hours.",
                 [q("increase(qf_md_no_book_seconds_total[24h])", "{{symbol}}")], w=6, unit="s", decimals=0,
                 thresholds=steps(GREEN, 60, ORANGE, 600, RED)),
            timeseries("Feed messages per second", "WebSocket messages by symbol and stream, and the books "
                       "marketdata published from them.",
                       [q("sum by (symbol, stream) (rate(qf_md_events_total[1m]))", "{{symbol}} {{stream}}"),
                        q("sum by (symbol) (rate(qf_md_books_published_total[1m]))", "{{symbol}} books published")],
                       unit="cps"),
            timeseries("Gaps, resyncs, stalls, reconnects (per 5 min)", "Update-id gaps (book discarded), books "
                       "rebuilt from a new snapshot, stalls (no book while frames arrive), connections lost and "
                       "reopened, planned switches to a new connection.",
                       [q("sum by (symbol) (increase(qf_md_gaps_total[5m]))", "gaps {{symbol}}"),
                        q("sum by (symbol) (increase(qf_md_resyncs_total[5m]))", "resyncs {{symbol}}"),
                        q("sum by (symbol) (increase(qf_md_stalls_total[5m]))", "stalls {{symbol}}"),
                        q("sum by (market) (increase(qf_md_reconnects_total[5m]))", "reconnects {{market}}"),
                        q("sum by (market) (increase(qf_md_connection_switches_total[5m]))",
                          "planned switches {{market}}")],
                       bars=True, thresholds=steps(GREEN, 1, ORANGE)),
            timeseries("Book age over time", "Time since the book last applied a depth event (NoBook over 30 s).",
                       [q("qf_md_book_age_seconds", "{{symbol}}")], w=8, h=7, unit="s",
                       thresholds=steps(GREEN, 5, ORANGE, 30, RED)),
            timeseries("bookTicker disagreements", "Share of bookTicker best levels that differ from the book's "
                       "(a book that drifted from the exchange's shows here first).",
                       [q('sum by (symbol) (rate(qf_md_book_ticker_checks_total{result="mismatch"}[5m])) '
                          '/ sum by (symbol) (rate(qf_md_book_ticker_checks_total[5m]))', "{{symbol}}")],
                       w=8, h=7, unit="percentunit", thresholds=steps(GREEN, 0.01, ORANGE, 0.05, RED)),
            timeseries("Depth snapshots (per 5 min)", "REST depth snapshots by outcome, requests held back by "
                       "the per-symbol backoff, and Binance's used request weight (right axis).",
                       [q("sum by (market, outcome) (increase(qf_md_snapshots_total[5m]))", "{{market}} {{outcome}}"),
                        q("sum by (symbol) (increase(qf_md_snapshots_deferred_total[5m]))", "deferred {{symbol}}"),
                        q("qf_md_used_weight", "used weight (1 min) {{market}}")],
                       w=8, h=7, bars=True,
                       overrides=[{"matcher": {"id": "byFrameRefID", "options": "C"},
                                   "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                                  {"id": "custom.drawStyle", "value": "line"}]}])),

        row("Per-hop latency",
            timeseries("p99 by hop", "The 99th percentile of every hop on one log scale: where the time goes "
                       "from the exchange's event to the broker's reply. Tick-to-trade is not exported yet.",
                       [q(f"histogram_quantile(0.99, sum by (le) (rate({metric}_bucket[5m])))", title)
                        for title, metric, _ in HOPS],
                       w=24, h=9, unit="s", log=True),
            *[timeseries(title, desc + " p50 and p99 over 5 min.",
                         quantiles(metric, by="symbol" if metric == "qf_md_exchange_lag_seconds" else "")
                         + (quantiles("qf_strategy_decision_cpu_seconds", qs=(0.99,), legend="CPU ")
                            if metric == "qf_strategy_decision_seconds" else []),
                         w=8, h=7, unit="s",
                         thresholds=steps(GREEN, 25e-6, ORANGE) if metric == "qf_md_event_seconds" else None)
              for title, metric, desc in HOPS]),

        row("Risk state",
            stat("Trading state", "Risk's trading state: ACTIVE, REDUCING (only orders that reduce a position), "
                 "HALTED (none), PAUSED (Shabbat or Yom Tov).", [q(STATE_CODE)], w=4, h=5,
                 mappings=STATE_MAPPINGS, thresholds=steps(GRAY)),
            stat("Strategy reaches risk", "0 while risk does not answer the strategy: it sends no orders until "
                 "a STATE request is answered.", [q("qf_strategy_risk_reachable")], w=4, h=5,
                 mappings=values((1, "YES", GREEN), (0, "NO", RED)), thresholds=steps(RED, 1, GREEN)),
            panel("state-timeline", "Trading state over time", "Risk's trading state, as it changed.",
                  [q(STATE_CODE, "state")], w=16, h=5, mappings=STATE_MAPPINGS, thresholds=steps(GRAY),
                  options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.9, "alignValue": "left",
                           "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
                           "tooltip": {"mode": "single", "sort": "none"}},
                  custom={"fillOpacity": 80, "lineWidth": 0}),
            panel("gauge", "Drawdown", "Equity below its peak, as risk marks it (DrawdownHigh over 2 %; "
                  "QF_RISK_DRAWDOWN_SOFT 3 % → REDUCING; QF_RISK_MAX_DRAWDOWN 5 % → HALTED, the defaults).",
                  [q("qf_risk_drawdown_ratio")], w=6, h=7, unit="percentunit", decimals=2, minimum=0,
                  maximum=0.05, thresholds=steps(GREEN, 0.02, ORANGE, 0.03, RED),
                  options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "showThresholdLabels": False, "showThresholdMarkers": True}),
            timeseries("Drawdown over time", "Equity below its peak, as risk marks it; dashed: DrawdownHigh (2 %) and "
                       "the default REDUCING limit (3 %).", [q("qf_risk_drawdown_ratio", "drawdown")], w=6, h=7,
                       unit="percentunit", thresholds=steps(GREEN, 0.02, ORANGE, 0.03, RED)),
            timeseries("Risk decisions per second", "Orders decided by risk, by verdict.",
                       [q("sum by (verdict) (rate(qf_risk_decisions_total[5m]))", "{{verdict}}")], w=12, h=7,
                       unit="cps"),
            timeseries("Denials per minute by reason", "Orders risk denied, by reason code; and every rejection "
                       "the strategy saw (risk's, the broker's, or no answer), by reason.",
                       [q('60 * sum by (code) (rate(qf_risk_decisions_total{verdict="REJECTED"}[5m]))',
                          "risk: {{code}}"),
                        q("60 * sum by (reason) (rate(qf_strategy_rejections_total[5m]))", "strategy saw: {{reason}}")],
                       unit="cpm", bars=True),
            timeseries("State changes (per hour)", "Trading-state changes by cause, and flattens before a pause "
                       "that left a position or an order.",
                       [q("sum by (code) (increase(qf_risk_state_changes_total[1h]))", "{{code}}"),
                        q("sum(increase(qf_risk_pause_flatten_failures_total[1h]))", "pause flatten failed")],
                       bars=True, thresholds=steps(GREEN, 1, ORANGE)),
            stat("Trading paused", "1 while trading is paused for Shabbat or Yom Tov (the calendar, QF_SHABBAT_*).",
                 [q('qf_trading_paused{reason="shabbat"}')], w=6,
                 mappings=values((0, "TRADING", GREEN), (1, "PAUSED", BLUE)), thresholds=steps(GREEN)),
            stat("Flatten before the pause", "1 in the window before a pause when positions are flattened "
                 "(QF_SHABBAT_FLATTEN_MIN).", [q("qf_shabbat_flattening")], w=6,
                 mappings=values((0, "NO", GREEN), (1, "FLATTENING", ORANGE)), thresholds=steps(GREEN)),
            stat("Next pause starts", "Candle-lighting of the current or next pause (none while the pause is "
                 "off).", [q("qf_shabbat_next_start_timestamp_seconds * 1000")], w=6, unit="dateTimeFromNow",
                 background=False),
            stat("Pause ends", "Nightfall ending the current or next pause.",
                 [q("qf_shabbat_next_end_timestamp_seconds * 1000")], w=6, unit="dateTimeFromNow",
                 background=False)),

        row("P&L",
            stat("Equity", "Latest equity snapshot (quote asset, marked to mid at each fill).", [q("qf_equity")],
                 unit=MONEY, decimals=2, background=False, graph=True),
            stat("Cash", "Cash at the latest equity snapshot.", [q("qf_cash")], unit=MONEY, decimals=2,
                 background=False),
            stat("Net realized P&L", "Realized P&L minus quote-asset fees, every symbol.",
                 [q("sum(qf_realized_pnl) - sum(qf_fees)")], unit=MONEY, decimals=2, thresholds=steps(RED, 0, GREEN)),
            stat("Unrealized P&L", "Open positions at their last fill price minus their cost.",
                 [q("sum(qf_unrealized_pnl)")], unit=MONEY, decimals=2, thresholds=steps(RED, 0, GREEN)),
            stat("Today's net realized (UTC)", "Realized P&L minus fees of today's fills (UTC day).",
                 [q("sum(qf_day_realized_pnl) - sum(qf_day_fees)")], unit=MONEY, decimals=2,
                 thresholds=steps(RED, 0, GREEN)),
            stat("Fees", "Quote-asset fees paid, every symbol.", [q("sum(qf_fees)")], unit=MONEY, decimals=2,
                 background=False),
            timeseries("Equity and cash", "The broker's equity snapshots (marked to mid at each fill), risk's "
                       "own marks, and cash.",
                       [q("qf_equity", "equity"), q("qf_risk_equity", "equity (risk's marks)"), q("qf_cash", "cash")],
                       unit=MONEY, zero=False),
            timeseries("P&L by symbol", "Realized before and after quote fees, and the open position at its "
                       "last fill price.",
                       [q("qf_realized_pnl", "{{symbol}} realized"),
                        q("qf_realized_pnl - qf_fees", "{{symbol}} realized net of fees"),
                        q("qf_unrealized_pnl", "{{symbol}} unrealized")],
                       unit=MONEY, thresholds=steps(RED, 0, GREEN)),
            timeseries("Position by symbol", "Base-asset position as the database holds it, and as the "
                       "strategy follows it (they should agree).",
                       [q("qf_position", "{{symbol}}"), q("qf_strategy_position", "{{symbol}} (strategy)")],
                       w=8, unit="none"),
            timeseries("Fees by symbol", "Fees in the quote asset, and in any other asset (in that asset).",
                       [q("qf_fees", "{{symbol}}"), q("qf_other_fees", "{{symbol}} in {{asset}}")], w=8, unit="none"),
            stat("Round trips", "Round trips closed, the share that made money after fees, and the profit "
                 "factor (gross wins ÷ gross losses).",
                 [q("sum by (symbol) (qf_round_trips_total)", "{{symbol}} trips"),
                  q("sum by (symbol) (qf_round_trip_wins_total) / sum by (symbol) (qf_round_trips_total)",
                    "{{symbol}} win rate"),
                  q("sum by (symbol) (qf_round_trip_gross_win) / -sum by (symbol) (qf_round_trip_gross_loss)",
                    "{{symbol}} profit factor")],
                 w=8, h=8, background=False,
                 overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                             "properties": [{"id": "unit", "value": "percentunit"}, {"id": "decimals", "value": 1}]},
                            {"matcher": {"id": "byFrameRefID", "options": "C"},
                             "properties": [{"id": "decimals", "value": 2}]}])),

        row("Fills and orders",
            stat("Fills", "Fills stored in the database.", [q("qf_fills_total")], background=False, graph=True),
            stat("Fills today (UTC)", "Fills of today's UTC day.", [q("sum(qf_day_fills)")], background=False),
            stat("Open orders", "Orders PENDING or PARTIALLY_FILLED.",
                 [q('sum(qf_orders{status=~"PENDING|PARTIALLY_FILLED"})')], background=False),
            stat("Since the last fill", "Time since each symbol's newest fill.",
                 [q("time() - qf_last_fill_timestamp_seconds", "{{symbol}}")], w=6, unit="s", decimals=0,
                 background=False),
            stat("Notional traded (1 h)", "Price × quantity of the last hour's fills.",
                 [q("sum(increase(qf_notional_total[1h]))")], w=6, unit=MONEY, decimals=0, background=False),
            timeseries("Fills per minute", "By symbol and liquidity from the database; the broker's own count "
                       "by liquidity (every symbol) beside it.",
                       [q("60 * sum by (symbol, liquidity) (rate(qf_fills_by_liquidity_total[5m]))",
                          "{{symbol}} {{liquidity}}"),
                        q("60 * sum by (liquidity) (rate(qf_broker_fills_total[5m]))", "broker {{liquidity}}")],
                       unit="cpm"),
            timeseries("Notional per hour", "Price × quantity traded over the last hour, by symbol and liquidity.",
                       [q("sum by (symbol, liquidity) (increase(qf_notional_total[1h]))", "{{symbol}} {{liquidity}}")],
                       unit=MONEY),
            timeseries("Orders by status", "Orders stored, by their current status.",
                       [q("qf_orders", "{{status}}")], w=8),
            timeseries("Order changes per minute", "Order changes the broker committed, by resulting status.",
                       [q("60 * sum by (status) (rate(qf_broker_orders_total[5m]))", "{{status}}")], w=8, unit="cpm"),
            timeseries("Strategy order flow per minute", "Orders and cancels the strategy sent, risk's answers, "
                       "and requests risk did not answer.",
                       [q("60 * rate(qf_strategy_orders_total[5m])", "orders sent"),
                        q("60 * rate(qf_strategy_cancels_total[5m])", "cancels sent"),
                        q("60 * sum by (verdict) (rate(qf_strategy_risk_answers_total[5m]))", "risk {{verdict}}"),
                        q("60 * rate(qf_strategy_no_reply_total[5m])", "no reply")],
                       w=8, unit="cpm")),

        row("Fill quality",
            stat("Maker share (fills)", "Share of fills that rested on the book (maker), all fills so far.",
                 [q(BY_SYMBOL_MAKER_SHARE.format(m="qf_fills_by_liquidity_total"), "{{symbol}}")], w=6,
                 unit="percentunit", decimals=1, background=False),
            stat("Maker share (notional)", "Share of traded notional filled as maker, all fills so far.",
                 [q(BY_SYMBOL_MAKER_SHARE.format(m="qf_notional_total"), "{{symbol}}")], w=6, unit="percentunit",
                 decimals=1, background=False),
            stat("Mean slippage per fill", "Fill price against the mid when the order arrived, per unit of base "
                 "(quote asset; > 0 is a cost), averaged over the fills that have it.",
                 [q("sum by (symbol) (qf_slippage_sum) / sum by (symbol) (qf_slippage_fills_total)", "{{symbol}}")],
                 w=6, unit=MONEY, decimals=4, background=False, thresholds=steps(GREEN, 0, ORANGE)),
            stat("Slippage cost", "Slippage × quantity over all fills (quote asset), and as basis points of the "
                 "notional traded.",
                 [q("sum by (symbol) (qf_slippage_cost)", "{{symbol}}"),
                  q("1e4 * sum by (symbol) (qf_slippage_cost) / sum by (symbol) (qf_notional_total)", "{{symbol}} bp")],
                 w=6, unit=MONEY, decimals=4, background=False, thresholds=steps(GREEN, 0, ORANGE),
                 overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                             "properties": [{"id": "unit", "value": "suffix: bp"}, {"id": "decimals", "value": 2},
                                            {"id": "thresholds", "value": steps(GREEN, 2, ORANGE, 5, RED)}]}]),
            timeseries("Maker share, last hour", "Share of the last hour's fills, and of their notional, that "
                       "were maker (empty when there were none).",
                       [q('sum by (symbol) (increase(qf_fills_by_liquidity_total{liquidity="MAKER"}[1h])) '
                          '/ sum by (symbol) (increase(qf_fills_by_liquidity_total[1h]))', "{{symbol}} fills"),
                        q('sum by (symbol) (increase(qf_notional_total{liquidity="MAKER"}[1h])) '
                          '/ sum by (symbol) (increase(qf_notional_total[1h]))', "{{symbol}} notional")],
                       unit="percentunit", minimum=0, maximum=1),
            # delta(), not increase(): a slippage sum also falls (price improvement); both sides of
            # the ratio come from the same scrapes, so delta's extrapolation cancels out
            timeseries("Mean slippage per fill over time", "Per unit of base (quote asset; > 0 is a cost): the "
                       "last hour's fills, and all so far.",
                       [q("sum by (symbol) (delta(qf_slippage_sum[1h])) "
                          "/ sum by (symbol) (delta(qf_slippage_fills_total[1h]))", "{{symbol}} last hour"),
                        q("sum by (symbol) (qf_slippage_sum) / sum by (symbol) (qf_slippage_fills_total)",
                          "{{symbol}} all fills")],
                       unit=MONEY, thresholds=steps(GREEN, 0, ORANGE)),
            timeseries("Slippage cost over time", "Slippage × quantity (quote asset), all fills so far and over "
                       "the last hour.",
                       [q("sum by (symbol) (qf_slippage_cost)", "{{symbol}} all fills"),
                        q("sum by (symbol) (delta(qf_slippage_cost[1h]))", "{{symbol}} last hour")],
                       unit=MONEY),
            timeseries("Slippage cost, bp of notional", "The last hour's slippage cost over its notional, in "
                       "basis points (dashed: 2 and 5 bp).",
                       [q("1e4 * sum by (symbol) (delta(qf_slippage_cost[1h])) "
                          "/ sum by (symbol) (increase(qf_notional_total[1h]))", "{{symbol}}")],
                       unit="suffix: bp", thresholds=steps(GREEN, 2, ORANGE, 5, RED))),
    ]


ANNOTATIONS = [  # shown on every graph
    {"name": "Risk state changes", "iconColor": RED, "enable": True, "datasource": DATASOURCE,
     "expr": "sum by (code) (increase(qf_risk_state_changes_total[1m])) > 0", "step": "1m",
     "titleFormat": "risk state change", "textFormat": "{{code}}", "useValueForTime": False},
    {"name": "Restarts", "iconColor": ORANGE, "enable": True, "datasource": DATASOURCE,
     "expr": f"changes(process_start_time_seconds{{{SERVICES}}}[1m]) > 0", "step": "1m",
     "titleFormat": "restart", "textFormat": "{{service}}", "useValueForTime": False},
]


def layout(rows) -> list[dict]:
    """Rows and their panels on Grafana's 24-column grid, left to right, wrapping; ids from 1."""
    out, y, next_id = [], 0, 1
    for title, panels in rows:
        # row panels have no query; `targets: []` so tests/test_compose.py can read every panel's targets
        out.append({"type": "row", "id": next_id, "title": title, "collapsed": False, "panels": [], "targets": [],
                    "gridPos": {"x": 0, "y": y, "w": WIDTH, "h": 1}})
        next_id, y = next_id + 1, y + 1
        x, line_h = 0, 0
        for p in panels:
            w, h = p.pop("_size")
            if x + w > WIDTH:
                x, y, line_h = 0, y + line_h, 0
            p["id"], p["gridPos"] = next_id, {"x": x, "y": y, "w": w, "h": h}
            next_id, x, line_h = next_id + 1, x + w, max(line_h, h)
        y += line_h
        out.extend(panels)
    return out


def build() -> dict:
    """The dashboard as Grafana's JSON model (schema 39, Grafana 11)."""
    return {
        "uid": "quantumflow",
        "title": "QuantumFlow",
        "tags": ["quantumflow", "trading"],
        "description": "On call: services, feed health, per-hop latency, risk state, P&L, fills and fill quality "
                       "(docker compose --profile monitoring; built by deploy/grafana/dashboard.py)",
        "editable": False,
        "graphTooltip": 1,  # one crosshair across the graphs
        "schemaVersion": 39,
        "version": 2,
        "refresh": "15s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "utc",
        "templating": {"list": []},
        "annotations": {"list": [dict(a) for a in ANNOTATIONS]},
        "links": [],
        "panels": layout(dashboard_rows()),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
