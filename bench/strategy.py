"""The OFI strategy's own cost (issue #13), measured inside the strategy process of a running stack.

- strategy_decision_us_p50 / _p99: features + decision per book event (`OfiStrategy.on_book`)
  inside the strategy service, from its heartbeat's histogram (1 µs bins; wall time), and
  strategy_decision_cpu_us_p50 / _p99 the same on the thread's CPU clock (without the time the
  two cores spent on the other services meanwhile), while the real
  services replay the shipped capture in a loop at REPLAY_SPEED× (so ten minutes of market time
  pass in a minute), post-only entries, cancels and exits included;
- strategy_decision_warm_us_p50 / _p99, the same run's baseline: the same per-book call
  (`OfiStrategy.on_book`, defaults) over the capture's books back to back in this process, orders
  answered at once by a stand-in (MARKET filled, LIMIT resting, cancels done): the decision on a
  warm core. The live figure above is this plus what a book pays for arriving to a core that
  halted or ran other processes since the last one (PERF-BASELINES: "the VM's idle cores halt");
- strategy_decision_idle_us_p50 / _p99, the live figure's baseline: the same back-to-back call,
  but the process sleeps before each book for as long as books were apart in the live run (~10 ms
  at REPLAY_SPEED×): the decision arriving to a core left idle, with no other process running.
  Measured here, that idle gap alone makes the same code ~3× slower at p50 and ~6× at p99 (the
  VM's idle cores halt and come back with cold caches; even the C features core, 0.8 µs warm,
  takes ~30 µs at p99 after it); strategy_decision_vs_idle_p99 is the live p99 over it;
- strategy_features_us_p50 / _p99: the features core alone (`Features.on_book`) the same way;
- strategy_rss_mb: the strategy process's RSS at the end of the 10-minute replay, and
  strategy_rss_growth_mb: its growth since the first minute of market time (flat: ~0);
- strategy_books: books the strategy decided on in the run.
"""
from __future__ import annotations

import os
import tempfile
import time

import zmq

from bench.common import free_port
from bench.stats import percentile
from services.supervisor import Stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
REPLAY_SPEED = 10
MARKET_S = 600  # ten minutes of market time
WARM_S = 60  # market seconds before the first RSS reading (imports, features' windows filled)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _features_baseline() -> tuple[float, float]:
    """Features.on_book alone over the capture's books, in this process (µs p50, p99)."""
    from services.marketdata.feeds import ReplayFeed
    from services.marketdata.router import BookRouter
    from services.strategy.features import Features
    from services.strategy.scoring import feature_params
    from shared.config import load
    from shared.messages import Book

    books: list[Book] = []

    class Keep:
        def publish(self, topic, msg) -> None:
            if type(msg) is Book:
                books.append(msg)

    router = BookRouter(("BTCUSDT",), 10)
    router.pub = Keep()
    for rec in ReplayFeed(CAPTURE, ("BTCUSDT",), 0, stamp="recorded").records():
        router.dispatch(rec, rec.recv_ns)
    features = Features(feature_params(load({}).strategy))
    times = []
    clock = time.perf_counter_ns
    for book in books:
        t0 = clock()
        features.on_book(book, book.ts)
        times.append((clock() - t0) / 1000)
    warm = times[100:]
    return percentile(warm, 50), percentile(warm, 99)


def _decision_warm(gap_s: float = 0.0) -> tuple[float, float]:
    """OfiStrategy.on_book over the capture's books back to back, answers at once (µs p50, p99);
    with `gap_s`, the process sleeps that long before each book (the live books' spacing)."""
    from decimal import Decimal

    from services.broker.replay import market_events
    from services.risk.limits import from_config
    from services.strategy.ofi import CancelIntent, OfiStrategy
    from shared.config import load
    from shared.enums import Liquidity, OrderKind, OrderStatus, Verdict
    from shared.messages import Ack, Book, Decision, Fill

    cfg = load({"QF_STRATEGY_KIND": "ofi"})
    core = OfiStrategy(cfg.strategy, ["BTCUSDT"], from_config(cfg).rules)

    def answer(a, now: int, status: OrderStatus, fills=()) -> None:
        ack = Ack(ts=now, client_order_id=a.client_order_id, order_id="o-" + a.client_order_id, status=status,
                  filled_qty=sum((f.qty for f in fills), Decimal(0)), fills=list(fills))
        core.on_decision(Decision(ts=now, client_order_id=a.client_order_id, verdict=Verdict.APPROVED, qty=a.qty,
                                  order=ack), now)

    times = []
    clock = time.perf_counter_ns
    for ev in market_events(CAPTURE, "BTCUSDT"):
        now = ev.recv_ts
        if type(ev) is not Book:
            core.on_trade(ev, now)
            continue
        if gap_s:
            time.sleep(gap_s)  # idle, as between live books: the baseline's point, not a wait
        t0 = clock()
        actions = core.on_book(ev, now)
        times.append((clock() - t0) / 1000)
        for a in actions:
            cid = a.client_order_id
            if isinstance(a, CancelIntent):
                core.on_cancel_answer(cid, Ack(ts=now, client_order_id=cid, order_id="o-" + cid,
                                               status=OrderStatus.CANCELLED, filled_qty=Decimal(0)), None, now)
            elif a.kind is OrderKind.MARKET:
                level = ev.asks[0] if a.side.value == "BUY" else ev.bids[0]
                answer(a, now, OrderStatus.FILLED, [Fill(
                    ts=now, fill_id="f-" + cid, order_id="o-" + cid, client_order_id=cid, symbol="BTCUSDT",
                    side=a.side, price=Decimal(repr(level[0])), qty=a.qty, fee=Decimal(0), fee_asset="USDT",
                    liquidity=Liquidity.TAKER, exch_ts=0)])
            else:
                answer(a, now, OrderStatus.PENDING)
        core.take_signals()
    warm = times[100:]
    return percentile(warm, 50), percentile(warm, 99)


