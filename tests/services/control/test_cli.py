"""The control layer (services/control) and its terminal front end, `qf status|positions|trades|
halt|resume|flatten`, as real processes: on a database `qf backtest` made from the shipped capture
(the same answers as the REST API's), and against a real risk service on tcp (HALT, RESUME,
FLATTEN stored as risk's state changes), a silent risk, a missing database and bad input."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import unicodedata
from decimal import Decimal

import pytest

from services.api.app import create_app
from services.control.cli import FEE_PLACES
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


def cells(line: str) -> list[tuple[int, int, str]]:
    """(first column, end column, text) on a terminal of each cell of a table line: runs of text
    two or more spaces apart; a wide character (east Asian width W/F: most emoji) takes two columns."""
    def width(text: str) -> int:
        return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return [(width(line[:m.start()]), width(line[:m.end()]), m.group()) for m in re.finditer(r"\S+(?: \S+)*", line)]


NUMERIC = ("qty", "price", "fee", "fill")


def check_trades_table(stdout: str, db: str) -> list[dict]:
    """The `qf trades` table read back: the header's columns, numbers right-aligned under their header
    and the rest left-aligned, each amount column with one number of decimals (the most any of its
    values needs; fees at least 2), every amount equal to the stored one exactly, and each fill's
    number its fill id's. Returns the rows as {column: text}."""
    header, *lines = stdout.splitlines()
    head = cells(header)
    names = [t for _, _, t in head]
    assert names == ["time (UTC)", "symbol", "side", "qty", "price", "fee", "asset", "liquidity", "order", "fill"]
    rows = []
    for line in lines:
        got = cells(line)
        assert len(got) == len(head), line
        for (hs, he, name), (s, e, _) in zip(head, got):
            if name in NUMERIC:
                assert e == he, f"{name} not right-aligned: {line!r}"
            else:
                assert s == hs, f"{name} not left-aligned: {line!r}"
        rows.append({name: text for (_, _, name), (_, _, text) in zip(head, got)})
    with sqlite3.connect(db) as con:
        stored = con.execute("SELECT fill_id, qty, price, fee, fee_asset, symbol, client_order_id FROM fills "
                             "ORDER BY ts DESC, fill_id DESC LIMIT ?", (len(rows),)).fetchall()
    assert len(stored) == len(rows)
    for row, (fill_id, qty, price, fee, asset, symbol, coid) in zip(rows, stored):
        assert (Decimal(row["qty"]), Decimal(row["price"]), Decimal(row["fee"])) == (
            Decimal(qty), Decimal(price), Decimal(fee)), row  # exact: nothing rounded
        shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in symbol)
        assert (row["asset"], row["symbol"], row["order"]) == (asset, shown, coid)
        assert row["fill"] == "#" + fill_id.rsplit("-", 1)[1]
    fee_least = max(FEE_PLACES.get(r["asset"], 8) for r in rows)  # USDT to the cent, BNB or BTC to 1e-8
    for name, least in (("qty", 0), ("price", 0), ("fee", fee_least)):
        places = {len(r[name].partition(".")[2]) for r in rows}
        assert len(places) == 1, f"{name}: decimals vary {places}"
        needed = max(max(0, -Decimal(r[name]).normalize().as_tuple().exponent) for r in rows)
        assert places == {max(needed, least)}, name  # no more zeros than needed
    return rows


def test_the_trades_table_lines_up_and_every_number_is_the_stored_one(backtest_db):
    done = qf("trades", "--limit", "1000", env={**EMPTY_ENV, "QF_DB": backtest_db})
    assert done.returncode == 0, done.stderr
    rows = check_trades_table(done.stdout, backtest_db)
    assert len(rows) == 35 and {len(r["price"].partition(".")[2]) for r in rows} == {2}
    assert any(r["price"].endswith(".00") for r in rows)  # 61626 shows as 61626.00, under 61626.01
    two = [r for r in rows if r["order"] == "ofi-r0-65"]  # a market order that walked two levels
    assert [r["fill"] for r in two] == ["#2", "#1"]


