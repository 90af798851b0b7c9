"""The broker's counters and latencies: Prometheus metrics, their kept children, a once-a-second log line."""
from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

ORDERS = Counter("qf_broker_orders_total", "Order changes committed, by resulting status", ["status"])
FILLS = Counter("qf_broker_fills_total", "Fills committed, by liquidity", ["liquidity"])
DUPLICATES = Counter("qf_broker_duplicates_total", "Repeated client_order_id answered without a new order")
BAD_FRAMES = Counter("qf_broker_decode_errors_total", "Frames that were not valid messages", ["source"])
BAD_MD = Counter("qf_broker_bad_market_data_total", "Books and trades refused as untrustworthy (market.py), by reason",
                 ["reason"])
FAILURES = Counter("qf_broker_request_failures_total", "Messages or commits that failed inside the broker")
STORE_AVAILABLE = Gauge("qf_broker_store_available", "1 while the broker's journal and database take writes, "
                        "0 during a storage outage (see docs/fill-model.md)")
DB_FILE_LOST = Counter("qf_broker_database_file_lost_total", "Times the file at QF_DB was found deleted or replaced "
                       "under the running broker (it then puts its own database back: services/broker/keeper.py)")
STORE_REFUSED = Counter("qf_broker_store_refusals_total", "Requests answered with error STORE_UNAVAILABLE")
ACK_SECONDS = Histogram("qf_broker_request_seconds", "Request received to reply sent, simulated latency included",
                        buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5))

# What the broker's own /metrics serves (QF_BROKER_METRICS_BIND), with a JournalCollector and the
# base of shared/metrics_http.py.
METRICS = (ORDERS, FILLS, DUPLICATES, BAD_FRAMES, BAD_MD, FAILURES, STORE_AVAILABLE, STORE_REFUSED, DB_FILE_LOST,
           ACK_SECONDS)

MD_LOG_S = 1.0  # at most one log line a second about refused market data (a bad feed repeats itself)

_CHILDREN: dict = {}


def labelled(metric, label: str):
    """`metric.labels(label)`, kept: labels() costs a lock and a lookup per call (the desk counts
    every fill and order change through it)."""
    child = _CHILDREN.get((metric, label))
    if child is None:
        child = _CHILDREN[(metric, label)] = metric.labels(label)
    return child


class QuietLog:
    """At most one warning line every `every_s` seconds, saying how many were held back before
    it (`held_back`). The service logs bad market-data frames and refused books through it."""

    def __init__(self, logger: logging.Logger, every_s: float = MD_LOG_S) -> None:
        self.log, self.every_s = logger, every_s
        self.last = 0.0  # monotonic time of the last line
        self.held = 0  # lines held back since

    def warn(self, event: str, code: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.held += 1
            return
        self.log.warning(event, extra={"code": code, "detail": detail[:120], "held_back": self.held})
        self.last, self.held = now, 0


class JournalCollector:
    """`qf_broker_journal_pending_records`: records the broker's journal holds that are not yet
    stored into SQLite, read at scrape time (a len() of the list the loop replaces; no lock).
    Normally 0 to a few (stored within 10 ms, shared/journal_policy.py); it grows during a
    storage outage, when the database cannot take writes."""

    def __init__(self, journal) -> None:
        self.journal = journal

    def collect(self):
        yield GaugeMetricFamily("qf_broker_journal_pending_records", "Journal records not yet stored into "
                                "SQLite (grows while the database refuses writes)", value=len(self.journal.pending))
