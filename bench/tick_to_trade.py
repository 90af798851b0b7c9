"""Tick-to-trade over the replay, real processes and sockets: book event received by
marketdata → fill acknowledged to strategy (its `order_result` log line); beside it, the same
run's floor (bench/tick_to_trade_floor.py: the same four processes, sockets and subscriptions
doing no work) and our figures as multiples of it (goal: ≤ 1.3× at p50, ≤ 1.5× at p99)."""
from __future__ import annotations

import os
import re
import tempfile
import threading

from bench import tick_to_trade_floor
from bench.stats import percentile
from services.supervisor import Stack
from bench.common import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
SAMPLES, MAX_SECONDS = 400, 240
_T2T = re.compile(r"\bverdict=(\w+).*\brisk_rtt_us=(\d+).*\btick_to_trade_us=(\d+)")
_RISK_STOP = re.compile(r"\b(check|broker)_us_p50=(\d+)")


def bench_env(tmp: str) -> dict[str, str]:
    """The stack's environment for the measurement (its database and run dir under `tmp`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update({
        "QF_MD_PUB": f"tcp://127.0.0.1:{free_port()}", "QF_RISK_REP": f"tcp://127.0.0.1:{free_port()}",
        "QF_BROKER_REP": f"tcp://127.0.0.1:{free_port()}", "QF_BROKER_PUB": f"tcp://127.0.0.1:{free_port()}",
        "QF_RISK_PUB": f"tcp://127.0.0.1:{free_port()}", "QF_API_BIND": f"127.0.0.1:{free_port()}",
        "QF_DB": f"{tmp}/bench.db", "QF_RUN_DIR": f"{tmp}/run", "PYTHONUNBUFFERED": "1",
        # recorded pace ×10 so orders are frequent, yet each one meets an idle-ish pipeline as live would
        "QF_FEED": f"replay:{CAPTURE}", "QF_REPLAY_SPEED": "10", "QF_REPLAY_LOOP": "true",
        "QF_SHABBAT_PAUSE": "false",  # on the wall clock: a benchmark must not depend on the weekday
        # the imbalance strategy: market orders, so every sample is a fill acknowledged to the strategy
        "QF_STRATEGY_KIND": "imbalance", "QF_STRATEGY_COOLDOWN_MS": "0", "QF_RISK_MAX_POSITION": "0.001",
        # our pipeline's own cost: the broker's simulated exchange latency (10 ms by default) is off
        "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0",
    })
    return env


def run() -> dict[str, float]:
    env = bench_env(tempfile.mkdtemp(prefix="qf-bench-"))
    samples: list[float] = []
    rtts: list[float] = []
    risk_parts: dict[str, float] = {}
    done = threading.Event()

    def on_line(name: str, line: str) -> None:
        if name == "strategy" and "order_result" in line:
            m = _T2T.search(line)
            if m and m.group(1) in ("APPROVED", "ADJUSTED"):
                rtts.append(float(m.group(2)))
                samples.append(float(m.group(3)))
                if len(samples) >= SAMPLES:
                    done.set()
        elif name == "risk" and "event=stopped" in line:  # risk's own timings of the orders it served
            risk_parts.update((k, float(v)) for k, v in _RISK_STOP.findall(line))

    stack = Stack(env, services=("broker", "risk", "strategy", "marketdata"), on_line=on_line, restart=False)
    stack.start()
    try:
        done.wait(MAX_SECONDS)
    finally:
        stack.stop()
    if len(samples) < 20:
        raise RuntimeError(f"only {len(samples)} filled orders in {MAX_SECONDS}s: cannot measure tick-to-trade")
    warm, warm_rtt = samples[5:], rtts[5:]  # the first orders pay for imports and connection set-up
    ours = {"tick_to_trade_us_p50": round(percentile(warm, 50), 1),
            "tick_to_trade_us_p99": round(percentile(warm, 99), 1),
            "tick_to_trade_samples": len(warm),
            # where it goes: book → order sent (marketdata's work, the hop, the strategy's decision)
            # and the order's round trip through risk and the broker; inside that, risk's own work
            # (check_us: the broker hop excluded) and its wait for the broker (broker_us)
            "tick_to_trade_book_to_order_us_p50": round(percentile([t - r for t, r in zip(warm, warm_rtt)], 50), 1),
            "tick_to_trade_rtt_us_p50": round(percentile(warm_rtt, 50), 1),
            "tick_to_trade_risk_check_us_p50": risk_parts.get("check", -1.0),
            "tick_to_trade_risk_broker_us_p50": risk_parts.get("broker", -1.0)}
    floor = tick_to_trade_floor.run()
    return {**ours, **floor,
            "tick_to_trade_vs_floor_p50": round(ours["tick_to_trade_us_p50"] / floor["tick_to_trade_floor_us_p50"], 2),
            "tick_to_trade_vs_floor_p99": round(ours["tick_to_trade_us_p99"] / floor["tick_to_trade_floor_us_p99"], 2),
            "tick_to_trade_rtt_vs_floor_p50": round(ours["tick_to_trade_rtt_us_p50"]
                                                    / floor["tick_to_trade_floor_rtt_us_p50"], 2)}
