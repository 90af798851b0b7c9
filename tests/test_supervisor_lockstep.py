"""Issue #12: `qf up --feed replay:FILE --lockstep`, the launcher's side (the whole replay against
`qf backtest` is tests/test_lockstep.py; the conductor, tests/services/marketdata/test_conductor.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.supervisor import LOCKSTEP_WAITS, StatusMonitor, lockstep_endpoint, lockstep_env
from shared import config as qfconfig
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, tcp_env


def qf_up(tmp_path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {**clean_environ(), **tcp_env(tmp_path, **settings), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "services.cli", "up", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("feed", [(), ("--feed", "live")])
def test_lockstep_without_a_replay_feed_exits_2_with_one_line(tmp_path, feed):
    proc = qf_up(tmp_path, *feed, "--lockstep")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "qf up: --lockstep replays a capture: it needs --feed replay:FILE (the feed is live)"]
    assert proc.stdout == ""  # nothing started


def test_lockstep_refuses_a_speed(tmp_path):
    proc = qf_up(tmp_path, "--feed", f"replay:{SPOT_CAPTURE}", "--speed", "5", "--lockstep")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "qf up: --lockstep runs as fast as the services can: --speed has no meaning with it"]


def test_lockstep_refuses_a_database_that_already_holds_orders(tmp_path):
    """Seeded order ids start over in every lock-step run: they would collide with stored ones."""
    import sqlite3
    db = tmp_path / "qf.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE orders (order_id TEXT)")
        con.execute("INSERT INTO orders VALUES ('o1')")
    proc = qf_up(tmp_path, "--feed", f"replay:{SPOT_CAPTURE}", "--lockstep")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert "needs a database of its own" in line and str(db) in line


def test_the_lockstep_environment(tmp_path):
    env = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="3")
    added = lockstep_env(qfconfig.load(env), env)
    assert added == {"QF_REPLAY_SPEED": "0", "QF_LOCKSTEP": f"ipc://{tmp_path}/run/lockstep.sock", **LOCKSTEP_WAITS}
    cfg = qfconfig.load({**env, **added})  # within the bounds of every setting
    assert (cfg.risk.broker_timeout_ms, cfg.strategy.timeout_ms, cfg.strategy.retries) == (60_000, 60_000, 1)
    assert cfg.md.replay_speed == 0 and cfg.bus.lockstep == added["QF_LOCKSTEP"]


def test_what_the_user_set_stays(tmp_path):
    env = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_LOCKSTEP="tcp://127.0.0.1:7777",
                  QF_STRATEGY_TIMEOUT_MS="20000", QF_STRATEGY_RETRIES="2")
    added = lockstep_env(qfconfig.load(env), env)
    assert added == {"QF_REPLAY_SPEED": "0", "QF_RISK_BROKER_TIMEOUT_MS": "60000"}


def test_a_run_dir_too_long_for_a_unix_socket_gets_a_loopback_port(tmp_path):
    assert lockstep_endpoint(str(tmp_path)) == f"ipc://{tmp_path}/lockstep.sock"
    ep = lockstep_endpoint("/" + "d" * 120)
    assert ep.startswith("tcp://127.0.0.1:") and int(ep.rsplit(":", 1)[1]) > 0


def test_the_status_line_says_lock_step(tmp_path):
    env = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}")
    for lockstep, says in ((False, False), (True, True)):
        settings = {**env, **(lockstep_env(qfconfig.load(env), env) if lockstep else {})}
        monitor = StatusMonitor(qfconfig.load(settings))
        try:
            assert ("lock-step replay" in monitor.line(5, 5)) is says
        finally:
            monitor.close()
