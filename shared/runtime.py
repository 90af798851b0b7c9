"""What every service shell shares: liveness files, heartbeats, the stop signal."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from shared.messages import Heartbeat

LIVENESS_MAX_AGE_S = 10.0


def liveness_path(run_dir: str, service: str) -> Path:
    return Path(run_dir) / f"{service}.alive"


class Liveness:
    """Touches `{run_dir}/{service}.alive` from the service's own loop, so a
    container health check (`qf health SERVICE`) sees a loop that still turns."""

    def __init__(self, run_dir: str, service: str) -> None:
        self.path = liveness_path(run_dir, service)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def touch(self) -> None:
        self.path.touch()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def is_alive(run_dir: str, service: str, max_age_s: float = LIVENESS_MAX_AGE_S) -> bool:
    try:
        return time.time() - liveness_path(run_dir, service).stat().st_mtime <= max_age_s
    except FileNotFoundError:
        return False


class Ticker:
    """Due every `period_ms` of monotonic time; `due(now)` says whether it fired."""

    def __init__(self, period_ms: int) -> None:
        self.period = period_ms / 1000
        self.next = 0.0

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now >= self.next:
            self.next = now + self.period
            return True
        return False


class HeartbeatMaker:
    """Builds `heartbeat` messages for one service."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.pid = os.getpid()
        self.started_ts = time.time_ns()

    def make(self, status: str, stats: dict | None = None) -> Heartbeat:
        return Heartbeat(ts=time.time_ns(), service=self.service, pid=self.pid,
                         started_ts=self.started_ts, status=status, stats=stats)


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop()` on SIGTERM or SIGINT (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001 - signal API
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
