"""Risk, the broker and the strategy serve their own /metrics (QF_*_METRICS_BIND): real services in
threads over inproc:// sockets, scraped over HTTP as Prometheus would; the figures are the
services' own, exactly; a port that cannot be bound is one typed error, one line, no traceback."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from services.broker import telemetry as broker_telemetry
from services.broker.service import BrokerService
from services.marketdata.service import MarketDataService
from services.risk import telemetry as risk_telemetry
from services.risk.service import RiskService
from services.strategy.live import OfiService
from services.strategy.service import StrategyService
from services.strategy.telemetry import MAX_REASONS, StrategyCollector, micros_histogram
from shared.bus import Publisher, Server
from shared.config import load
from shared.enums import ControlAction, OrderKind, Side, TradingState, Verdict
from shared.messages import Book, Control, Decision, OrderRequest
from shared.metrics_http import HeartbeatCollector, MetricsBindError
from shared.runtime import MicrosHistogram
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, tcp_env
from tests.services.conftest import Client, Runner, endpoints, wait_until

SYM = "BTCUSDT"
# Hand-made books near 100: lot and tick to match, no exchange minimum, the broker answers at once.
MARKET = {"QF_RISK_LOT_SIZE": "0.001", "QF_RISK_TICK_SIZE": "0.5", "QF_RISK_MIN_NOTIONAL": "0",
          "QF_RISK_MAX_NOTIONAL": "1000000", "QF_RISK_MAX_ORDER_NOTIONAL": "1000000",
          "QF_RISK_ORDERS_PER_S": "1000", "QF_RISK_ORDERS_PER_MIN": "60000",
          "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0", "QF_START_CASH": "10000"}


def env_for(tmp_path, **extra: str) -> dict[str, str]:
    return {**endpoints(), "QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
            "QF_HEARTBEAT_MS": "50", "QF_SYMBOLS": "btcusdt", **MARKET, **extra}


def scrape(port: int) -> dict[tuple, float]:
    """GET /metrics on 127.0.0.1:`port`, parsed: (sample name, sorted label pairs) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def names(samples: dict) -> set[str]:
    return {n for n, _ in samples}


def book(n: int, bid_qty: float = 1.0, ask_qty: float = 1.0) -> Book:
    """The `n`-th book of SYM near 100 (update ids and times move on)."""
    now = time.time_ns()
    return Book(ts=now, symbol=SYM, exch_ts=1_700_000_000_000 + n, update_id=n, bids=[[100.0, bid_qty]],
                asks=[[100.5, ask_qty]], mid=100.25, spread=0.5, spread_bps=49.9, imbalance=0.0,
                microprice=100.25, recv_ts=now)


