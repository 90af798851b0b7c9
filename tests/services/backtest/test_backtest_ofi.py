"""`qf backtest` with the default strategy, ofi (services/strategy/ofi.py), over the shipped capture:
it trades (maker and market entries, exits), every order has the signal that sent it in `signals`,
the strategy's position follows the exchange's fills, identical runs give identical databases, and
risk's REDUCING stops its entries; the `signals` table in a database made before it existed."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal

import pytest

from services.backtest import cli
from shared.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
TABLES = ("orders", "fills", "equity", "signals", "risk_events")


def qf_backtest(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, in a clean environment (no QF_* of the caller's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "services.cli", "backtest", *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=timeout)


def rows(db: str, sql: str, *params) -> list:
    with sqlite3.connect(db) as con:
        return con.execute(sql, params).fetchall()


def digest(db: str) -> dict[str, str]:
    out = {}
    with sqlite3.connect(db) as con:
        for table in TABLES:
            data = con.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            out[table] = hashlib.sha256(repr(data).encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The default run: (summary, database path)."""
    db = str(tmp_path_factory.mktemp("ofi") / "bt.db")
    done = qf_backtest("--capture", CAPTURE, "--db", db, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), db


def test_ofi_is_the_default_and_trades_the_capture_with_maker_and_market_entries_and_exits(run):
    summary, db = run
    assert summary["strategy"] == "ofi" and summary["gaps"] == [] and summary["strategy_errors"] == 0
    stats = summary["strategy_stats"]
    assert stats["books"] == 6493 and stats["trades"] == 19_904  # every book and trade of the capture
    assert 10 <= summary["round_trips"] <= 200  # tens, not thousands, not none
    assert stats["entries_limit"] > 0 and stats["entries_market"] > 0
    exits = sum(v for k, v in stats.items() if k.startswith("exits_"))
    assert exits >= summary["round_trips"]
    kinds = dict(rows(db, "SELECT kind || ' ' || tif || ' ' || side, count(*) FROM orders GROUP BY 1"))
    assert set(kinds) <= {"LIMIT GTX BUY", "MARKET GTC BUY", "MARKET GTC SELL"}, kinds
    assert kinds["LIMIT GTX BUY"] == stats["entries_limit"] and kinds["MARKET GTC BUY"] == stats["entries_market"]
    liquidity = dict(rows(db, "SELECT liquidity, count(*) FROM fills GROUP BY liquidity"))
    assert liquidity.get("MAKER", 0) > 0 and liquidity.get("TAKER", 0) > 0
    assert 0 < summary["maker_share"] < 1
    # every maker fill is a post-only entry's, at its limit price; nothing post-only ever took
    maker = rows(db, "SELECT o.kind, o.tif, o.price, f.price FROM fills f JOIN orders o USING (order_id) "
                     "WHERE f.liquidity = 'MAKER'")
    assert all(k == "LIMIT" and tif == "GTX" and Decimal(op) == Decimal(fp) for k, tif, op, fp in maker)
    assert not rows(db, "SELECT 1 FROM fills f JOIN orders o USING (order_id) WHERE o.tif = 'GTX' "
                        "AND f.liquidity = 'TAKER'")
    # spot long/flat: the position never went below 0, and the cancels went through risk to the broker
    running = Decimal(0)
    for side, qty in rows(db, "SELECT side, qty FROM fills ORDER BY ts, fill_id"):
        running += Decimal(qty) if side == "BUY" else -Decimal(qty)
        assert running >= 0
    assert summary["cancels"] > 0
    cancelled = rows(db, "SELECT count(*) FROM orders WHERE status = 'CANCELLED' AND reason = 'CANCELLED_BY_CLIENT'")
    assert 0 < cancelled[0][0] <= summary["cancels"]


def test_every_order_has_the_signal_that_sent_it_with_its_features(run):
    summary, db = run
    signals = rows(db, "SELECT ts, symbol, side, confidence, score, features, update_id, recv_ts, client_order_id, "
                       "action FROM signals ORDER BY id")
    assert len(signals) == summary["signals"] > 0
    by_cid = {s[8]: s for s in signals if s[8]}
    orders = rows(db, "SELECT client_order_id, side, created_ts FROM orders")
    assert orders and len(by_cid) == len(orders)
    for cid, side, created in orders:
        sig = by_cid[cid]
        assert sig[9] == "entry" if side == "BUY" else sig[9].startswith("exit:")
        assert sig[0] <= created and sig[6] > 0 and sig[7] > 0
        if sig[9] == "entry":
            assert sig[2] == "BUY" and 0 < sig[3] <= 1 and sig[4] >= sig[3] - 1e-12
    names = set(json.loads(signals[0][5]))
    assert {"ofi_multi_1000ms", "ofi_l1_1000ms", "trade_flow_1000ms", "depth_imbalance", "microprice_dev_bps",
            "vol_1s", "spread_ratio", "momentum_1s"} <= names
    # side changes are rows too, but not one per book
    assert summary["strategy_stats"]["side_changes"] <= len(signals) < summary["strategy_stats"]["books"] / 4