def run() -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix="qf-bench-strategy-")
    strategy_pub = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update({
        "QF_MD_PUB": f"tcp://127.0.0.1:{free_port()}", "QF_RISK_REP": f"tcp://127.0.0.1:{free_port()}",
        "QF_BROKER_REP": f"tcp://127.0.0.1:{free_port()}", "QF_BROKER_PUB": f"tcp://127.0.0.1:{free_port()}",
        "QF_RISK_PUB": f"tcp://127.0.0.1:{free_port()}", "QF_STRATEGY_PUB": strategy_pub,
        "QF_API_BIND": f"127.0.0.1:{free_port()}",
        "QF_DB": f"{tmp}/bench.db", "QF_RUN_DIR": f"{tmp}/run", "PYTHONUNBUFFERED": "1",
        "QF_FEED": f"replay:{CAPTURE}", "QF_REPLAY_SPEED": str(REPLAY_SPEED), "QF_REPLAY_LOOP": "true",
        "QF_STRATEGY_KIND": "ofi",
        "QF_SHABBAT_PAUSE": "false",  # on the wall clock: a benchmark must not depend on the weekday
    })
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat.strategy")
    sub.connect(strategy_pub)
    from shared import messages

    stack = Stack(env, services=("broker", "risk", "strategy", "marketdata"), restart=False)
    stack.start()
    beat = None
    rss_warm = rss_end = None
    try:
        t0 = time.monotonic()
        warm_at, end_at = t0 + WARM_S / REPLAY_SPEED, t0 + MARKET_S / REPLAY_SPEED
        while time.monotonic() < end_at:
            if sub.poll(1000):
                msg = messages.decode(sub.recv_multipart()[1])
                beat = msg
                if rss_warm is None and time.monotonic() >= warm_at:
                    rss_warm = _rss_mb(msg.pid)
        if beat is None:
            raise RuntimeError("no heartbeat from the strategy: is it running?")
        rss_end = _rss_mb(beat.pid)
        # the heartbeat after the end: its histogram covers the whole run
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if sub.poll(1000):
                beat = messages.decode(sub.recv_multipart()[1])
                break
    finally:
        stack.stop()
        sub.close(linger=0)
    stats = beat.stats or {}
    if not stats.get("decision_n"):
        raise RuntimeError(f"the strategy decided on no book: {stats}")
    f50, f99 = _features_baseline()
    w50, w99 = _decision_warm()
    gap_s = (MARKET_S / REPLAY_SPEED) / stats["decision_n"]  # the live books' mean spacing
    i50, i99 = _decision_warm(gap_s)
    return {
        "strategy_decision_us_p50": stats["decision_us_p50"],
        "strategy_decision_us_p99": stats["decision_us_p99"],
        "strategy_decision_cpu_us_p50": stats["decision_cpu_us_p50"],
        "strategy_decision_cpu_us_p99": stats["decision_cpu_us_p99"],
        "strategy_decision_warm_us_p50": round(w50, 1),
        "strategy_decision_warm_us_p99": round(w99, 1),
        "strategy_decision_idle_us_p50": round(i50, 1),
        "strategy_decision_idle_us_p99": round(i99, 1),
        "strategy_decision_idle_gap_ms": round(gap_s * 1000, 2),
        "strategy_decision_vs_idle_p99": round(stats["decision_us_p99"] / i99, 2) if i99 > 0 else None,
        "strategy_features_us_p50": round(f50, 1),
        "strategy_features_us_p99": round(f99, 1),
        "strategy_books": stats["decision_n"],
        "strategy_orders": stats.get("orders", 0),
        "strategy_rss_mb": round(rss_end, 1),
        "strategy_rss_growth_mb": round(rss_end - (rss_warm if rss_warm is not None else rss_end), 1),
    }
