"""Resident memory of marketdata replaying both real captures in a loop at full speed, vs a naive book."""
# Two symbols (spot + USD-M BTCUSDT) from tests/data, RSS read from /proc at minute 2 and
# minute 10; the naive run is the same process with bench/naive_book.py's dict book swapped in.
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time


from shared.bus import Subscriber
from bench.common import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
CAPTURES = (os.path.join(DATA, "binance-spot-btcusdt-20240808.jsonl.gz"),
            os.path.join(DATA, "binance-usdm-btcusdt-20240718.jsonl.gz"))
DURATION_S = float(os.environ.get("MD_RSS_SECONDS", "600"))  # the 10 minutes; shorter for a try-out
EARLY_S = DURATION_S / 5  # minute 2 of 10
MIB = 1 << 20

# The naive variant: the same service and process, with the book class swapped before it starts.
_NAIVE = ("import sys; import services.marketdata.sync as s; from bench.naive_book import NaiveBook; "
          "s.OrderBook = NaiveBook; import services.marketdata.router as r; r.parse_depth_frame = lambda f: None; "
          "from services.cli import main; sys.exit(main(['marketdata']))")


def rss_mib(pid: int) -> float:
    """VmRSS of process `pid` in MiB, from /proc. Raises OSError if it is gone."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    raise OSError(f"no VmRSS for {pid}")


class _Run:
    """One marketdata process and a heartbeat listener (heartbeats only: the PUB socket filters
    at the sender, so no book message queues up anywhere)."""

    def __init__(self, name: str, naive: bool) -> None:
        self.name, tmp, port = name, tempfile.mkdtemp(prefix=f"qf-rss-{name}-"), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
        env.update({"QF_FEED": "replay:" + ",".join(CAPTURES), "QF_REPLAY_SPEED": "0", "QF_REPLAY_LOOP": "true",
                    "QF_SYMBOLS": "btcusdt,usdm:btcusdt", "QF_MD_PUB": f"tcp://127.0.0.1:{port}",
                    "QF_RUN_DIR": f"{tmp}/run", "QF_LOG_LEVEL": "WARNING", "PYTHONPATH": ROOT})
        cmd = [sys.executable, "-c", _NAIVE] if naive else [sys.executable, "-m", "services.cli", "marketdata"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.sub = Subscriber(f"tcp://127.0.0.1:{port}", ["heartbeat."], 1000)
        self.stats: dict = {}
        self.samples: dict[str, float] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            if self.sub.sock.poll(200):
                _, msg = self.sub.recv()
                self.stats = msg.stats or {}

    def sample(self, label: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: marketdata exited with {self.proc.returncode}: "
                               f"{self.proc.stderr.read().decode()[-1500:]}")
        self.samples[label] = rss_mib(self.proc.pid)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sub.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run() -> dict[str, float]:
    # Both run side by side (one core each) so the figures cost 10 minutes, not 20.
    runs = {"ours": _Run("ours", naive=False), "naive": _Run("naive", naive=True)}
    try:
        start = time.monotonic()
        peak = dict.fromkeys(runs, 0.0)
        for label, at in (("early", EARLY_S), ("late", DURATION_S)):
            while time.monotonic() - start < at:
                time.sleep(min(5.0, max(0.0, at - (time.monotonic() - start))))
                for name, r in runs.items():  # a sample every 5 s keeps the peak honest
                    r.sample("now")
                    peak[name] = max(peak[name], r.samples["now"])
            for r in runs.values():
                r.sample(label)
        events = {name: r.stats.get("book_events", 0) for name, r in runs.items()}
    finally:
        for r in runs.values():
            r.stop()
    ours, naive = runs["ours"].samples, runs["naive"].samples
    return {
        "md_rss_mb": round(ours["late"], 1),
        "md_rss_growth_mb": round(ours["late"] - ours["early"], 2),
        "md_rss_peak_mb": round(peak["ours"], 1),
        "md_rss_books_published": events["ours"],
        "md_naive_rss_mb": round(naive["late"], 1),
        "md_naive_rss_growth_mb": round(naive["late"] - naive["early"], 2),
        "md_naive_rss_books_published": events["naive"],
        "md_rss_seconds": DURATION_S,
    }