def test_identical_runs_give_identical_databases_and_summaries(tmp_path, run):
    summary, db = run
    again = str(tmp_path / "again.db")
    done = qf_backtest("--capture", CAPTURE, "--db", again, "--json")
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)
    for s in (summary, second):
        s.pop("events_per_s"), s.pop("db")
    assert second == summary
    assert digest(again) == digest(db)


def test_the_strategy_follows_the_exchanges_fills_exactly_once():
    cfg = load({})
    specs = cli.check_captures([CAPTURE])
    from services.backtest.engine import Backtest
    from services.marketdata.feeds import ReplayFeed
    from services.marketdata.router import BookRouter
    statements: list = []
    router = BookRouter(tuple(cfg.md.symbols), cfg.md.book_depth)
    bt = Backtest(cfg, tuple(cfg.md.symbols), 0, statements.extend, router)
    bt.run(ReplayFeed(specs, tuple(cfg.md.symbols), 0, stamp="recorded").records())
    s = bt.strategy
    held = bt.exchange.account.positions.get("BTCUSDT", Decimal(0))
    assert s.position("BTCUSDT") == held
    assert s.stats["fills"] == bt.exchange.fills  # each fill once, though told twice (ack and fill.*)
    assert s.stats["duplicate_fills"] > 0 and s.stats["refused"] == 0
    working = s.working("BTCUSDT")
    assert working is None or not working.in_flight  # every request answered by the end
    assert sum(1 for w in bt.exchange.model.working.values() if w.order.is_open) <= 1


def test_reducing_stops_entries_without_a_single_denial(tmp_path):
    """A daily loss soft limit of 0.01 % (1 USDT): risk switches to REDUCING; the strategy hears it,
    sends no entry after it, cancels a resting one, and still exits what it holds."""
    conf = tmp_path / "tight.env"
    conf.write_text("QF_RISK_DAILY_LOSS=0.0002\nQF_RISK_DAILY_LOSS_SOFT=0.0001\n")
    db = str(tmp_path / "bt.db")
    done = qf_backtest("--capture", CAPTURE, "--db", db, "--config", str(conf), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    [(ts, state)] = rows(db, "SELECT ts, state FROM risk_events WHERE kind = 'STATE' ORDER BY ts LIMIT 1")
    assert state in ("REDUCING", "HALTED")
    assert rows(db, "SELECT count(*) FROM orders WHERE side = 'BUY' AND created_ts > ?", ts) == [(0,)]
    assert rows(db, "SELECT count(*) FROM orders WHERE created_ts <= ?", ts)[0][0] > 0
    assert summary["denied"] == 0 and summary["positions"] == {}


def test_the_imbalance_strategy_stores_no_signals(tmp_path):
    db = str(tmp_path / "bt.db")
    done = qf_backtest("--capture", CAPTURE, "--db", db, "--json", env={"QF_STRATEGY_KIND": "imbalance"})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert "strategy" not in summary and summary["orders"] > 0
    assert rows(db, "SELECT count(*) FROM signals") == [(0,)]
    assert rows(db, "SELECT count(*) FROM orders WHERE kind != 'MARKET'") == [(0,)]


def test_a_database_made_before_the_signals_table_gets_it(tmp_path):
    from shared.db import JOURNAL_SQL, SIGNAL_INSERT, close_db, init_db
    path = str(tmp_path / "old.db")
    init_db(path)
    close_db()
    with sqlite3.connect(path) as con:
        con.execute("DROP TABLE signals")
    init_db(path)
    try:
        from shared import journal
        journal.write([(SIGNAL_INSERT, (1, "BTCUSDT", "BUY", 0.7, 0.7, '{"vol_1s":0.0001}', 5, 1, "x-1", "entry"))])
    finally:
        close_db()
    assert rows(path, "SELECT side, confidence, features, client_order_id, action FROM signals") == [
        ("BUY", 0.7, '{"vol_1s":0.0001}', "x-1", "entry")]
    assert "signals" in JOURNAL_SQL[SIGNAL_INSERT]
