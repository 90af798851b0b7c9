"""Issue #12: the lock-step replay through the real services (processes, sockets, SQLite) gives the
same fills as `qf backtest` of the same capture, byte for byte."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys

import orjson
import pytest

from tests.conftest import SPOT_CAPTURE, clean_environ, fill_rows, run_lockstep, tcp_env

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAN_S = 120  # of the capture's 650 s: every kind of record, dozens of orders, a test of ~half a minute


def short_capture(path, span_s: float = SPAN_S) -> str:
    """The shipped capture's first `span_s` seconds of recorded time (its snapshot included)."""
    out, first = [], None
    with gzip.open(SPOT_CAPTURE, "rb") as fh:
        for line in fh:
            t = orjson.loads(line)["t"]
            first = t if first is None else first
            if t - first > span_s * 1e9:
                break
            out.append(line.rstrip(b"\n"))
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(out) + b"\n")
    return str(path)


def test_a_lockstep_replay_gives_the_backtests_fills_byte_for_byte(tmp_path):
    capture = short_capture(tmp_path / "short.jsonl.gz")
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{capture}", QF_STRATEGY_KIND="imbalance")  # what lock-step runs
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    bt_db = str(tmp_path / "backtest.db")
    bt = subprocess.run([sys.executable, "-m", "services.cli", "backtest", "--capture", capture, "--db", bt_db],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bt.returncode == 0, bt.stderr
    expected = fill_rows(bt_db)
    assert len(expected) > 10

    got, _wall, _lines = run_lockstep(capture, env, 240)
    assert len(got) == len(expected)
    assert got == expected
