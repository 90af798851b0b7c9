"""`qf report` on a million fills (issue #16: goal ≤ 10 s): wall seconds and peak RSS of the real command.

The database is bench/api.py's generated history (1,000,000 fills, ~900k equity snapshots, risk's
halts and Shabbat pauses over 30 days), cached under build/bench-api/. One run warms the page
cache; then RUNS runs of `qf report --db … --out … --readme …`, each a fresh process timed from
start to exit; the median is `report_1m_fills_s`, the largest peak RSS `report_rss_mb`."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.api import cached_db
from bench.common import clean_environ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLS = 1_000_000
RUNS = 3


def _once(db: str, tmp: str) -> tuple[float, float]:
    """One `qf report` process: (wall seconds, peak RSS MiB). Raises RuntimeError if it fails."""
    readme = os.path.join(tmp, "README.md")
    with open(readme, "w") as f:
        f.write("# bench\n\n<!-- report:start -->\n<!-- report:end -->\n")
    qf = os.path.join(os.path.dirname(sys.executable), "qf")
    cmd = [qf] if os.path.exists(qf) else [sys.executable, "-m", "services.cli"]
    cmd += ["report", "--db", db, "--out", os.path.join(tmp, "out"), "--readme", readme]
    err_path = os.path.join(tmp, "stderr")
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_environ(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(os.path.join(tmp, "out", "summary.md")) as f:
        summary = f.read() if proc.returncode == 0 else ""
    if proc.returncode != 0 or f"from {FILLS:,} fills" not in summary:
        with open(err_path, errors="replace") as f:
            raise RuntimeError(f"qf report failed ({proc.returncode}): {f.read()[-500:]}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def run() -> dict:
    db = cached_db(FILLS)
    with tempfile.TemporaryDirectory(prefix="qf-bench-report-") as tmp:
        _once(db, tmp)  # the page cache warmed, as on a machine that reads its database every day
        runs = [_once(db, tmp) for _ in range(RUNS)]
    seconds = [s for s, _ in runs]
    return {"report_1m_fills_s": round(statistics.median(seconds), 2),
            "report_1m_fills_min_s": round(min(seconds), 2),
            "report_rss_mb": round(max(r for _, r in runs), 1)}
