"""The Shabbat pause through time (issue #14 part 4), on the shipped capture with its recorded time
moved across Jerusalem's Friday 2026-12-11 evening: five and a half minutes before and into the
flatten window, two minutes inside the pause (candle-lighting 15:55 IST), two and a half after
nightfall (Saturday 17:16 IST). The market data is real and continuous (the same update ids); only
the clock jumps.

- `qf backtest` with the default strategy, holding what it buys: entries accepted before, the
  flatten at the window's minute (risk's own closing order), nothing traded during the pause,
  entries again after nightfall, and the state changes at their instants;
- the real services in a lock-step replay (`qf up --lockstep`: every service takes its time from
  the conductor, so the test moves the clock, nothing sleeps), with the imbalance strategy, which
  keeps asking: orders accepted before, the flatten at the window's minute, every order denied
  SHABBAT during the pause, accepted again after nightfall."""
from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from shared.shabbat import Calendar, place
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, run_lockstep, tcp_env

S = 1_000_000_000
MIN = 60 * S
CAL = Calendar(place("Jerusalem"))
PAUSE = CAL.at(int(datetime(2026, 12, 12, 12, 0, tzinfo=timezone.utc).timestamp()) * S)
FLATTEN_MIN = 3
WINDOW = PAUSE.start_ns - FLATTEN_MIN * MIN  # the flatten window opens: Fri 15:52 IST
# (capture offset where a part begins, where it lands): before and into the window, in the pause,
# after nightfall
PARTS = ((0, WINDOW - 300 * S), (330 * S, PAUSE.start_ns + 30 * S), (450 * S, PAUSE.end_ns + 60 * S))
SETTINGS = {"QF_SHABBAT_PAUSE": "true", "QF_SHABBAT_LOCATION": "Jerusalem",
            "QF_SHABBAT_FLATTEN_MIN": str(FLATTEN_MIN)}


def splice(src: str, dst: str) -> None:
    """`src` with each part's records moved to its landing time: `t` and the exchange's own times
    (`E`, `T`, in ms) by the same amount, so the feed's measured latency stays what it was."""
    with gzip.open(src, "rt") as f:
        records = [json.loads(line) for line in f]
    t0 = records[0]["t"]
    with gzip.open(dst, "wt") as out:
        for rec in records:
            offset = rec["t"] - t0
            begin, land = max(p for p in PARTS if p[0] <= offset)
            shift = land - t0 - begin  # new t = land + (offset - begin)
            rec["t"] += shift
            data = rec.get("m", {}).get("data") if rec["k"] == "ws" else None
            if data is not None:
                for key in ("E", "T"):
                    if key in data:
                        data[key] += shift // 1_000_000
            out.write(json.dumps(rec, separators=(",", ":")) + "\n")


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pause") / "spliced.jsonl.gz")
    splice(SPOT_CAPTURE, path)
    return path


def rows(db: str, sql: str, *params) -> list:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute(sql, params).fetchall()


def states(db: str) -> list[tuple]:
    return rows(db, "SELECT code, state, ts FROM risk_events WHERE kind = 'STATE' ORDER BY ts, id")


def test_the_pause_the_capture_crosses():
    assert PAUSE.name == "Shabbat" and PAUSE.start.strftime("%a %H:%M %Z") == "Fri 15:55 IST"
    assert PAUSE.end.strftime("%a %H:%M %Z") == "Sat 17:16 IST"