def test_partial_fills_odd_fees_and_a_wide_symbol_still_read_well(backtest_db, tmp_path):
    """What the tester saw: a fee with 13 decimals, prices 61664 / 61669.9 / 61689.91, three partial
    fills of one order in one second, and an emoji in a symbol; a control character is escaped."""
    db = str(tmp_path / "odd.db")
    with sqlite3.connect(backtest_db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with sqlite3.connect(db) as con:
        (last,) = con.execute("SELECT max(ts) FROM fills").fetchone()
        cols = ("fill_id", "order_id", "client_order_id", "symbol", "side", "price", "qty", "fee", "fee_asset",
                "liquidity", "exch_ts", "ts")
        odd = [("feed-1", "feed", "ofi-r0-18", "BTCUSDT", "BUY", "61691.99", "0.00009", "0.0029327383214", "USDT",
                "MAKER", 1, last + 1),
               ("feed-2", "feed", "ofi-r0-18", "BTCUSDT", "BUY", "61691.99", "0.00009", "0.005552279", "USDT",
                "MAKER", 1, last + 1),
               ("feed-3", "feed", "ofi-r0-18", "BTCUSDT", "BUY", "61691.99", "0.00009", "0.01", "USDT", "MAKER", 1,
                last + 1),
               ("beef-1", "beef", "x-1", "BTC\U0001F680USDT", "SELL", "61664", "1.5", "0.00000001", "BNB", "TAKER",
                1, last + 2),
               ("cafe-1", "cafe", "x-2", "ETH\x1b[31mUSDT", "SELL", "61669.9", "0.00001", "0", "USDT", "TAKER", 1,
                last + 3),
               ("dead-1", "dead", "x-3", "BTCUSDT", "BUY", "61689.91", "12", "1", "USDT", "TAKER", 1, last + 4)]
        con.executemany(f"INSERT INTO fills ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", odd)
    done = qf("trades", "--limit", "8", env={**EMPTY_ENV, "QF_DB": db})
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "ETH\\x1b[31mUSDT" in done.stdout  # escaped, shown as text
    header, *lines = done.stdout.splitlines()
    rows = check_trades_table(done.stdout, db)
    assert [r["price"] for r in rows[:6]] == ["61689.91", "61669.90", "61664.00", "61691.99", "61691.99", "61691.99"]
    assert [r["fee"] for r in rows[:6]] == ["1.0000000000000", "0.0000000000000", "0.0000000100000",
                                            "0.0100000000000", "0.0055522790000", "0.0029327383214"]
    assert [r["qty"] for r in rows[:3]] == ["12.00000", "0.00001", "1.50000"]
    partial = [(r["order"], r["qty"], r["fill"]) for r in rows[3:6]]
    assert partial == [("ofi-r0-18", "0.00009", "#3"), ("ofi-r0-18", "0.00009", "#2"), ("ofi-r0-18", "0.00009", "#1")]
    assert len(set(lines[3:6])) == 3  # no two lines alike
    assert rows[2]["symbol"] == "BTC\U0001F680USDT"


def test_amount_columns_are_exact_with_one_number_of_decimals():
    from hypothesis import given, settings, strategies as st

    from services.control.cli import _column

    amounts = st.one_of(
        st.decimals(allow_nan=False, allow_infinity=False, min_value=-10**15, max_value=10**15)
        .filter(lambda d: d.as_tuple().exponent >= -12),
        *(st.decimals(min_value=0, max_value=10**6, places=p) for p in (0, 2, 5, 8, 12)))  # trailing zeros kept

    @settings(max_examples=300, deadline=None)
    @given(values=st.lists(amounts, min_size=1, max_size=20), least=st.integers(0, 8))
    def check(values, least):
        shown = _column(values, least)
        assert [Decimal(s) for s in shown] == values  # equal: not a digit rounded away
        places = {len(s.partition(".")[2]) for s in shown}
        needed = max(max(0, -v.normalize().as_tuple().exponent) if v else 0 for v in values)
        assert places == {max(needed, least)}
    check()


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
