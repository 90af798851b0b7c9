"""The strategy's Prometheus metrics: the counters its shell already keeps, read at scrape time.

Why not prometheus_client's Counter and Histogram: a labelled inc() or observe() takes a lock and
costs ~0.5-1.5 µs, and the OFI strategy decides a book in ~17 µs (p50, live). The shell counts in
plain dicts and a `MicrosHistogram` (one writer: its loop); a scrape, on the HTTP thread, reads
them (reading an int from a dict or a list needs no lock) and renders them here.
"""
from __future__ import annotations

import logging
from decimal import Decimal
from operator import mul
from typing import Callable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared import metrics_http
from shared.config import Config
from shared.runtime import MicrosHistogram, identity, liveness_path

log = logging.getLogger("qf.strategy")

DECISION_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
MAX_REASONS = 50  # rejection reasons shown by name; the rest (a risk that invents codes) as "other"
# the shell's stats key -> (metric name, help)
COUNTERS = {
    "books": ("qf_strategy_books", "Books of the strategy's symbols read and decided on"),
    "trades": ("qf_strategy_trades", "Trades of the strategy's symbols read (trade flow)"),
    "orders": ("qf_strategy_orders", "Orders sent to risk"),
    "cancels": ("qf_strategy_cancels", "Cancels sent to risk"),
    "signals": ("qf_strategy_signals", "Signals published (side changes and every order's reason)"),
    "no_reply": ("qf_strategy_no_reply", "Requests risk did not answer after every retry"),
    "errors": ("qf_strategy_errors", "Events and answers whose handling failed or that were refused"),
    "decode_errors": ("qf_strategy_decode_errors", "Frames that were not valid messages"),
}


def micros_histogram(h: MicrosHistogram, bounds_us=DECISION_BUCKETS_US) -> tuple[list[tuple[str, int]], float]:
    """`h` as Prometheus histogram buckets (cumulative (le in seconds, count), ending with +Inf)
    and its sum in seconds, from one copy of its bins, so the buckets agree with each other
    whatever the loop records meanwhile. A bound of B µs counts the bins below B (h's bins are
    1 µs wide); the sum takes each observation at its bin's middle, one at or over h's top at
    the top: exact to half a microsecond per observation below it."""
    bins = h.bins[:]  # one C-level copy; the loop may go on recording into h.bins
    top = len(bins) - 1
    out, acc, prev = [], 0, 0
    for bound in bounds_us:
        b = min(bound, top)
        acc += sum(bins[prev:b])
        prev = b
        out.append((repr(bound / 1e6), acc))
    total = acc + sum(bins[prev:])
    out.append(("+Inf", total))
    below_top = total - bins[top]
    sum_us = sum(map(mul, bins, range(top + 1))) + 0.5 * below_top
    return out, sum_us / 1e6


class StrategyCollector:
    """Renders a strategy shell's figures at scrape time. `stats`: the shell's counters (those of
    COUNTERS it has; the verdicts `approved`/`rejected` as qf_strategy_risk_answers_total); the
    rest only when given: `rejections` (code -> n, risk's and the broker's rejection reasons),
    `core_stats` (the core's named counters), `decision`/`decision_cpu` (per-book decision time,
    wall and thread CPU), `reachable()` (risk answers) and `positions()` (symbol -> base qty)."""

    def __init__(self, stats: Mapping[str, int], *, rejections: Mapping[str, int] | None = None,
                 core_stats: Mapping[str, int] | None = None, decision: MicrosHistogram | None = None,
                 decision_cpu: MicrosHistogram | None = None, reachable: Callable[[], bool] | None = None,
                 positions: Callable[[], Mapping[str, Decimal]] | None = None) -> None:
        self.stats, self.rejections, self.core_stats = stats, rejections, core_stats
        self.decision, self.decision_cpu = decision, decision_cpu
        self.reachable, self.positions = reachable, positions

    def collect(self):
        stats = self.stats
        for key, (name, doc) in COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=stats[key])
        answers = CounterMetricFamily("qf_strategy_risk_answers", "Risk's answers to orders, by verdict "
                                      "(adjusted orders count as approved)", labels=["verdict"])
        for verdict in ("approved", "rejected"):
            answers.add_metric([verdict], stats.get(verdict, 0))
        yield answers
        if self.rejections is not None:
            yield _rejections(self.rejections)
        if self.core_stats is not None:
            core = CounterMetricFamily("qf_strategy_core_events", "The core's counters by name: entries, exits by "
                                       "reason, cancels by reason, filtered books... (services/strategy/ofi.py)",
                                       labels=["event"])
            for key, n in list(self.core_stats.items()):
                core.add_metric([key], n)
            yield core
        for h, name, doc in ((self.decision, "qf_strategy_decision_seconds",
                              "Features and decision per book, wall time (1 µs bins; sum exact to 0.5 µs)"),
                             (self.decision_cpu, "qf_strategy_decision_cpu_seconds",
                              "Features and decision per book, the loop thread's CPU time")):
            if h is not None:
                buckets, total = micros_histogram(h)
                fam = HistogramMetricFamily(name, doc)
                fam.add_metric([], buckets, total)
                yield fam
        if self.reachable is not None:
            yield GaugeMetricFamily("qf_strategy_risk_reachable", "1 while risk answers (0: no orders are sent "
                                    "until a STATE request is answered)", value=1 if self.reachable() else 0)
        if self.positions is not None:
            pos = GaugeMetricFamily("qf_strategy_position", "The strategy's base position per symbol, as it "
                                    "follows risk's answers and the broker's fills", labels=["symbol"])
            for symbol, qty in self.positions().items():
                pos.add_metric([symbol], float(qty))  # float64 in Prometheus; the orders stay exact
            yield pos


def _rejections(rejections: Mapping[str, int]) -> CounterMetricFamily:
    fam = CounterMetricFamily("qf_strategy_rejections", "Orders rejected (by risk, the broker or for want of an "
                              "answer) and cancels that failed (cancel:CODE), by reason", labels=["reason"])
    items = sorted(rejections.items())  # sorted(): a copy, so the loop may add a reason meanwhile
    other = sum(n for _, n in items[MAX_REASONS:])
    for code, n in items[:MAX_REASONS]:
        fam.add_metric([code], n)
    if other:
        fam.add_metric(["other"], other)
    return fam


def serve(cfg: Config, collector: StrategyCollector) -> metrics_http.MetricsServer | None:
    """The strategy's own /metrics on QF_STRATEGY_METRICS_BIND with `collector` and the base of
    shared/metrics_http.py; None when the setting is empty. Raises MetricsBindError (a FatalError)
    when the address cannot be bound."""
    bind = cfg.strategy.metrics_bind
    if not bind:
        return None
    server = metrics_http.serve(bind, "QF_STRATEGY_METRICS_BIND", [collector],
                                liveness_path(cfg.common.run_dir, identity("strategy", cfg.common.instance)))
    log.info("metrics listening", extra={"bind": bind, "port": server.port})
    return server


def serve_while(owner, collector: StrategyCollector, loop: Callable[[], None]) -> None:
    """Run `loop` with the strategy's /metrics beside it (`owner.metrics` while it runs, when
    QF_STRATEGY_METRICS_BIND is set), closed when the loop ends however it ends."""
    owner.metrics = serve(owner.cfg, collector)
    try:
        loop()
    finally:
        if owner.metrics is not None:
            owner.metrics.close()
