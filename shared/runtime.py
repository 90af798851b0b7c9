"""What every service shell shares: liveness files, heartbeats, the stop signal, a µs latency histogram."""
from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from shared import storage
from shared.messages import Heartbeat

log = logging.getLogger("qf.runtime")

LIVENESS_MAX_AGE_S = 10.0
GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)


def quiet_gc() -> bool:
    """In a service's own process, before its loop: what start-up built never becomes garbage
    (frozen out of every collection) and refcounting frees the rest, so the cycle collector may
    run rarely; at Python's default a young-generation pass every ~700 allocations (a book's
    decoded levels are dozens) landed inside the per-message work and cost its p99. Does nothing
    (False) off the main thread: a test running the loop in a thread keeps its process's GC."""
    if threading.current_thread() is not threading.main_thread():
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)
    return True


def identity(service: str, instance: str = "") -> str:
    """A process's name on the bus and in its run dir: `service`, or `service.instance` for one of
    several processes of a service (QF_INSTANCE), whose heartbeats and alerts then have topics of
    their own (`heartbeat.marketdata.2`), so a subscriber counts each one's sequence apart."""
    return f"{service}.{instance}" if instance else service


def kind_of(name: str) -> str:
    """The service a process's name (`identity`) belongs to: `marketdata.2` -> `marketdata`."""
    return name.partition(".")[0]


def liveness_path(run_dir: str, service: str) -> Path:
    return Path(run_dir) / f"{service}.alive"


class Liveness:
    """Touches `{run_dir}/{service}.alive` from the service's own loop, so a
    container health check (`qf health SERVICE`) sees a loop that still turns.
    `Liveness(run_dir, service)` raises StorageError when `run_dir` cannot be made or written."""

    def __init__(self, run_dir: str, service: str) -> None:
        self.path = liveness_path(run_dir, service)
        storage.ensure_writable_dir(str(self.path.parent))
        self.failing: str | None = None  # why the last touch failed; None while touches work
        self.failures = 0

    def touch(self) -> bool:
        """Mark the loop alive; False when the file system refused (logged once per streak of
        failures, never raised: a full or failing disk must not stop the loop it reports on)."""
        try:
            self.path.touch()
        except OSError as exc:
            self.failures += 1
            if self.failing is None:
                self.failing = storage.problem(exc)
                log.warning("liveness_touch_failed", extra={"path": str(self.path), "problem": self.failing})
            return False
        if self.failing is not None:
            log.info("liveness_touch_recovered", extra={"path": str(self.path), "failures": self.failures})
            self.failing = None
        return True

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # a read-only run dir at shutdown: nothing left to do about it
            pass


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
        self.topic = f"heartbeat.{service}"
        self.pid = os.getpid()
        self.started_ts = time.time_ns()

    def make(self, status: str, stats: dict | None = None) -> Heartbeat:
        return Heartbeat(ts=time.time_ns(), service=self.service, pid=self.pid,
                         started_ts=self.started_ts, status=status, stats=stats)


class EarlyStop:
    """SIGTERM/SIGINT handled from before a service exists: a service's start can take seconds
    (risk rebuilds from the database), and a stop asked meanwhile must end it cleanly, not by
    the signal's default action. `attach(service)` passes a stop already asked, and every later
    one, to `service.stop()`."""

    def __init__(self) -> None:
        self.asked = False
        self.service = None
        on_stop_signals(self._stop)

    def _stop(self) -> None:
        self.asked = True
        if self.service is not None:
            self.service.stop()

    def attach(self, service) -> None:
        self.service = service
        if self.asked:
            service.stop()  # its run() then returns at once, closing what the start opened


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop()` on SIGTERM or SIGINT (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001 - signal API
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class MicrosHistogram:
    """Counts of durations in 1 µs bins up to `top_us` (one bin above it): recording is an
    index increment, and percentiles are exact to the microsecond (no sampling, no sort).
    Bins are also counted by blocks of 64, so a percentile walks at most ~80 blocks and 64
    bins: a heartbeat reads three histograms on the service's loop, and a walk over every
    bin up to the percentile held that loop for up to a millisecond."""

    def __init__(self, top_us: int = 5000) -> None:
        self.bins = [0] * (top_us + 1)
        self.blocks = [0] * ((top_us >> 6) + 1)
        self.top = top_us
        self.count = 0
        self.max_us = 0

    def record_ns(self, ns: int) -> None:
        us = ns // 1000
        i = us if us < self.top else self.top
        self.bins[i] += 1
        self.blocks[i >> 6] += 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def percentiles(self, *ps: float) -> list[int]:
        """Nearest-rank percentiles in µs (bin `us` holds [us, us+1) µs; `top_us` stands for
        anything at or above it); zeros when empty."""
        if not self.count:
            return [0 for _ in ps]
        out = []
        for p in ps:
            rank = max(1, -(-self.count * p // 100))
            seen, block = 0, 0
            for block, n in enumerate(self.blocks):
                if seen + n >= rank:
                    break
                seen += n
            us = block << 6
            for us in range(block << 6, min((block << 6) + 64, self.top + 1)):
                seen += self.bins[us]
                if seen >= rank:
                    break
            out.append(us)
        return out

    def stats(self, prefix: str) -> dict[str, int]:
        p50, p99 = self.percentiles(50, 99)
        return {f"{prefix}_us_p50": p50, f"{prefix}_us_p99": p99, f"{prefix}_us_max": self.max_us,
                f"{prefix}_n": self.count}