def test_qf_backtest_flattens_at_the_window_trades_nothing_during_and_resumes_after_nightfall(capture, tmp_path):
    db = str(tmp_path / "bt.db")
    # hold what is bought (no take-profit, stop-loss, time stop or reversal in ten minutes), so
    # the flatten has a position to close
    env = {**clean_environ(), **SETTINGS, "QF_STRATEGY_TAKE_PROFIT_BPS": "100000",
           "QF_STRATEGY_STOP_LOSS_BPS": "100000",
           "QF_STRATEGY_MAX_HOLD_MS": "86400000", "QF_STRATEGY_REVERSAL_CONFIDENCE": "2"}
    done = subprocess.run([sys.executable, "-m", "services.cli", "backtest", "--capture", capture, "--db", db,
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["pause_flattens"] >= 1 and summary["pause_flatten_failures"] == 0, summary
    assert summary["risk_state"] == "ACTIVE" and summary["gaps"] == []
    assert [(c, s, t) for c, s, t in states(db)] == [
        ("SHABBAT_FLATTEN", "REDUCING", WINDOW), ("SHABBAT", "PAUSED_SHABBAT", PAUSE.start_ns),
        ("SHABBAT_END", "ACTIVE", PAUSE.end_ns)]
    orders = rows(db, "SELECT client_order_id, side, created_ts FROM orders ORDER BY created_ts")
    before = [o for o in orders if o[2] < WINDOW]
    assert any(side == "BUY" for _, side, _ in before)  # entries before
    flatten = [o for o in orders if o[0].startswith("shabbat-")]
    assert flatten and flatten[0][1] == "SELL" and WINDOW <= flatten[0][2] < WINDOW + MIN  # at the minute
    assert not [o for o in orders if PAUSE.start_ns <= o[2] < PAUSE.end_ns]  # nothing during
    assert any(t >= PAUSE.end_ns and side == "BUY" for _, side, t in orders)  # entries again after
    # flat when the pause began: the fills up to its start net to zero
    net = sum((1 if side == "BUY" else -1) * float(qty) for side, qty in rows(
        db, "SELECT side, qty FROM fills WHERE ts < ?", PAUSE.start_ns))
    assert abs(net) < 1e-12
    assert not rows(db, "SELECT 1 FROM fills WHERE ts >= ? AND ts < ?", PAUSE.start_ns, PAUSE.end_ns)
    signals = rows(db, "SELECT count(*) FROM signals WHERE ts >= ? AND ts < ? AND action = 'entry'",
                   PAUSE.start_ns, PAUSE.end_ns)
    assert signals == [(0,)]


def test_the_real_services_on_a_clock_the_test_moves_deny_shabbat_during_the_pause(capture, tmp_path):
    env = {**clean_environ(), **tcp_env(tmp_path, QF_STRATEGY_KIND="imbalance", QF_BROKER_EQUITY_S="3600",
                                         **SETTINGS)}
    env["QF_SHABBAT_PAUSE"] = "true"
    _fills, _wall, lines = run_lockstep(capture, env, 240)
    db = env["QF_DB"]
    got = states(db)
    codes = [c for c, _, _ in got]
    assert codes == ["SHABBAT_FLATTEN", "SHABBAT", "SHABBAT_END"], got
    (_, _, t_window), (_, _, t_start), (_, _, t_end) = got
    # each at the first instant the conductor released at or after it: the window inside its
    # minute (a book every ~100 ms); the pause and its end at the first record after the jump
    assert WINDOW <= t_window < WINDOW + MIN
    assert PAUSE.start_ns <= t_start <= PARTS[1][1] + S and PAUSE.end_ns <= t_end <= PARTS[2][1] + S
    denials = rows(db, "SELECT code, ts FROM risk_events WHERE kind = 'DENIED'")
    during = [c for c, t in denials if t_start <= t < t_end]
    assert during and set(during) == {"SHABBAT"}, denials[:20]
    assert not [c for c, t in denials if c == "SHABBAT" and not t_start <= t < t_end]
    orders = rows(db, "SELECT client_order_id, created_ts FROM orders ORDER BY created_ts")
    assert any(t < WINDOW for _, t in orders)  # accepted before
    assert not [o for o in orders if t_start <= o[1] < t_end and not o[0].startswith("shabbat-")]  # none during
    assert any(t >= t_end for _, t in orders)  # accepted again after nightfall
    flatten = [t for coid, t in orders if coid.startswith("shabbat-")]
    assert all(t_window <= t < t_end for t in flatten)
    # risk said so at each transition, in its log
    assert sum("event=state_change" in line and "code=SHABBAT" in line for line in lines) == 3, lines[-40:]
