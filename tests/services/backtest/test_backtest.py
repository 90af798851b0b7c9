"""`qf backtest` over the shipped Binance capture: the real command, its database, its summary,
its errors; determinism; gaps repaired and not; risk's breakers inside the loop.

The gap captures are the shipped capture with depth events deleted (and, for the repaired one,
a snapshot inserted later: the book `qf book` rebuilds from the real events at that point, so the
snapshot is exact)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import orjson
import pytest

from services.marketdata.capture import build_book

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
IMBALANCE = {"QF_STRATEGY_KIND": "imbalance"}  # tests whose figures assume the imbalance strategy's market orders
KEYS = ("events", "orders", "fills", "turnover", "gross_pnl", "net_pnl", "fees", "max_drawdown", "sharpe",
        "win_rate", "slippage_decision", "slippage_arrival", "maker_share", "events_per_s", "gaps")


def qf_backtest(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, in a clean environment (no QF_* of the caller's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "services.cli", "backtest", *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=timeout)


def fills_hash(db: str) -> str:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT * FROM fills ORDER BY fill_id").fetchall()
    assert rows, "no fills to compare"
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def lines() -> list[bytes]:
    with gzip.open(CAPTURE, "rb") as fh:
        return fh.read().splitlines()


def is_depth(line: bytes) -> bool:
    return b'@depth' in line[:200]


def write_capture(path, records: list[bytes]) -> str:
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(records) + b"\n")
    return str(path)


@pytest.fixture(scope="module")
def gap_captures(tmp_path_factory):
    """(unrepaired, repaired, cut update ids): depth events 3000-3002 deleted; the repaired
    capture gets a snapshot of the true book at depth event 3100."""
    d = tmp_path_factory.mktemp("gaps")
    src = lines()
    depth_at = [i for i, line in enumerate(src) if is_depth(line)]
    cut = depth_at[3000:3003]
    cut_events = [orjson.loads(src[i])["m"]["data"] for i in cut]
    kept = [line for i, line in enumerate(src) if i not in set(cut)]
    unrepaired = write_capture(d / "gap.jsonl.gz", kept)
    at = depth_at[3100]
    prefix = write_capture(d / "prefix.jsonl.gz", src[:at + 1])  # the true book after depth event 3100
    book = build_book(prefix, "BTCUSDT")
    t = orjson.loads(src[at + 1])["t"]
    snap = orjson.dumps({"t": t, "k": "snapshot", "s": "BTCUSDT",
                         "m": {"lastUpdateId": book["update_id"], "bids": book["bids"], "asks": book["asks"]}})
    pos = kept.index(src[at + 1])
    repaired = write_capture(d / "gap-repaired.jsonl.gz", kept[:pos] + [snap] + kept[pos:])
    return unrepaired, repaired, (cut_events[0]["U"], cut_events[-1]["u"]), book["update_id"]


def test_the_shipped_capture_runs_through_every_core_and_fills_a_database_with_the_live_schema(tmp_path):
    db = str(tmp_path / "bt.db")
    # the imbalance strategy: every order a MARKET one that fills (test_backtest_ofi.py runs the default, ofi)
    run = qf_backtest("--capture", CAPTURE, "--db", db, "--json", env=IMBALANCE)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    for key in KEYS:
        assert key in summary, key
    assert summary["events"] == 99_574  # 1 snapshot + 99,573 stream messages (tests/data/SOURCES.md)
    assert summary["orders"] > 50 and summary["fills"] >= summary["broker_orders"] > 0
    assert summary["gaps"] == []
    for money in ("turnover", "gross_pnl", "net_pnl", "fees", "max_drawdown"):
        assert isinstance(summary[money], str)
    with sqlite3.connect(db) as con:
        orders = con.execute("SELECT count(*), count(DISTINCT client_order_id) FROM orders").fetchone()
        fills = con.execute("SELECT count(*), sum(CAST(fee AS REAL)) FROM fills").fetchone()
        first, last = con.execute("SELECT min(ts), max(ts) FROM fills").fetchone()
        equity = con.execute("SELECT count(*) FROM equity").fetchone()[0]
        cols = {r[1] for r in con.execute("PRAGMA table_info(fills)")}
    assert orders[0] == orders[1] == summary["broker_orders"]
    assert fills[0] == summary["fills"]
    assert fills[1] == pytest.approx(float(summary["fees"]))
    # the capture's recorded time, not the machine's: 2024-08-08 23:54 - 2024-08-09 00:05 UTC
    assert 1_723_161_200e9 < first <= last < 1_723_162_000e9
    assert equity > 60  # a row after each filled order, and one every QF_BROKER_EQUITY_S of capture time
    assert {"slippage_decision", "slippage_arrival", "decision_mid", "arrival_mid"} <= cols
    # net = gross - fees, exactly
    from decimal import Decimal
    assert Decimal(summary["net_pnl"]) == Decimal(summary["gross_pnl"]) - Decimal(summary["fees"])


def test_a_person_reads_the_summary_and_an_existing_database_is_not_overwritten(tmp_path):
    db = str(tmp_path / "bt.db")
    first = qf_backtest("--capture", CAPTURE, "--db", db)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    for label in ("capture ", "orders ", "fills ", "P&L ", "drawdown ", "Sharpe ", "win rate ", "slippage ",
                  "gaps ", "database "):
        assert label in out, (label, out)
    assert "msg/s" in out and "none" in out.split("gaps", 1)[1]
    again = qf_backtest("--capture", CAPTURE, "--db", db)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and db in again.stderr and "--overwrite" in again.stderr
    assert qf_backtest("--capture", CAPTURE, "--db", db, "--overwrite").returncode == 0


def test_the_same_capture_config_and_seed_give_byte_identical_fills(tmp_path):
    hashes = []
    for n in range(2):
        db = str(tmp_path / f"run{n}.db")
        run = qf_backtest("--capture", CAPTURE, "--db", db, "--latency-mode", "lognormal", "--seed", "7")
        assert run.returncode == 0, run.stderr
        hashes.append(fills_hash(db))
    assert hashes[0] == hashes[1]
    other = str(tmp_path / "other.db")
    assert qf_backtest("--capture", CAPTURE, "--db", other, "--latency-mode", "lognormal",
                       "--seed", "8").returncode == 0
    assert fills_hash(other) != hashes[0]  # the seed does reach the sampled latency and the ids


@pytest.mark.parametrize("case", ["missing", "not_a_capture", "empty", "no_book_for_symbol", "no_snapshot",
                                  "bad_setting", "bad_config_line", "limits_that_contradict"])
def test_bad_input_is_one_line_naming_the_file_and_exit_2(tmp_path, case):
    db = str(tmp_path / "bt.db")
    path, args, env = str(tmp_path / "x.jsonl.gz"), [], {}
    if case == "not_a_capture":
        path = str(tmp_path / "notes.txt")
        with open(path, "w") as fh:
            fh.write("hello, not json\n")
    elif case == "empty":
        write_capture(path, [b""])
    elif case == "no_book_for_symbol":
        path, args = CAPTURE, ["--symbols", "ethusdt"]
    elif case == "no_snapshot":
        write_capture(path, [line for line in lines()[:3000] if b'"k":"snapshot"' not in line.replace(b" ", b"")])
    elif case == "bad_setting":
        path, env = CAPTURE, {"QF_RISK_MAX_POSITON": "1"}
    elif case == "bad_config_line":
        conf = tmp_path / "bt.env"
        conf.write_text("QF_RISK_MAX_POSITION=0.01\nthis is not a setting\n")
        path, args = CAPTURE, ["--config", str(conf)]
    elif case == "limits_that_contradict":
        path, env = CAPTURE, {"QF_RISK_DAILY_LOSS": "0.001", "QF_RISK_DAILY_LOSS_SOFT": "0.01"}
    run = qf_backtest("--capture", path, "--db", db, *args, env=env)
    assert run.returncode == 2, (run.stdout, run.stderr)
    err = run.stderr.strip()
    assert err.startswith("qf backtest: ") and "\n" not in err, err
    assert "Traceback" not in run.stderr
    named = {"bad_setting": "QF_RISK_MAX_POSITON", "bad_config_line": "bt.env:2",
             "no_book_for_symbol": "ETHUSDT", "limits_that_contradict": "QF_RISK_DAILY_LOSS"}.get(case, os.path.basename(path))
    assert named in err, err


def test_a_gap_nothing_repairs_ends_that_symbols_trading_and_fails_the_run(tmp_path, gap_captures):
    unrepaired, _, (first_cut, last_cut), _ = gap_captures
    db = str(tmp_path / "bt.db")
    run = qf_backtest("--capture", unrepaired, "--db", db, "--json")
    assert run.returncode == 3, run.stderr
    summary = json.loads(run.stdout)
    [gap] = summary["gaps"]
    assert gap["symbol"] == "BTCUSDT" and not gap["repaired"]
    assert gap["after_update_id"] == first_cut - 1 and gap["next_first_update_id"] == last_cut + 1
    assert "never repaired" in run.stderr and str(first_cut - 1) in run.stderr
    with sqlite3.connect(db) as con:
        last_order = con.execute("SELECT max(created_ts) FROM orders").fetchone()[0]
    assert last_order < gap["ts"]  # nothing traded after the gap


def test_a_gap_a_later_snapshot_repairs_resyncs_as_live_and_trading_goes_on(tmp_path, gap_captures):
    _, repaired, (first_cut, _), snap_id = gap_captures
    db = str(tmp_path / "bt.db")
    run = qf_backtest("--capture", repaired, "--db", db, "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    [gap] = summary["gaps"]
    assert gap["repaired"] and gap["after_update_id"] == first_cut - 1
    assert gap["repaired_at_update_id"] >= snap_id
    with sqlite3.connect(db) as con:
        after = con.execute("SELECT count(*) FROM orders WHERE created_ts > ?", (gap["ts"],)).fetchone()[0]
    assert after > 0


def test_risk_runs_inside_the_loop_with_its_breakers_and_denials_stored(tmp_path):
    """A daily-loss limit of 0.02 % (2 USDT of 10,000): the fees alone trip it; risk halts, later
    orders are denied, and the state change and the denials are in risk_events, as live."""
    conf = tmp_path / "tight.env"
    conf.write_text("# a tight daily loss\nQF_RISK_DAILY_LOSS=0.0002\nQF_RISK_DAILY_LOSS_SOFT=0.0001\n")
    db = str(tmp_path / "bt.db")
    # the imbalance strategy keeps asking while risk denies; ofi stops entries on REDUCING/HALTED
    # (test_backtest_ofi.py)
    run = qf_backtest("--capture", CAPTURE, "--db", db, "--config", str(conf), "--json", env=IMBALANCE)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["denied"] > 0
    with sqlite3.connect(db) as con:
        kinds = dict(con.execute("SELECT kind, count(*) FROM risk_events GROUP BY kind").fetchall())
        codes = {r[0] for r in con.execute("SELECT code FROM risk_events WHERE kind = 'DENIED'")}
    assert kinds.get("STATE", 0) >= 1 and kinds.get("DENIED", 0) == summary["denied"]
    with sqlite3.connect(db) as con:
        states = [r[0] for r in con.execute("SELECT code FROM risk_events WHERE kind = 'STATE' ORDER BY ts")]
    assert "DAILY_LOSS" in " ".join(states).upper(), states
    assert codes  # each denial says why


def test_the_api_reads_a_backtest_database_unchanged(tmp_path):
    db = str(tmp_path / "bt.db")
    run = qf_backtest("--capture", CAPTURE, "--db", db, "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    from services.api.app import create_app
    from shared.config import load
    client = create_app(load({"QF_DB": db})).test_client()
    trades = client.get("/api/v1/trades?limit=5")
    assert trades.status_code == 200, trades.get_data(as_text=True)
    assert trades.get_json()["count"] == 5
    positions = client.get("/api/v1/positions")
    assert positions.status_code == 200, positions.get_data(as_text=True)
    [btc] = positions.get_json()["positions"]
    assert btc["fills"] == summary["fills"]
    assert btc["qty"] == "0" and btc["net_realized_pnl"] == summary["net_pnl"]  # flat at the end: all realized
