"""marketdata's Prometheus metrics: plain counters on the hot path, rendered only when scraped."""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared import metrics_http

# Why not prometheus_client's own Counter/Histogram: a labelled inc() or observe() takes a lock
# and costs ~0.5-1.5 µs; a depth event touches five metrics against a 25 µs budget. Plain ints
# (the service thread is the only writer of each) cost ~50 ns and are read at scrape time.
EVENT_BUCKETS_S = (5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 50e-3)
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
STREAM_KINDS = ("depth", "trade", "bookTicker", "other")


class Hist:
    """A fixed-bucket histogram (~0.2 µs an observation), rendered as a Prometheus histogram."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs ending with +Inf, as Prometheus wants them."""
        out, acc = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            acc += n
            out.append(("+Inf" if bound == math.inf else repr(bound), acc))
        return out


class MdMetrics:
    """Every figure marketdata exports. Each field has one writer thread: the service thread,
    except snapshot figures (the REST fetcher threads) and reconnects (the feed)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = tuple(keys)
        self.events = {(k, s): [0, 0] for k in self.keys for s in STREAM_KINDS}  # -> [messages, bytes]
        self.events[("", "other")] = [0, 0]  # streams of no configured symbol
        self.decode_errors: dict[str, int] = {}
        self.gaps = dict.fromkeys(self.keys, 0)
        self.resyncs = dict.fromkeys(self.keys, 0)
        self.books = dict.fromkeys(self.keys, 0)
        self.trades = dict.fromkeys(self.keys, 0)
        self.ticker_checks = {(k, r): 0 for k in self.keys for r in ("match", "mismatch")}
        self.reconnects: dict[str, int] = {}
        self.switches: dict[str, int] = {}
        self.snapshots: dict[tuple[str, str], int] = {}  # (market, outcome) -> n
        self.snapshot_weight: dict[str, int] = {}
        self.used_weight: dict[str, int] = {}  # last X-MBX-USED-WEIGHT-1m per market
        self.last_event = dict.fromkeys(self.keys, 0)  # recv time (ns) of the last applied depth event
        self.synced = dict.fromkeys(self.keys, False)
        # stalls (guard.py): books missing while their frames keep arriving
        self.stalls = dict.fromkeys(self.keys, 0)
        self.stall_recoveries = dict.fromkeys(self.keys, 0)
        self.stall_actions: dict[tuple[str, str], int] = {}  # (key, resnapshot|reconnect) -> n
        self.snapshots_deferred: dict[str, int] = {}  # snapshot requests held back by the backoff
        self.unsynced_since = dict.fromkeys(self.keys, 0)  # wall ns since which there is no book (0: synced)
        self.unsynced_total = dict.fromkeys(self.keys, 0.0)  # seconds without a book, periods ended
        self.event_time = Hist(EVENT_BUCKETS_S)
        self.lag = {k: Hist(LAG_BUCKETS_S) for k in self.keys}
        self.inbox = None  # the live feed's binance.Inbox (its depth and waits, read when scraped)

    def bad(self, reason: str) -> None:
        self.decode_errors[reason] = self.decode_errors.get(reason, 0) + 1

    def bump(self, table: dict, key, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


class MdCollector:
    """Renders MdMetrics for prometheus_client at scrape time."""

    def __init__(self, m: MdMetrics, clock: Callable[[], int] = time.time_ns) -> None:
        self.m, self.clock = m, clock

    def collect(self):
        m = self.m
        ev = CounterMetricFamily("qf_md_events", "Feed messages by symbol and stream kind", labels=["symbol", "stream"])
        by = CounterMetricFamily("qf_md_bytes", "Feed message bytes (WebSocket frames) by symbol and stream kind",
                                 labels=["symbol", "stream"])
        for (key, kind), (n, nbytes) in list(m.events.items()):
            ev.add_metric([key, kind], n)
            by.add_metric([key, kind], nbytes)
        yield ev
        yield by
        yield _counter("qf_md_decode_errors", "Messages dropped as malformed, by reason", "reason", m.decode_errors)
        yield _counter("qf_md_gaps", "Update-id gaps detected (book discarded, resync)", "symbol", m.gaps)
        yield _counter("qf_md_resyncs", "Books rebuilt from a new snapshot after the first one", "symbol", m.resyncs)
        yield _counter("qf_md_books_published", "book.* messages published", "symbol", m.books)
        yield _counter("qf_md_trades_published", "trade.* messages published", "symbol", m.trades)
        yield _counter("qf_md_reconnects", "WebSocket connections lost and reopened", "market", m.reconnects)
        yield _counter("qf_md_connection_switches", "Planned switches to a new, already synced connection",
                       "market", m.switches)
        snaps = CounterMetricFamily("qf_md_snapshots", "REST depth snapshot requests by outcome",
                                    labels=["market", "outcome"])
        for (market, outcome), n in list(m.snapshots.items()):
            snaps.add_metric([market, outcome], n)
        yield snaps
        yield _counter("qf_md_snapshot_weight", "Request weight spent on depth snapshots", "market",
                       m.snapshot_weight)
        yield _gauge("qf_md_used_weight", "Binance's X-MBX-USED-WEIGHT-1m after the last snapshot", "market",
                     m.used_weight)
        tick = CounterMetricFamily("qf_md_book_ticker_checks", "bookTicker best levels compared with the book",
                                   labels=["symbol", "result"])
        for (key, result), n in list(m.ticker_checks.items()):
            tick.add_metric([key, result], n)
        yield tick
        now = self.clock()
        yield _gauge("qf_md_book_age_seconds", "Time since the book last applied a depth event", "symbol",
                     {k: ((now - t) / 1e9 if t else math.nan) for k, t in m.last_event.items()})
        yield _gauge("qf_md_synced", "1 while the published book is synced", "symbol",
                     {k: int(v) for k, v in m.synced.items()})
        running = {k: ((now - t) / 1e9 if t else 0.0) for k, t in m.unsynced_since.items()}
        yield _gauge("qf_md_unsynced_seconds", "Time the symbol has had no book, now (0 while it has one)",
                     "symbol", running)
        yield _counter("qf_md_no_book_seconds", "Time without a book, all periods (the current one included)",
                       "symbol", {k: m.unsynced_total[k] + running[k] for k in m.unsynced_total})
        yield _counter("qf_md_stalls", "Books missing while their frames kept arriving (QF_MD_SYNC_TIMEOUT_S)",
                       "symbol", m.stalls)
        yield _counter("qf_md_stall_recoveries", "Stalls ended by a synced book", "symbol", m.stall_recoveries)
        acts = CounterMetricFamily("qf_md_stall_actions", "What was done about stalls: resnapshot, reconnect",
                                   labels=["symbol", "action"])
        for (key, action), n in list(m.stall_actions.items()):
            acts.add_metric([key, action], n)
        yield acts
        yield _counter("qf_md_snapshots_deferred", "Snapshot requests held back by the per-symbol backoff",
                       "symbol", m.snapshots_deferred)
        lag = HistogramMetricFamily("qf_md_exchange_lag_seconds",
                                    "Local receive time minus Binance event time (E), by symbol", labels=["symbol"])
        for key, h in m.lag.items():
            lag.add_metric([key], h.buckets(), h.sum)
        yield lag
        proc = HistogramMetricFamily("qf_md_event_seconds",
                                     "Processing time of one depth event: parse, apply, metrics, encode, publish")
        proc.add_metric([], m.event_time.buckets(), m.event_time.sum)
        yield proc
        yield from _inbox(m.inbox)


def _inbox(inbox) -> Iterable:
    """The live feed's inbox (zeros without one: a replay)."""
    depth, waits, waited = (inbox.qsize(), inbox.waits, inbox.waited_s) if inbox is not None else (0, 0, 0.0)
    yield GaugeMetricFamily("qf_md_inbox_frames", "Records queued from the connection threads to the loop",
                            value=depth)
    yield CounterMetricFamily("qf_md_inbox_waits", "Times a connection's reader waited for room in the full "
                              "inbox (the loop behind the feed: the exchange throttled by TCP)", value=waits)
    yield CounterMetricFamily("qf_md_inbox_wait_seconds", "Time connections' readers waited for room in the inbox",
                              value=waited)


def _counter(name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, n in list(values.items()):
        fam.add_metric([str(key)], n)
    return fam


def _gauge(name: str, doc: str, label: str, values: dict) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=[label])
    for key, v in list(values.items()):
        fam.add_metric([str(key)], v)
    return fam


def serve(bind: str, m: MdMetrics, heartbeat=None):
    """Start /metrics for `m` on `bind` ("host:port"; port 0 = any free port) in a daemon thread,
    with the base every service exports (shared/metrics_http.py; `heartbeat`: the liveness file).
    Returns the MetricsServer (`port`, `close()`). Raises MetricsBindError (a FatalError) when
    the address cannot be bound."""
    return metrics_http.serve(bind, "QF_MD_METRICS_BIND", [MdCollector(m)], heartbeat)