def busy_port() -> socket.socket:
    """A listening socket on a loopback port: that port cannot be bound again."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def run_in_thread(service) -> BaseException | None:
    """`service.run()` on a thread of its own (not the main thread: no gc.freeze in the test
    process); returns what it raised, None when it returned."""
    raised: list[BaseException] = []

    def target():
        try:
            service.run()
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            raised.append(exc)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{type(service).__name__}.run() did not return"
    return raised[0] if raised else None


# -- risk and the broker: one order through both ------------------------------------------------------

def test_risk_and_broker_serve_their_own_metrics_with_the_order_they_handled(tmp_path):
    cfg = load(env_for(tmp_path, QF_RISK_METRICS_BIND="127.0.0.1:0", QF_BROKER_METRICS_BIND="127.0.0.1:0"))
    md = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    runner, client = Runner(), Client(cfg.bus.risk_rep)
    try:
        broker = runner.start(BrokerService(cfg))
        risk = runner.start(RiskService(cfg))
        risk_port = wait_until(lambda: risk.metrics is not None and risk.metrics.port, "risk's /metrics")
        broker_port = wait_until(lambda: broker.metrics is not None and broker.metrics.port, "the broker's /metrics")
        assert risk_port != broker_port

        def both_have_the_book():
            md.publish(f"book.{SYM}", book(1))
            return risk.stats["books"] and SYM in broker.books
        wait_until(both_have_the_book, "risk and the broker to read a book")
        # risk's first heartbeat sets its state gauges
        before_r = wait_until(lambda: (s := scrape(risk_port)) and total(s, "qf_risk_trading_state") and s,
                              "risk's state gauges")
        before_b = scrape(broker_port)

        reply = client.request(OrderRequest(ts=1, client_order_id="m1", strategy="test", symbol=SYM, side=Side.BUY,
                                            kind=OrderKind.MARKET, qty=Decimal("0.005")))
        assert isinstance(reply, Decision) and reply.verdict is Verdict.APPROVED, reply
        # risk counts a decision after it has answered (off the reply's path): the scrape that shows it
        r = wait_until(lambda: (s := scrape(risk_port)) and all(total(s, m) > total(before_r, m) for m in (
            "qf_risk_check_seconds_count", "qf_risk_decisions_total")) and s, "risk to count the decision")
        b = wait_until(lambda: (s := scrape(broker_port)) and s[("qf_broker_journal_pending_records", ())] == 0 and s,
                       "the broker to store its journal")

        # risk: the decision, timed; its state and drawdown as it publishes them
        assert total(r, "qf_risk_decisions_total") - total(before_r, "qf_risk_decisions_total") == 1
        assert total(r, "qf_risk_decisions_total", verdict="APPROVED") - total(
            before_r, "qf_risk_decisions_total", verdict="APPROVED") == 1
        assert total(r, "qf_risk_check_seconds_count") - total(before_r, "qf_risk_check_seconds_count") == 1
        assert {s: r[("qf_risk_trading_state", (("state", s.value),))] for s in TradingState} == {
            TradingState.ACTIVE: 1, TradingState.REDUCING: 0, TradingState.HALTED: 0, TradingState.PAUSED_SHABBAT: 0}
        assert r[("qf_risk_drawdown_ratio", ())] == 0.0
        # the broker: the order filled at once (taker), the request timed
        assert total(b, "qf_broker_fills_total", liquidity="TAKER") - total(
            before_b, "qf_broker_fills_total", liquidity="TAKER") == 1
        assert total(b, "qf_broker_request_seconds_count") - total(before_b, "qf_broker_request_seconds_count") == 1
        assert b[("qf_broker_store_available", ())] == 1.0
        # each serves its own figures, and the base every service exports
        assert not {n for n in names(r) if n.startswith("qf_broker_")}
        assert not {n for n in names(b) if n.startswith(("qf_risk_", "qf_md_", "qf_strategy_"))}
        for samples in (r, b):
            assert samples[("process_start_time_seconds", ())] > 0
            assert 0 <= samples[("qf_heartbeat_age_seconds", ())] < 5

        # a HALT is in the gauge by the time the control reply comes
        client.request(Control(ts=1, action=ControlAction.HALT, by="test", reason="metrics"))
        r = scrape(risk_port)
        assert r[("qf_risk_trading_state", (("state", "HALTED"),))] == 1
        assert r[("qf_risk_trading_state", (("state", "ACTIVE"),))] == 0
    finally:
        client.close()
        runner.stop_all()
        md.close()
    for port in (risk_port, broker_port):  # stopped with the service: nothing listens there any more
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the scrapes' TIME_WAIT, as a server
            s.bind(("127.0.0.1", port))


# -- the strategy ---------------------------------------------------------------------------------------

def test_ofi_strategy_serves_its_counters_and_decision_time_exactly(tmp_path):
    cfg = load(env_for(tmp_path, QF_STRATEGY_KIND="ofi", QF_STRATEGY_METRICS_BIND="127.0.0.1:0",
                       QF_STRATEGY_TIMEOUT_MS="50", QF_STRATEGY_RETRIES="1"))
    md = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    silent_risk = Server(cfg.bus.risk_rep)  # never answers: the strategy finds risk unreachable
    runner = Runner()
    try:
        svc = runner.start(OfiService(cfg))
        port = wait_until(lambda: svc.metrics is not None and svc.metrics.port, "the strategy's /metrics")
        first = iter(range(1, 10_000))

        def subscribed():
            md.publish(f"book.{SYM}", book(next(first)))
            return svc.stats["books"]
        wait_until(subscribed, "the strategy to read a book")
        wait_until(lambda: svc.stats["no_reply"], "the STATE request to be given up")
        seen = svc.stats["books"]
        n0 = next(first)
        for i in range(25):
            md.publish(f"book.{SYM}", book(n0 + i, bid_qty=1.0 + i % 3))
        wait_until(lambda: svc.stats["books"] == seen + 25, "25 more books")
        s = scrape(port)

        assert s[("qf_strategy_books_total", ())] == svc.stats["books"] == seen + 25
        assert s[("qf_strategy_decision_seconds_count", ())] == svc.decision_us.count == svc.stats["books"]
        assert s[("qf_strategy_decision_cpu_seconds_count", ())] == svc.stats["books"]
        assert s[("qf_strategy_decision_seconds_bucket", (("le", "+Inf"),))] == svc.stats["books"]
        assert 0 < s[("qf_strategy_decision_seconds_sum", ())] < svc.stats["books"] * 0.1
        assert s[("qf_strategy_orders_total", ())] == 0  # risk never answered: nothing is sent
        assert s[("qf_strategy_no_reply_total", ())] == svc.stats["no_reply"] >= 1
        assert s[("qf_strategy_risk_reachable", ())] == 0
        assert s[("qf_strategy_position", (("symbol", SYM),))] == 0
        assert s[("qf_strategy_core_events_total", (("event", "books"),))] == svc.core.stats["books"]
        assert s[("qf_strategy_trades_total", ())] == 0 and s[("qf_strategy_signals_total", ())] == svc.stats["signals"]
        assert ("qf_strategy_cancels_total", ()) in s
        assert 0 <= s[("qf_heartbeat_age_seconds", ())] < 5 and s[("process_start_time_seconds", ())] > 0
    finally:
        runner.stop_all()
        silent_risk.close()
        md.close()
    assert svc.metrics._closed


def test_imbalance_strategy_serves_its_counters_too(tmp_path):
    cfg = load(env_for(tmp_path, QF_STRATEGY_KIND="imbalance", QF_STRATEGY_METRICS_BIND="127.0.0.1:0"))
    md = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    risk = Server(cfg.bus.risk_rep)
    runner = Runner()
    try:
        svc = runner.start(StrategyService(cfg))
        first = iter(range(1, 10_000))

        def subscribed():
            md.publish(f"book.{SYM}", book(next(first)))  # balanced: no order
            return svc.stats["books"]
        wait_until(subscribed, "the strategy to read a book")
        port = svc.metrics.port  # bound before the loop read anything
        s = wait_until(lambda: (got := scrape(port)) and got[("qf_strategy_books_total", ())] == svc.stats["books"]
                       and got, "the books counted")
        assert s[("qf_strategy_position", (("symbol", SYM),))] == 0
        assert ("qf_strategy_decision_seconds_count", ()) not in s  # only the OFI shell times its decisions
    finally:
        runner.stop_all()
        risk.close()
        md.close()



# -- a port that cannot be bound --------------------------------------------------------------------

@pytest.mark.parametrize("service, setting", [(MarketDataService, "QF_MD_METRICS_BIND"),
                                              (RiskService, "QF_RISK_METRICS_BIND"),
                                              (BrokerService, "QF_BROKER_METRICS_BIND"),
                                              (OfiService, "QF_STRATEGY_METRICS_BIND"),
                                              (StrategyService, "QF_STRATEGY_METRICS_BIND")],
                         ids=["marketdata", "risk", "broker", "ofi", "imbalance"])
def test_a_metrics_port_in_use_stops_the_run_with_a_typed_error_naming_the_setting(tmp_path, service, setting):
    with busy_port() as busy:
        bind = f"127.0.0.1:{busy.getsockname()[1]}"
        kind = {"QF_STRATEGY_KIND": "imbalance" if service is StrategyService else "ofi",
                "QF_FEED": f"replay:{SPOT_CAPTURE}"}
        svc = service(load(env_for(tmp_path, **{setting: bind}, **kind)))
        exc = run_in_thread(svc)
    assert isinstance(exc, MetricsBindError), exc
    assert str(exc).startswith(f"cannot serve metrics on {bind} ({setting}): ")
    assert "\n" not in str(exc)


def test_the_broker_process_says_so_in_one_line_and_exits_1(tmp_path):
    """As marketdata does: a FatalError, logged in one line (no traceback), status 1 (`qf up`
    restarts it with a backoff; Compose's restart policy likewise)."""
    with busy_port() as busy:
        bind = f"127.0.0.1:{busy.getsockname()[1]}"
        proc = subprocess.run([sys.executable, "-m", "services.cli", "broker"], cwd=ROOT, timeout=60,
                              env={**clean_environ(), **tcp_env(tmp_path, QF_BROKER_METRICS_BIND=bind)},
                              capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    (line,) = [ln for ln in out.splitlines() if "cannot serve metrics" in ln]
    assert "event=fatal" in line and f"{bind} (QF_BROKER_METRICS_BIND)" in line


# -- what a scrape renders ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 7_000_000), max_size=300))
def test_a_micros_histogram_renders_as_the_prometheus_histogram_of_what_was_recorded(values_ns):
    h = MicrosHistogram()
    for ns in values_ns:
        h.record_ns(ns)
    buckets, seconds = micros_histogram(h)
    for le, n in buckets[:-1]:  # a bound of B µs counts what fell below it (1 µs bins)
        assert n == sum(1 for ns in values_ns if ns // 1000 < round(float(le) * 1e6)), le
    assert buckets[-1] == ("+Inf", len(values_ns))
    # the sum: each observation at its bin's middle, at the top (5000 µs) when over it
    true_us = sum(min(ns / 1000, 5000.0) for ns in values_ns)
    assert abs(seconds * 1e6 - true_us) <= 0.5 * len(values_ns) + 1e-6


def test_rejection_reasons_beyond_the_cap_are_counted_as_other():
    rejections = {f"CODE{i:03d}": i + 1 for i in range(MAX_REASONS + 10)}
    fams = {f.name: f for f in StrategyCollector({}, rejections=rejections).collect()}
    got = {s.labels["reason"]: s.value for s in fams["qf_strategy_rejections"].samples if s.name.endswith("_total")}
    assert len(got) == MAX_REASONS + 1
    assert got["other"] == sum(range(MAX_REASONS + 1, MAX_REASONS + 11))
    assert sum(got.values()) == sum(rejections.values())


def test_the_heartbeat_age_is_that_of_the_liveness_file_and_nan_without_one(tmp_path):
    path = tmp_path / "risk.alive"
    (fam,) = HeartbeatCollector(path).collect()
    assert math.isnan(fam.samples[0].value)
    path.touch()
    os.utime(path, (1000.0, 1000.0))
    (fam,) = HeartbeatCollector(path, clock=lambda: 1012.5).collect()
    assert fam.samples[0].value == 12.5


@pytest.mark.parametrize("module", [risk_telemetry, broker_telemetry], ids=["risk", "broker"])
def test_every_metric_of_a_telemetry_module_is_served(module):
    defined = {name for name, value in vars(module).items() if isinstance(value, (Counter, Gauge, Histogram))}
    served = {name for name, value in vars(module).items() if any(value is m for m in module.METRICS)}
    assert defined == served
