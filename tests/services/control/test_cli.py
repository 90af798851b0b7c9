"""The control layer (services/control) and its terminal front end, `qf status|positions|trades|
halt|resume|flatten`, as real processes: on a database `qf backtest` made from the shipped capture
(the same answers as the REST API's), and against a real risk service on tcp (HALT, RESUME,
FLATTEN stored as risk's state changes), a silent risk, a missing database and bad input."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from decimal import Decimal

import pytest

from services.api.app import create_app
from services.control import Control
from services.risk.service import RiskService
from shared.config import load
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, free_port

EMPTY_ENV = {"QF_SHABBAT_PAUSE": "false"}


def qf(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env={**clean_environ(), **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def backtest_db(tmp_path_factory) -> str:
    db = str(tmp_path_factory.mktemp("control") / "bt.db")
    done = qf("backtest", "--capture", SPOT_CAPTURE, "--db", db, env={}, timeout=300)
    assert done.returncode == 0, done.stderr
    return db


def test_status_positions_and_trades_read_like_a_person_would_want(backtest_db):
    env = {**EMPTY_ENV, "QF_DB": backtest_db}
    status = qf("status", env=env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "trading   ACTIVE" and lines[1].startswith("services  none heard within ")
    assert lines[2] == "pause     off (QF_SHABBAT_PAUSE=false)"
    assert lines[3].startswith("equity    9995.") and "fills     35; orders: filled 34, cancelled 80" in lines
    assert lines[-1] == "positions flat"
    positions = qf("positions", env=env)
    assert positions.returncode == 0 and positions.stdout.splitlines()[1].split()[:2] == ["BTCUSDT", "0"]
    trades = qf("trades", "--limit", "3", env=env)
    rows = trades.stdout.splitlines()
    assert trades.returncode == 0 and rows[0].startswith("time (UTC)") and len(rows) == 4
    assert rows[1].split()[3:5] == ["BTCUSDT", "SELL"]


def test_a_reader_that_stops_early_ends_it_quietly_and_an_unknown_symbol_is_named(backtest_db):
    env = {**clean_environ(), **EMPTY_ENV, "QF_DB": backtest_db}
    done = subprocess.run(f"{sys.executable} -m services.cli trades --limit 1000 | head -1", shell=True, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("time (UTC)") and done.stderr == "", done.stderr  # no BrokenPipeError
    none = qf("trades", "--symbol", "ethusdt", env={**EMPTY_ENV, "QF_DB": backtest_db})
    assert (none.returncode, none.stdout) == (0, "no fills of ETHUSDT\n")


def test_the_json_is_the_rest_apis_answer(backtest_db):
    env = {**EMPTY_ENV, "QF_DB": backtest_db}
    api = create_app(load(env)).test_client()
    for args, path in ((("positions", "--json"), "/api/v1/positions"),
                       (("trades", "--json", "--limit", "50"), "/api/v1/trades?limit=50"),
                       (("positions", "--json", "--symbol", "btcusdt"), "/api/v1/positions?symbol=btcusdt")):
        done = qf(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == api.get(path).get_json(), args
    status = json.loads(qf("status", "--json", env=env).stdout)
    expected = api.get("/api/v1/status").get_json()
    assert {k: v for k, v in status.items() if k != "ts"} == {k: v for k, v in expected.items() if k != "ts"}


def test_pnl_sums_the_positions(backtest_db):
    ctl = Control(load({**EMPTY_ENV, "QF_DB": backtest_db}))
    pnl = ctl.pnl()
    assert pnl["net_realized"] == pnl["realized"] - pnl["fees"] and pnl["symbols"] == 1
    with sqlite3.connect(backtest_db) as con:
        fees = sum(Decimal(f) for (f,) in con.execute("SELECT fee FROM fills"))
    assert pnl["fees"] == fees and pnl["net_realized"] < 0  # the capture loses its fees


@pytest.fixture
def risk_env(tmp_path):
    env = {**EMPTY_ENV, "QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
           "QF_RISK_REP": f"tcp://127.0.0.1:{free_port()}", "QF_RISK_PUB": f"tcp://127.0.0.1:{free_port()}",
           "QF_BROKER_REP": f"tcp://127.0.0.1:{free_port()}", "QF_BROKER_PUB": f"tcp://127.0.0.1:{free_port()}",
           "QF_MD_PUB": f"tcp://127.0.0.1:{free_port()}", "QF_RISK_CONTROL_TIMEOUT_MS": "2000"}
    svc = RiskService(load(env))
    thread = threading.Thread(target=svc.run, name="risk", daemon=True)
    thread.start()
    try:
        yield env
    finally:
        svc.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_halt_resume_and_flatten_go_through_risk_and_are_stored(risk_env):
    halt = qf("halt", "--reason", "deploy", "--by", "ops", env=risk_env)
    assert halt.returncode == 0, halt.stderr
    assert halt.stdout.splitlines()[0] == "risk: HALTED — deploy" and halt.stdout.splitlines()[-1] == "positions flat"
    again = qf("halt", "--reason", "deploy", env=risk_env, timeout=30)
    assert again.stdout.startswith("risk: HALTED (unchanged)")
    flatten = json.loads(qf("flatten", "--reason", "wind down", "--json", env=risk_env).stdout)
    assert flatten["state"] == "REDUCING" and flatten["detail"]["flatten"] == []
    resume = qf("resume", "--reason", "done", env=risk_env)
    assert resume.returncode == 0 and resume.stdout.startswith("risk: ACTIVE — done")
    with sqlite3.connect(risk_env["QF_DB"]) as con:
        rows = con.execute("SELECT code, state, text FROM risk_events WHERE kind = 'STATE' ORDER BY id").fetchall()
    assert [(c, s) for c, s, _ in rows] == [("HALT", "HALTED"), ("FLATTEN", "REDUCING"), ("RESUME", "ACTIVE")]
    assert rows[0][2] == "deploy [by ops]" and rows[2][2].startswith("done [by qf:")


def test_a_silent_risk_a_missing_database_and_bad_input_are_one_line_each(tmp_path):
    env = {**EMPTY_ENV, "QF_DB": str(tmp_path / "none.db"), "QF_RISK_REP": f"tcp://127.0.0.1:{free_port()}",
           "QF_RISK_CONTROL_TIMEOUT_MS": "200"}
    silent = qf("halt", "--reason", "x", env=env)
    assert silent.returncode == 1 and silent.stdout == ""
    assert silent.stderr.strip() == ("qf: risk is not answering: risk did not answer within 200 ms "
                                     "(is the stack running? QF_RISK_REP)")
    missing = qf("status", env=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("qf: the database cannot be read: the database file does not exist")
    zero = qf("trades", "--limit", "0", env=env)
    assert zero.returncode == 2 and zero.stderr == "qf: --limit must be between 1 and 1000, not 0\n"
    bad = qf("status", env={**env, "QF_NOPE": "1"})
    assert bad.returncode == 2 and "unknown setting QF_NOPE" in bad.stderr and bad.stderr.count("\n") == 1
    assert qf("halt", env=env).returncode == 2  # --reason is required
    for reason in ("", "   ", "r" * 501):  # the REST API's rule: risk is not asked
        blank = qf("resume", "--reason", reason, env=env)
        assert (blank.returncode, blank.stdout) == (2, "")
        assert blank.stderr == "qf: reason must be a non-empty string of at most 500 characters\n"
    for symbol in ("", "btc/usdt", "../../etc", "é", "x" * 21):
        odd = qf("trades", "--symbol", symbol, env=env)
        assert odd.returncode == 2 and "is not a symbol: 1 to 20 letters or digits" in odd.stderr, odd.stderr
    assert not os.path.exists(tmp_path / "none.db")  # a reader never creates the database


def test_an_empty_file_or_another_programs_database_is_one_line_not_a_traceback(tmp_path):
    empty, other = tmp_path / "empty.db", tmp_path / "other.db"
    empty.write_bytes(b"")  # the broker made the file and not yet its tables
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE fills (x)")  # not ours: its columns must not be read as values
    con.execute("INSERT INTO fills VALUES (1)")
    con.commit()
    con.close()
    for db in (empty, other):
        for command in ("status", "positions", "trades"):
            done = qf(command, env={**EMPTY_ENV, "QF_DB": str(db), "QF_HEARTBEAT_MS": "100"})
            assert done.returncode == 1 and done.stdout == "", (db, command, done.stdout)
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
            assert done.stderr.startswith("qf: the database cannot be read: it is not a QuantumFlow database, "
                                          "or the broker has not set it up yet (it has no "), done.stderr


def test_status_names_each_services_heartbeat_and_each_feed(backtest_db):
    """`qf status` with the stack beating (real PUB sockets on TCP, as the services publish):
    each service's heartbeat age, the broker's own status when not ok, each symbol's feed."""
    from tests.services.api.conftest import Beats
    endpoints = {f"QF_{k}_PUB": f"tcp://127.0.0.1:{free_port()}" for k in ("MD", "BROKER", "RISK", "STRATEGY")}
    env = {**EMPTY_ENV, "QF_DB": backtest_db, "QF_SYMBOLS": "BTCUSDT,ETHUSDT", **endpoints}
    beats = Beats(load(env))
    done = threading.Event()

    def beat():  # the services' heartbeats, until `qf status` has answered
        while not done.wait(0.05):
            beats.beat(services=("marketdata", "strategy", "risk"), symbols={"BTCUSDT": "SYNCED", "ETHUSDT": "SYNCING"})
            beats.beat(services=("broker",), status="store_unavailable")
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        status = qf("status", env=env)
    finally:
        done.set()
        thread.join(5)
        beats.close()
    assert status.returncode == 0, status.stderr
    services = next(line for line in status.stdout.splitlines() if line.startswith("services  "))
    for name in ("marketdata", "strategy", "risk", "broker"):
        assert f" {name} 0." in services or f" {name} 1." in services, services  # heard, fresh
    assert "broker" in services and "(store_unavailable)" in services and "STALE" not in services
    assert "feeds     BTCUSDT SYNCED, ETHUSDT SYNCING" in status.stdout.splitlines()
