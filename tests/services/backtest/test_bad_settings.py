"""`qf backtest` and `qf parity` on settings and databases they cannot use: one line on stderr, a
URL's password masked, no traceback; exit 2 for bad input, 1 for a database server down now."""
import json
import sqlite3
import subprocess
import sys

import pytest

from bench.common import free_port
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ

ZERO_WEIGHTS = {"QF_STRATEGY_W_OFI": "0", "QF_STRATEGY_W_OFI_L1": "0", "QF_STRATEGY_W_FLOW": "0",
                "QF_STRATEGY_W_DEPTH": "0", "QF_STRATEGY_W_MICRO": "0"}


def qf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                          env={**clean_environ(), **(env or {})}, capture_output=True, text=True, timeout=120)


def one_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qf {command}: "), proc.stderr
    assert "s3cretpw" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize("url", ["postgresql://u:s3cretpw@127.0.0.1:1/db", "postgres://u:s3cretpw@db/qf",
                                 "postgresql://u@127.0.0.1:1/db?password=s3cretpw",
                                 "mysql://u:s3cretpw@127.0.0.1:1/db", "postgresql://u:s3cretpw@[::1/db"])
def test_parity_of_a_database_url_says_it_reads_a_file_without_the_password(url):
    proc = qf("parity", "--db", url, "--capture", SPOT_CAPTURE)
    assert proc.returncode == 2
    line = one_line(proc, "parity")
    assert "reads a SQLite file" in line and "***" in line, line


@pytest.mark.parametrize("url, needle", [
    ("mysql://u:s3cretpw@127.0.0.1:1/db", "mysql:// is not a supported database"),
    ("postgresql://u:s3cretpw@[::1/db", "Invalid IPv6 URL"),
    ("postgresql://u:s3cretpw@127.0.0.1:99999/db", "port"),
    ("postgresql://u@127.0.0.1:1/?password=s3cretpw", "names no database"),
])
def test_backtest_into_a_database_url_it_cannot_use_is_bad_input(tmp_path, url, needle):
    proc = qf("backtest", "--capture", SPOT_CAPTURE, "--db", url)
    assert proc.returncode == 2
    line = one_line(proc, "backtest")
    assert needle in line and "***" in line, line


def test_backtest_into_a_server_that_does_not_answer_exits_1_in_one_line():
    pytest.importorskip("psycopg2")
    port = free_port()  # nothing listens there: the connection is refused at once
    proc = qf("backtest", "--capture", SPOT_CAPTURE, "--db", f"postgresql://u:s3cretpw@127.0.0.1:{port}/db")
    assert proc.returncode == 1  # a later run may find it up
    line = one_line(proc, "backtest")
    assert f"cannot reach the database postgresql://u@127.0.0.1:{port}/db" in line, line


@pytest.mark.parametrize("settings, needle", [
    (ZERO_WEIGHTS, "at least one score weight must be positive"),
    ({"QF_DB": "postgresql://u:s3cretpw@[::1/db"}, "Invalid IPv6 URL"),
    ({"QF_STRATEGY_CANCEL_SCORE": "0.9", "QF_STRATEGY_ENTRY_SCORE": "0.5"}, "QF_STRATEGY_CANCEL_SCORE"),
])
def test_backtest_with_a_refused_configuration_exits_2_in_one_line(tmp_path, settings, needle):
    proc = qf("backtest", "--capture", SPOT_CAPTURE, "--db", str(tmp_path / "bt.db"), env=settings)
    assert proc.returncode == 2
    assert needle in one_line(proc, "backtest")


def paper_db(path, settings: dict[str, str]) -> str:
    """A paper database (this version's tables) whose broker session ran with `settings`."""
    from shared.db import close_db, init_db
    init_db(str(path))
    close_db()
    with sqlite3.connect(path) as con:
        con.execute("INSERT INTO sessions (ts, service, settings) VALUES (1, 'broker', ?)", (json.dumps(settings),))
    return str(path)


def test_parity_of_a_session_with_every_score_weight_zero_exits_2_in_one_line(tmp_path):
    paper = paper_db(tmp_path / "paper.db", ZERO_WEIGHTS)
    proc = qf("parity", "--db", paper, "--capture", SPOT_CAPTURE)
    assert proc.returncode == 2
    assert "at least one score weight must be positive" in one_line(proc, "parity")


@pytest.mark.parametrize("command", ["backtest", "parity"])
def test_a_config_file_that_is_not_utf8_exits_2_in_one_line(tmp_path, command):
    conf = tmp_path / "qf.env"
    conf.write_bytes(b"QF_SYMBOLS=btcusdt\nQF_STRATEGY_NAME=caf\xe9\n")
    db = paper_db(tmp_path / "paper.db", {}) if command == "parity" else str(tmp_path / "bt.db")
    proc = qf(command, "--db", db, "--capture", SPOT_CAPTURE, "--config", str(conf))
    assert proc.returncode == 2
    line = one_line(proc, command)
    assert str(conf) in line and "not UTF-8" in line, line
