"""Risk's counters and latencies: Prometheus metrics, an exact µs histogram, a log-line rate limiter."""
from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("qf_risk_decisions_total", "Order decisions, by verdict and reason code", ["verdict", "code"])
BAD_FRAMES = Counter("qf_risk_decode_errors_total", "Frames that were not valid messages", ["source"])
FAILURES = Counter("qf_risk_failures_total", "Messages whose handling failed inside risk")
STATE_CHANGES = Counter("qf_risk_state_changes_total", "Trading-state changes, by cause", ["code"])
DECIDE_SECONDS = Histogram("qf_risk_decision_seconds", "Time to decide one order, broker round trip included",
                           buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0))
CHECK_SECONDS = Histogram("qf_risk_check_seconds", "Time inside risk per request, broker round trip excluded",
                          buckets=(1e-5, 2e-5, 3e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2))
EQUITY = Gauge("qf_risk_equity", "Equity as risk marks it (quote asset)")


class MicrosHistogram:
    """Counts of durations in 1 µs bins up to `top_us` (one bin above it): recording is an
    index increment, and percentiles are exact to the microsecond (no sampling, no sort)."""

    def __init__(self, top_us: int = 5000) -> None:
        self.bins = [0] * (top_us + 1)
        self.top = top_us
        self.count = 0
        self.max_us = 0

    def record_ns(self, ns: int) -> None:
        us = ns // 1000
        self.bins[us if us < self.top else self.top] += 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def percentiles(self, *ps: float) -> list[int]:
        """Nearest-rank percentiles in µs (bin `us` holds [us, us+1) µs; `top_us` stands for
        anything at or above it); zeros when empty. One pass up to the largest value seen."""
        if not self.count:
            return [0 for _ in ps]
        ranks = sorted((max(1, -(-self.count * p // 100)), i) for i, p in enumerate(ps))
        out, seen, k = [self.top] * len(ps), 0, 0
        for us in range(min(self.max_us, self.top) + 1):
            seen += self.bins[us]
            while k < len(ranks) and seen >= ranks[k][0]:
                out[ranks[k][1]] = us
                k += 1
            if k == len(ranks):
                break
        return out

    def stats(self, prefix: str) -> dict[str, int]:
        p50, p99 = self.percentiles(50, 99)
        return {f"{prefix}_us_p50": p50, f"{prefix}_us_p99": p99, f"{prefix}_us_max": self.max_us,
                f"{prefix}_n": self.count}


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
