"""The stack under Docker Compose: `up` to healthy, and tick-to-trade across containers (bench/tick_to_trade.py's measure)."""
from __future__ import annotations

import re
import subprocess
import time

from bench.stats import percentile
from tests.docker.image import build_images
from tests.docker.stack import APP_SERVICES, ComposeStack, docker_unavailable, sweep_stale_projects
from bench.common import free_port

SAMPLES, MAX_SECONDS = 300, 240
HEALTHY_TIMEOUT_S = 180
# bench/tick_to_trade.py's settings, so the two figures differ only by the container network
SETTINGS = {"QUANTUMFLOW_TEST_REPLAY_SPEED": "10", "QUANTUMFLOW_TEST_COOLDOWN_MS": "0",
            "QUANTUMFLOW_TEST_MAX_POSITION": "0.001", "QUANTUMFLOW_TEST_LATENCY_MODE": "constant",
            "QUANTUMFLOW_TEST_LATENCY_MS": "0"}
_RESULT = re.compile(r"\bevent=order_result\b.*\bverdict=(\w+).*\btick_to_trade_us=(\d+)")


def _samples(stack: ComposeStack) -> list[float]:
    """tick_to_trade_us of every approved order the strategy has logged so far."""
    out = []
    for line in stack.logs("strategy"):
        m = _RESULT.search(line)
        if m and m.group(1) in ("APPROVED", "ADJUSTED"):
            out.append(float(m.group(2)))
    return out


def run() -> dict[str, float]:
    """Build the images (offline, as the tests do), then time `up` (the command until every
    service is healthy) and collect tick-to-trade from the strategy's log lines.
    Raises RuntimeError when no Docker engine answers or too few orders were filled."""
    reason = docker_unavailable()
    if reason:
        raise RuntimeError(f"compose benchmark needs a Docker engine: {reason}")
    sweep_stale_projects()
    images = build_images()
    stack = ComposeStack(images, api_port=free_port(), prometheus_port=free_port(), env=SETTINGS)
    try:
        started = time.monotonic()
        stack.up(timeout=HEALTHY_TIMEOUT_S)
        stack.wait_healthy(APP_SERVICES, HEALTHY_TIMEOUT_S)
        up_s = time.monotonic() - started
        deadline = time.monotonic() + MAX_SECONDS
        samples: list[float] = []
        while time.monotonic() < deadline:
            samples = _samples(stack)
            if len(samples) >= SAMPLES:
                break
            time.sleep(2)  # polling interval while the replay trades
    except (subprocess.SubprocessError, AssertionError) as exc:
        raise RuntimeError(f"the compose stack did not run: {exc}") from exc
    finally:
        stack.destroy()
    if len(samples) < 20:
        raise RuntimeError(f"only {len(samples)} filled orders in {MAX_SECONDS}s: cannot measure tick-to-trade")
    warm = samples[5:]  # the first orders pay for imports and connection set-up
    return {"compose_up_s": round(up_s, 1),
            "compose_tick_to_trade_us_p50": round(percentile(warm, 50), 1),
            "compose_tick_to_trade_us_p99": round(percentile(warm, 99), 1),
            "compose_tick_to_trade_samples": len(warm)}
