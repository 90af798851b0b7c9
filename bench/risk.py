"""Risk over real processes on tcp loopback: round trips via the broker (risk as configured by default,
busy-polling QF_RISK_SPIN_US after each message, and sleeping between orders), time inside risk, checks/s,
a book burst."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from decimal import Decimal

import zmq

from bench.stats import percentile
from services.supervisor import Stack
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import all_settings, load
from shared.enums import OrderKind, OrderStatus, Side
from shared.messages import Book, Decision, OrderRequest
from bench.common import free_port

ORDERS, WARMUP = 4000, 300  # round trips measured, after this many unmeasured ones
PACE_S = 0.002  # between orders: a live strategy sends after a book, not back to back
B2B_ORDERS = 3000  # then back to back: the pipeline kept busy
CHECKS, WINDOW = 20_000, 64  # pipelined orders for checks/s, and how many in flight
BURST = 50_000  # books published as fast as possible
WAIT_S = 60.0


def _settings(tmp: str) -> dict[str, str]:
    s = {key: f"tcp://127.0.0.1:{free_port()}" for key in (
        "QF_MD_PUB", "QF_RISK_REP", "QF_BROKER_REP", "QF_BROKER_PUB", "QF_RISK_PUB")}
    s.update({"QF_DB": f"{tmp}/bench.db", "QF_RUN_DIR": f"{tmp}/run", "QF_SYMBOLS": "btcusdt",
              "QF_HEARTBEAT_MS": "200", "QF_LOG_LEVEL": "WARNING", "QF_SHABBAT_PAUSE": "false",
              # every check runs; none may stop the benchmark (rates, breakers sized out of the way)
              "QF_RISK_MAX_POSITION": "1", "QF_RISK_MAX_NOTIONAL": "1000000", "QF_RISK_MAX_ORDER_NOTIONAL": "1000000",
              "QF_RISK_ADJUST": "false",
              "QF_RISK_ORDERS_PER_S": "1000000", "QF_RISK_ORDERS_PER_MIN": "60000000",
              "QF_RISK_DAILY_LOSS": "0.5", "QF_RISK_DAILY_LOSS_SOFT": "0.4", "QF_RISK_MAX_DRAWDOWN": "0.5",
              "QF_RISK_DRAWDOWN_SOFT": "0.4", "QF_RISK_STALE_BOOK_MS": "600000",
              # the paper exchange's simulated latency would be measured instead of the pipeline
              "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0"})
    known = {name for name, _, _ in all_settings()}
    return {k: v for k, v in s.items() if k in known}


class Bench:
    """Risk and broker as processes, with this process as marketdata (PUB) and strategy (REQ)."""

    def __init__(self, services: tuple[str, ...] = ("broker", "risk"), **extra: str) -> None:
        self.tmp = tmp = tempfile.mkdtemp(prefix="qf-bench-risk-")
        self.settings = {**_settings(tmp), **extra}
        self.cfg = load(self.settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
        env.update(self.settings, PYTHONUNBUFFERED="1")
        self.stack = Stack(env, services=services, restart=False)
        self.md = Publisher(self.cfg.bus.md_pub, self.cfg.bus.hwm)
        self.beats = Subscriber(self.cfg.bus.risk_pub, ["heartbeat.risk"], self.cfg.bus.hwm)
        self.broker_beats = (Subscriber(self.cfg.bus.broker_pub, ["heartbeat.broker"], self.cfg.bus.hwm)
                             if "broker" in services else None)
        self.ctx = zmq.Context.instance()
        self.req = self.ctx.socket(zmq.REQ)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.connect(self.cfg.bus.risk_rep)
        self.n = 0

    def book(self, mid: float = 60000.25) -> None:
        self.n += 1
        bids, asks = [[mid - 0.25 - i, 1e6] for i in range(10)], [[mid + 0.25 + i, 1e6] for i in range(10)]
        self.md.publish("book.BTCUSDT", Book(ts=time.time_ns(), symbol="BTCUSDT", exch_ts=self.n, update_id=self.n,
                                             bids=bids, asks=asks, mid=mid, spread=0.5, spread_bps=0.08,
                                             imbalance=0.0, microprice=mid, recv_ts=time.time_ns()))

    def order(self, side: Side, qty: str = "0.001") -> bytes:
        self.n += 1
        return messages.encode(OrderRequest(ts=time.time_ns(), client_order_id=f"bench-{self.n}", strategy="bench",
                                            symbol="BTCUSDT", side=side, kind=OrderKind.MARKET, qty=Decimal(qty)))

    def ask(self, payload: bytes) -> Decision:
        self.req.send(payload)
        if not self.req.poll(5000):
            raise RuntimeError("risk did not answer within 5 s")
        return messages.decode(self.req.recv(), messages.REQUESTS)

    def heartbeat(self, ready=lambda stats: True, beats: Subscriber | None = None) -> dict:
        beats = beats or self.beats
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if beats.sock.poll(200):
                stats = beats.recv()[1].stats or {}
                if ready(stats):
                    return stats
        raise RuntimeError(f"no heartbeat on {beats.endpoint} with the figures asked for")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self.book()
            d = self.ask(self.order(Side.BUY))
            if d.order and d.order.status is OrderStatus.FILLED:
                return
            time.sleep(0.05)
        raise RuntimeError(f"risk and broker never filled an order: last answer {d}")

    def round_trips(self, orders: int, warmup: int, pace_s: float) -> list[float]:
        out = []
        for i in range(warmup + orders):
            if i % 50 == 0:
                self.book()
            payload = self.order(Side.SELL if i % 2 else Side.BUY)
            if pace_s:
                time.sleep(pace_s)
            started = time.perf_counter_ns()
            d = self.ask(payload)
            took = time.perf_counter_ns() - started
            if not (d.order and d.order.status is OrderStatus.FILLED):
                raise RuntimeError(f"order {i} not filled: {d}")
            if i >= warmup:
                out.append(took / 1000)
        return out

    def checks_per_s(self) -> float:
        """Pipelined orders over the position limit: every check runs, none reaches the broker."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.cfg.bus.risk_rep)
        try:
            sent = got = 0
            started = time.perf_counter()
            while got < CHECKS:
                while sent < CHECKS and sent - got < WINDOW:
                    dealer.send_multipart([b"", self.order(Side.BUY, "2")])
                    sent += 1
                if not dealer.poll(5000):
                    raise RuntimeError("risk stopped answering the pipelined checks")
                reply = messages.decode(dealer.recv_multipart()[-1], messages.REQUESTS)
                if reply.reason["code"] != "MAX_POSITION":
                    raise RuntimeError(f"unexpected answer {reply}")
                got += 1
            return CHECKS / (time.perf_counter() - started)
        finally:
            dealer.close()

    def books_settled(self) -> dict:
        """A heartbeat once risk's book count stopped moving (two heartbeats alike)."""
        last = self.heartbeat()
        while True:
            beat = self.heartbeat()
            if beat["books"] == last["books"]:
                return beat
            last = beat

    def burst(self) -> tuple[int, int]:
        """BURST books back to back; returns (books risk counted, sequence gaps it saw)."""
        before = self.books_settled()
        for _ in range(BURST):
            self.book()
        self.heartbeat(lambda s: s.get("books", 0) >= before["books"] + BURST
                       or s.get("md_missed", 0) > before.get("md_missed", 0))
        after = self.books_settled()  # missed ones never arrive; stragglers would be counted here
        return after["books"] - before["books"], after["md_missed"] - before.get("md_missed", 0)

    def close(self) -> None:
        self.req.close()
        self.beats.close()
        if self.broker_beats is not None:
            self.broker_beats.close()
        self.md.close()
        self.stack.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run() -> dict[str, float]:
    bench = Bench()
    bench.stack.start()
    try:
        bench.wait_ready()
        rtt = bench.round_trips(ORDERS, WARMUP, PACE_S)
        # risk's own histograms are cumulative: read them before the back-to-back phase
        inside = bench.heartbeat(lambda s: s.get("check_n", 0) >= WARMUP + ORDERS)
        # the broker's own part of the hop: request read to reply sent, its commit included
        broker = bench.heartbeat(lambda s: s.get("ack_n", 0) >= WARMUP + ORDERS, bench.broker_beats)
        b2b = bench.round_trips(B2B_ORDERS, 100, 0.0)
        checks = bench.checks_per_s()
        books, missed = bench.burst()
    finally:
        bench.close()
    # the paced round trips again with risk sleeping at once between orders (QF_RISK_SPIN_US=0)
    sleeping = Bench(QF_RISK_SPIN_US="0")
    sleeping.stack.start()
    try:
        sleeping.wait_ready()
        sleep_rtt = sleeping.round_trips(ORDERS, WARMUP, PACE_S)
        sleep_inside = sleeping.heartbeat(lambda s: s.get("check_n", 0) >= WARMUP + ORDERS)
    finally:
        sleeping.close()
    # the same burst at ZeroMQ's default high-water mark, to show what the setting prevents
    small = Bench(services=("risk",), QF_ZMQ_HWM="1000")
    small.stack.start()
    try:
        small.heartbeat()
        _, missed_at_1000 = small.burst()
    finally:
        small.close()
    pct = (lambda xs, p: round(percentile(xs, p), 1))
    return {"risk_roundtrip_us_p50": pct(rtt, 50), "risk_roundtrip_us_p99": pct(rtt, 99),
            "risk_roundtrip_b2b_us_p50": pct(b2b, 50), "risk_roundtrip_b2b_us_p99": pct(b2b, 99),
            "risk_check_us_p50": float(inside["check_us_p50"]), "risk_check_us_p99": float(inside["check_us_p99"]),
            "risk_serve_us_p50": float(inside["serve_us_p50"]), "risk_serve_us_p99": float(inside["serve_us_p99"]),
            "risk_broker_hop_us_p50": float(inside["broker_us_p50"]),
            "risk_broker_hop_us_p99": float(inside["broker_us_p99"]),
            "risk_broker_inside_us_p50": float(broker["ack_us_p50"]),
            "risk_broker_inside_us_p99": float(broker["ack_us_p99"]),
            "risk_checks_per_s": float(round(checks)),
            "risk_sleeping_roundtrip_us_p50": pct(sleep_rtt, 50),
            "risk_sleeping_roundtrip_us_p99": pct(sleep_rtt, 99),
            "risk_sleeping_check_us_p50": float(sleep_inside["check_us_p50"]),
            "risk_sleeping_check_us_p99": float(sleep_inside["check_us_p99"]),
            "risk_burst_books_sent": float(BURST), "risk_burst_books_received": float(books),
            "risk_burst_books_missed": float(missed), "risk_burst_books_missed_hwm1000": float(missed_at_1000)}
