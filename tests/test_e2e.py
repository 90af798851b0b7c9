"""The whole pipeline as real OS processes on real sockets, fed by the real capture."""
from __future__ import annotations

import json
import sqlite3
import time
import urllib.request

import pytest

from services.supervisor import Stack, StatusMonitor
from shared import config as qfconfig
from tests.conftest import SPOT_CAPTURE, all_up, clean_environ, ipc_env, running, tcp_env, wait_for

pytestmark = pytest.mark.e2e


def _get(bind: str, path: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(f"http://{bind}{path}", timeout=2) as resp:
            return resp.status, json.loads(resp.read() or b"null") if "json" in resp.headers.get(
                "Content-Type", "") else resp.read().decode()
    except OSError:
        return 0, None


def _db_rows(path: str, sql: str) -> list[tuple]:
    if "://" in path:  # a database server's URL (tests/services/pg)
        from tests import pg
        return pg.rows(path, sql)
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_replay_flows_through_every_service(tmp_path, transport):
    replay_through_every_service(tmp_path, transport)


def replay_through_every_service(tmp_path, transport: str, **extra: str) -> None:
    """The test above, with `extra` QF_ settings over its own (tests/services/pg: QF_DB=postgresql://…)."""
    settings = (tcp_env if transport == "tcp" else ipc_env)(
        tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="20", QF_REPLAY_LOOP="true",
        QF_STRATEGY_COOLDOWN_MS="100", QF_RISK_MAX_POSITION="0.002", **extra)
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    cfg = qfconfig.load(settings)
    stack = Stack(env)
    monitor = StatusMonitor(cfg)
    with running(stack, monitor) as codes:
        bind = cfg.api.bind
        wait_for(lambda: _get(bind, "/health")[0] == 200, 30, "api /health = 200")
        fills = wait_for(lambda: _db_rows(cfg.common.db, "select fill_id, qty, price, fee from fills"), 60,
                         "fills in the database")
        assert all(q and p and f for _, q, p, f in fills)
        orders = _db_rows(cfg.common.db, "select client_order_id, status from orders")
        # the OFI strategy's post-only entries may still rest (PENDING) when the fills are read
        assert orders and {s for _, s in orders} <= {"PENDING", "FILLED", "PARTIALLY_FILLED", "REJECTED", "CANCELLED"}

        # every order the broker saw was approved by risk (the broker is reachable only through it)
        def risk_counts():
            monitor.drain()
            stats = monitor.stats.get("risk", {})
            return stats if stats.get("approved", 0) >= len(orders) else None
        stats = wait_for(risk_counts, 10, "risk heartbeat counting the approved orders")
        assert stats["approved"] >= len(orders)
        # the OFI strategy's heartbeat reaches `qf up`'s status line, and its signals are stored
        wait_for(lambda: monitor.drain() or "strategy" in monitor.stats, 10, "the strategy's heartbeat")
        assert monitor.status["strategy"] == "ok" and " | signals " in monitor.line(5, 5)
        def entry_signals() -> int:
            rows = _db_rows(cfg.common.db, "select count(*) from signals where action = 'entry'")
            return rows[0][0] if rows else 0
        wait_for(entry_signals, 10, "entry signals in the database")

        status, trades = _get(bind, "/api/v1/trades?limit=1000")
        assert status == 200
        api_ids = {t["fill_id"] for t in trades["trades"]} if isinstance(trades, dict) else {t["fill_id"] for t in trades}
        assert {fid for fid, *_ in fills} <= api_ids
        status, positions = _get(bind, "/api/v1/positions")
        assert status == 200 and "BTCUSDT" in json.dumps(positions)
        status, metrics = _get(bind, "/metrics")
        assert status == 200 and "qf_fills_total" in metrics
        all_up(stack)
    assert all(code is not None for code in codes.values())
    assert codes == {name: 0 for name in codes}, codes  # every service stopped cleanly on SIGTERM


def test_supervisor_restarts_a_killed_service(tmp_path):
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="5", QF_REPLAY_LOOP="true")
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    events = []
    stack = Stack(env, services=("broker", "risk"), on_event=events.append)
    try:
        stack.start()
        wait_for(lambda: all(c.running for c in stack.children), 10, "processes to start")
        first_pid = stack.child("broker").proc.pid
        stack.kill("broker")

        def restarted():
            stack.poll()
            c = stack.child("broker")
            return c.restarts == 1 and c.running and c.proc.pid != first_pid
        wait_for(restarted, 20, "the broker to be restarted")
        assert any("broker exited with code -9" in e for e in events), events
        assert any("restarting broker" in e for e in events), events
    finally:
        stack.stop()


@pytest.mark.parametrize("stop_with", ["one SIGTERM", "a storm of signals", "Ctrl-C at a terminal"])
def test_qf_up_runs_everything_and_stops_cleanly_on_sigterm(tmp_path, stop_with):
    """The newcomer's command itself: `qf up --feed replay:…` as a real process, stopped by one
    SIGTERM, by an impatient operator (Ctrl-C pressed again and again, a signal forwarded
    twice): a second signal while `qf up` handled the first once deadlocked it for good; or by
    Ctrl-C at a terminal, which sends SIGINT to the whole process group: the services stop on
    their own at once, and `qf up` must not take that for a crash ("restarting in …")."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    settings = tcp_env(tmp_path, QF_REPLAY_LOOP="true")
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--feed", f"replay:{SPOT_CAPTURE}",
                             "--speed", "20"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: _get(settings["QF_API_BIND"], "/health")[0] == 200, 30, "api /health = 200")
        wait_for(lambda: any("status services 6/6 up" in l and "fills" in l and "| fills -" not in l
                             for l in lines), 40, "a status line with fills")
        if stop_with == "one SIGTERM":
            proc.send_signal(signal.SIGTERM)
        elif stop_with == "Ctrl-C at a terminal":
            os.killpg(proc.pid, signal.SIGINT)
        else:  # every 0.2 ms for a second, so that some land while it is inside its own stop
            storm_until = time.monotonic() + 1.0
            while time.monotonic() < storm_until and proc.poll() is None:
                proc.send_signal(signal.SIGINT if int(time.monotonic() * 1e4) % 2 else signal.SIGTERM)
                time.sleep(0.0002)  # the pace of the storm, not a synchronisation
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        reader.join(10)
    text = "".join(lines)
    assert "starting broker, risk, api, strategy, notifier, marketdata" in text
    assert "stopped: broker=0, risk=0, api=0, strategy=0, notifier=0, marketdata=0" in text, text[-3000:]
    assert "exited with code" not in text and "restarting" not in text, text[-3000:]
    # nothing of the process group is left behind
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError("processes of `qf up` survived it")
