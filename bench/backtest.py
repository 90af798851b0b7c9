"""`qf backtest` figures (issue #12): throughput of the whole in-process pipeline over the shipped
spot BTCUSDT capture, with the market-data floor of the same run beside it, and determinism."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
RUNS = 3


def _fills_hash(db: str) -> str:
    from tests.conftest import fill_rows
    return hashlib.sha256(repr(fill_rows(db)).encode()).hexdigest()


def _inproc(db: str, **env: str) -> tuple[float, dict]:
    """One backtest in this process (what `qf backtest` runs after parsing its arguments), with the
    default settings over `env`: (wall seconds from opening the capture to the database written,
    its summary)."""
    from services.backtest import cli
    from shared.config import load
    from shared.db import close_db

    cfg = load(env)
    t0 = time.perf_counter()
    specs = cli.check_captures([CAPTURE])
    cli.open_db(db, overwrite=True)
    try:
        summary, _ = cli.run(cfg, specs, db, cfg.broker.seed)
    finally:
        close_db()
    return time.perf_counter() - t0, summary


def _md_floor() -> tuple[float, int]:
    """The no-work floor of the same pipeline: ReplayFeed(stamp="recorded") into BookRouter with a
    publisher that drops everything (read, parse, sync, book metrics; no strategy, risk or broker)."""
    from services.marketdata.feeds import ReplayFeed
    from services.marketdata.records import SnapshotRecord, WsMessage
    from services.marketdata.router import BookRouter

    class Drop:
        def publish(self, topic, msg) -> None:
            pass

    router = BookRouter(("BTCUSDT",), 10)
    router.pub = Drop()
    n = 0
    t0 = time.perf_counter()
    for rec in ReplayFeed(CAPTURE, ("BTCUSDT",), 0, stamp="recorded").records():
        router.dispatch(rec, rec.recv_ns)
        n += type(rec) in (WsMessage, SnapshotRecord)
    return time.perf_counter() - t0, n


def _lockstep(tmp: str, expected_db: str, **settings: str) -> tuple[float, float, int]:
    """`qf up --feed replay:CAPTURE --lockstep` over the whole capture through the real services,
    with the default settings over `settings`: (fraction of the backtest's fills (`expected_db`,
    of the same settings) it reproduced byte for byte, wall seconds, its fills)."""
    import pathlib

    from tests.conftest import clean_environ, fill_rows, run_lockstep, tcp_env

    kind = settings.get("QF_STRATEGY_KIND", "default")
    run = os.path.join(tmp, f"lockstep-{kind}")
    os.makedirs(run, exist_ok=True)
    env = {**clean_environ(), **tcp_env(pathlib.Path(run), QF_DB=os.path.join(run, "lockstep.db"), **settings)}
    got, wall, _lines = run_lockstep(CAPTURE, env, 900)
    expected = fill_rows(expected_db)
    match = len(set(expected) & set(got)) / len(expected) if expected else 0.0
    if len(got) != len(expected):
        match = min(match, len(expected) / max(len(got), 1))  # extra fills are differences too
    return match, wall, len(got)


def run() -> dict[str, float]:
    """- backtest_msgs_per_s: capture messages / wall s of the whole pipeline in one process (capture
      read and parsed, books synced, strategy, risk, fill model, ledger, database written), median
      of RUNS; backtest_md_floor_msgs_per_s: the market-data part alone in the same run
      (`_md_floor`), and backtest_vs_md_floor their ratio (1.0 = the trading cores cost nothing).
    - backtest_cli_msgs_per_s, backtest_cli_rss_mb: the real `qf backtest` subprocess (interpreter
      start included), its peak RSS.
    - backtest_identical_runs: 1 when two runs give the same fills table byte for byte, else 0.
    - lockstep_fill_match: the fraction of the backtest's fills (the default strategy, OFI: the
      CLI run's) that `qf up --feed replay:CAPTURE --lockstep` (the real services, processes,
      sockets and SQLite) reproduced byte for byte (lower when it made others too);
      lockstep_msgs_per_s: capture messages / its wall seconds; lockstep_fill_match_imbalance,
      lockstep_imbalance_msgs_per_s: the same with QF_STRATEGY_KIND=imbalance."""
    with tempfile.TemporaryDirectory() as tmp:
        runs, floors, hashes, events = [], [], [], 0
        for i in range(RUNS):
            db = os.path.join(tmp, f"run{i}.db")
            seconds, summary = _inproc(db)
            runs.append(summary["events"] / seconds)
            events = summary["events"]
            hashes.append(_fills_hash(db))
            seconds, n = _md_floor()
            floors.append(n / seconds)
        runs.sort()
        floors.sort()
        env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
        db = os.path.join(tmp, "cli.db")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "backtest", "--capture", CAPTURE, "--db", db],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait4: this child's own peak RSS (RUSAGE_CHILDREN would be the largest of every child so far)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"qf backtest failed: {err[-300:]}")
        rss_mb = usage.ru_maxrss / 1024
        hashes.append(_fills_hash(db))
        match, lock_wall, _ = _lockstep(tmp, db)  # the default (OFI) strategy, against the CLI run
        imbalance_db = os.path.join(tmp, "imbalance.db")
        _inproc(imbalance_db, QF_STRATEGY_KIND="imbalance")
        match_imb, lock_wall_imb, _ = _lockstep(tmp, imbalance_db, QF_STRATEGY_KIND="imbalance")
    median, floor = runs[len(runs) // 2], floors[len(floors) // 2]
    return {
        "backtest_msgs_per_s": round(median),
        "backtest_md_floor_msgs_per_s": round(floor),
        "backtest_vs_md_floor": round(median / floor, 3),
        "backtest_cli_msgs_per_s": round(events / wall),
        "backtest_cli_rss_mb": round(rss_mb, 1),
        "backtest_identical_runs": int(len(set(hashes)) == 1),
        # the default (OFI) strategy on the shipped capture with default settings: honest figures
        "ofi_backtest_round_trips": summary["round_trips"],
        "ofi_backtest_fills": summary["fills"],
        "ofi_backtest_net_pnl": float(summary["net_pnl"]),
        "ofi_backtest_fees": float(summary["fees"]),
        "ofi_backtest_maker_share": round(summary["maker_share"] or 0.0, 3),
        "lockstep_fill_match": round(match, 4),
        "lockstep_msgs_per_s": round(events / lock_wall),
        "lockstep_fill_match_imbalance": round(match_imb, 4),
        "lockstep_imbalance_msgs_per_s": round(events / lock_wall_imb),
    }
