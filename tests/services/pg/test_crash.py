"""kill -9 the broker 20 times with its journal storing into PostgreSQL: nothing told is ever lost, nothing stored twice."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.broker.replay import market_events
from shared.config import load
from shared.db import close_db, init_db
from shared.journal import journal_path, recover
from tests import pg
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, stop_process, tcp_env, wait_for
from tests.services.broker.test_crash import START_CASH, Listener, OrderFlow, Replay, check_rows, kill_nine_times

pytestmark = pytest.mark.e2e


def test_kill_9_twenty_times_on_postgresql_loses_nothing_anyone_was_told(tmp_path, pg_url):
    """tests/services/broker/test_crash.py with QF_DB on the server: after each kill, what the dead
    broker's journal (in QF_RUN_DIR: a server has no file to keep it beside) holds is stored as the
    next process would, then every fill told is in the `fills` table once, unchanged, and orders,
    fills and the cash of the last equity snapshot agree."""
    run_dir = tmp_path / "run"
    recovered = []

    def check(url: str, told: dict[str, dict]) -> int:
        init_db(url, create=False)
        try:
            done = recover(journal_path(url, str(run_dir)), wait_s=0)
            assert done["journal"] == "recovered", done  # no broker holds it
            recovered.append(done["journal_records"])
        finally:
            close_db()
        return check_rows(lambda sql: pg.rows(url, sql), told)

    kill_nine_times(tmp_path, check, QF_DB=pg_url, QF_RUN_DIR=str(run_dir))
    assert len(recovered) == 21, recovered
    # the aggregates the broker keeps agree with the fills after all that (the next start rebuilds
    # them if not, and says so: here they must not need it)
    stored = pg.rows(pg_url, 'SELECT COUNT(*) FROM "fills"')[0][0]
    assert pg.rows(pg_url, 'SELECT "fills" FROM "positions"') == [(stored,)]


def test_a_server_restarted_under_a_running_broker_loses_nothing_it_told(tmp_path, pg_server, pg_url):
    """The database server goes away three times while orders flow (pg_ctl restart: every
    connection dropped). The broker keeps what it tells in its journal, sees the store fail
    (alert STORE_UNAVAILABLE), probes until the server is back, reconnects and stores it all;
    stopped cleanly at the end, every fill told is in the table once."""
    settings = tcp_env(tmp_path, QF_DB=pg_url, QF_SYMBOLS="btcusdt", QF_BROKER_LATENCY_MODE="constant",
                       QF_BROKER_LATENCY_MS="2", QF_HEARTBEAT_MS="50", QF_START_CASH=str(START_CASH),
                       QF_LOG_LEVEL="WARNING")
    cfg = load(settings)
    env = {**clean_environ(), **settings, "PYTHONPATH": ROOT}
    replay, listener = Replay(cfg.bus.md_pub, list(market_events(SPOT_CAPTURE, "BTCUSDT"))), Listener(cfg.bus.broker_pub)
    flow = OrderFlow(cfg.bus.broker_rep, replay, seed=11)
    log = tmp_path / "broker.log"
    replay.start()
    listener.start()
    proc = None
    try:
        wait_for(lambda: replay.last_book is not None, 10, "the replay")
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.cli", "broker"], env=env, cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: listener.pid == proc.pid or proc.poll() is not None, 30, "the broker's heartbeat")
        flow.start()
        for _ in range(3):
            answered = len(flow.acks)
            wait_for(lambda: len(flow.acks) > answered + 20 or flow.error, 20, "orders answered")
            pg_server.restart()
        answered = len(flow.acks)
        wait_for(lambda: len(flow.acks) > answered + 20 or flow.error, 30, "orders answered after the last restart")
        assert flow.error is None, flow.error

        def stored_again() -> bool:  # the last restart's outage over too, before the stop
            text = log.read_text()
            return text.count("event=store_recovered") == text.count("event=store_unavailable") >= 1
        wait_for(stored_again, 30, "the broker to store again after the last restart")
        flow.stop.set()
        flow.join(10)
        assert stop_process(proc) == 0 and proc.poll() is not None
    finally:
        flow.stop.set()
        replay.stop.set()
        listener.stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for t in (flow, replay, listener):
            if t.is_alive():
                t.join(10)
    told = {fid: f.to_wire() for fid, f in listener.fills.items()}
    for ack in flow.acks.values():
        told.update((f.fill_id, f.to_wire()) for f in ack.fills)
    assert len(told) > 50
    assert not os.path.getsize(journal_path(pg_url, settings["QF_RUN_DIR"]))  # all of it stored at the stop
    assert check_rows(lambda sql: pg.rows(pg_url, sql), told) >= len(told)
    text = log.read_text()
    # not vacuous: the broker met the restarts (its store failed: an outage), and came back from each
    assert text.count("event=store_recovered") == text.count("event=store_unavailable") >= 1, text[-3000:]
    assert pg_server.password not in text and pg.quote(pg_server.password, safe="") not in text
