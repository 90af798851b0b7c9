"""Risk's counters and latencies: Prometheus metrics, an exact µs histogram, a log-line rate limiter."""
from __future__ import annotations

import logging
import time
from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

from shared.enums import TradingState


DECISIONS = Counter("qf_risk_decisions_total", "Order decisions, by verdict and reason code", ["verdict", "code"])
BAD_FRAMES = Counter("qf_risk_decode_errors_total", "Frames that were not valid messages", ["source"])
BAD_ACKS = Counter("qf_risk_bad_acks_total", "Broker answers and events refused as not credible (REJECTED "
                   "BROKER_ERROR, nothing booked), by source (ack/cancel/fill/order) and why", ["source", "why"])
FAILURES = Counter("qf_risk_failures_total", "Messages whose handling failed inside risk")
STATE_CHANGES = Counter("qf_risk_state_changes_total", "Trading-state changes, by cause", ["code"])
PAUSE_FLATTEN_FAILURES = Counter("qf_risk_pause_flatten_failures_total",
                                 "Flattens before a Shabbat or Yom Tov pause that left a position or an order")
PAUSE_FLATTEN_FAILED = "PAUSE_FLATTEN_FAILED"  # the alert's code while a pause's flatten leaves something
DECIDE_SECONDS = Histogram("qf_risk_decision_seconds", "Time to decide one order, broker round trip included",
                           buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0))
CHECK_SECONDS = Histogram("qf_risk_check_seconds", "Time inside risk per request, broker round trip excluded",
                          buckets=(1e-5, 2e-5, 3e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2))
EQUITY = Gauge("qf_risk_equity", "Equity as risk marks it (quote asset)")
DRAWDOWN = Gauge("qf_risk_drawdown_ratio", "Drawdown from peak equity as risk marks it, a fraction "
                 "(QF_RISK_DRAWDOWN_SOFT → REDUCING, QF_RISK_MAX_DRAWDOWN → HALTED)")
STATE = Gauge("qf_risk_trading_state", "1 for risk's trading state now, 0 for the others", ["state"])
_STATES = {s: STATE.labels(s.value) for s in TradingState}

# What risk's own /metrics serves (QF_RISK_METRICS_BIND), beside the base of shared/metrics_http.py.
METRICS = (DECISIONS, BAD_FRAMES, BAD_ACKS, FAILURES, STATE_CHANGES, PAUSE_FLATTEN_FAILURES, DECIDE_SECONDS,
           CHECK_SECONDS, EQUITY, DRAWDOWN, STATE)


def show_state(state: TradingState, equity: Decimal, drawdown: Decimal) -> None:
    """The gauges of what risk publishes on risk.state (each heartbeat and each change); float64
    in Prometheus, the wire stays exact."""
    EQUITY.set(float(equity))
    DRAWDOWN.set(float(drawdown))
    for s, child in _STATES.items():
        child.set(1 if s is state else 0)


class LogLimiter:
    """At most `per_s` lines a second per key; the next line let through says how many
    were held back (`suppressed`). Keeps a flood of bad frames from flooding stdout."""

    def __init__(self, logger: logging.Logger, per_s: int = 10) -> None:
        self.log = logger
        self.per_s = per_s
        self.window: dict[str, list] = {}  # key -> [second, lines this second, suppressed]

    def log_event(self, level: int, event: str, key: str, extra: dict) -> None:
        now = int(time.monotonic())
        slot = self.window.get(key)
        if slot is None or slot[0] != now:
            suppressed = slot[2] if slot is not None else 0
            slot = self.window[key] = [now, 0, suppressed]
            if len(self.window) > 1000:  # keys come from reason codes; bound them anyway
                self.window = {key: slot}
        if slot[1] >= self.per_s:
            slot[2] += 1
            return
        slot[1] += 1
        if slot[2]:
            extra = {**extra, "suppressed": slot[2]}
            slot[2] = 0
        self.log.log(level, event, extra=extra)
