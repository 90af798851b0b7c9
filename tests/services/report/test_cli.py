"""`qf report` end to end: a real SQLite file, a `qf backtest` database, the real API under gunicorn on
loopback and its CSV export; the same bytes on a second run; the README block; the charts against
stored images; every bad input one line on stderr and an exit status, never a traceback.

Set QF_REPORT_UPDATE_EXPECTED=1 to rewrite tests/services/report/expected/ from this run's charts
(then look at them before committing)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.cli import main as qf_main
from tests.conftest import SPOT_CAPTURE, free_port, stop_process

REPO = Path(__file__).resolve().parents[3]
EXPECTED = Path(__file__).parent / "expected"
UPDATE = os.environ.get("QF_REPORT_UPDATE_EXPECTED") == "1"
TOLERANCE = 2.0  # RMS difference allowed, in 0..255 levels (matplotlib.testing.compare)
CHARTS = ("equity.png", "drawdown.png", "pnl_per_trip.png", "pnl_by_hour.png")
START_S = 30.0  # bound on gunicorn's start


def qf(*args: str) -> tuple[int, str, str]:
    """`qf ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = qf_main(list(args))
    return status, out.getvalue(), err.getvalue()


def figures(summary: str) -> dict[str, str]:
    """The summary table's rows: figure → value (not its header)."""
    return {k: v for k, v in re.findall(r"^\| ([^|]+?) \| (.+) \|$", summary, re.M) if k != "Figure"}


def compare(expected: Path, actual: Path) -> None:
    from matplotlib.testing.compare import compare_images

    if UPDATE:
        shutil.copyfile(actual, expected)
        return
    assert expected.exists(), f"no stored image {expected.name}: run with QF_REPORT_UPDATE_EXPECTED=1"
    problem = compare_images(str(expected), str(actual), tol=TOLERANCE)
    assert problem is None, problem


@pytest.fixture(scope="module")
def drawn(history, tmp_path_factory) -> Path:
    """The report of the history, drawn once for the module."""
    out = tmp_path_factory.mktemp("report") / "out"
    status, stdout, stderr = qf("report", "--db", history, "--out", str(out))
    assert (status, stderr) == (0, ""), stderr
    return out


def test_a_database_gives_four_charts_and_the_summary(drawn):
    assert sorted(p.name for p in drawn.iterdir()) == sorted([*CHARTS, "summary.md"])
    rows = figures((drawn / "summary.md").read_text())
    assert rows["Trades"] == "223 round trips (from 600 fills)"
    assert rows["Net P&L"].startswith("-46.25338585 USDT")
    assert rows["Fees"] == "20.02297585 USDT"
    assert rows["Equity"].startswith("10000 → 9953.74661415 USDT")
    assert rows["Win rate"] == "38.1% (85 of 223 round trips)"
    assert rows["Maker share"].startswith("70.3% of fills")
    assert "Sharpe" in rows and "Sortino" in rows and "Max drawdown duration" in rows
    assert rows["Average slippage"].endswith("over 540 fills (against the arrival mid; > 0 a cost)")
    for name in CHARTS:
        data = (drawn / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in data and b"matplotlib" not in data
        assert int.from_bytes(data[16:20], "big") == 800  # README width


@pytest.mark.parametrize("name", CHARTS)
def test_the_charts_match_the_stored_images(drawn, name):
    compare(EXPECTED / name, drawn / name)


def test_a_second_run_changes_no_byte_of_the_files_or_the_readme(history, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# QuantumFlow\n\nIntro.\n\n## Report\n\n", "\n## Next\n\nmore text\n"
    readme.write_text(f"{before}<!-- report:start -->\nplaceholder\n<!-- report:end -->{after}")
    out = tmp_path / "docs" / "report"
    status, stdout, _ = qf("report", "--db", history, "--out", str(out), "--readme", str(readme))
    assert status == 0 and stdout.strip().endswith(f"{readme} updated")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    text = readme.read_text()
    assert text.startswith(before + "<!-- report:start -->\n") and text.endswith("<!-- report:end -->" + after)
    assert "placeholder" not in text and "| Trades | 223 round trips (from 600 fills) |" in text
    assert [f"docs/report/{n}" for n in CHARTS] == re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    status, stdout, _ = qf("report", "--db", history, "--out", str(out), "--readme", str(readme))
    assert status == 0 and "0 of 5 files" in stdout and stdout.strip().endswith("unchanged")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first and readme.read_text() == text


@pytest.mark.parametrize("content, says", [
    ("# no markers\n", "has no <!-- report:start --> marker"),
    ("<!-- report:start -->\n<!-- report:end -->\n<!-- report:end -->\n", "has 2 <!-- report:end --> markers"),
])
def test_a_readme_without_its_markers_is_left_alone(history, tmp_path, content, says):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    status, _, stderr = qf("report", "--db", history, "--out", str(tmp_path / "out"), "--readme", str(readme))
    assert status == 2 and says in stderr and stderr.count("\n") == 1
    assert readme.read_text() == content and not (tmp_path / "out").exists()


def test_an_empty_database_says_no_trades_yet(empty_db, tmp_path):
    status, stdout, stderr = qf("report", "--db", empty_db, "--out", str(tmp_path))
    assert (status, stderr) == (0, "") and "0 round trips from 0 fills, no data yet" in stdout
    rows = figures((tmp_path / "summary.md").read_text())
    assert rows == {"Period": "no data yet", "Trades": "none yet: no fills in this period"}
    compare(EXPECTED / "no_trades.png", tmp_path / "equity.png")
    for name in CHARTS[1:]:  # the same message under each chart's own title
        assert (tmp_path / name).stat().st_size > 3000


def test_a_live_database_is_read_while_the_broker_holds_a_write(history, tmp_path):
    """The report reads a snapshot (WAL): a writer's open transaction neither blocks it nor shows."""
    import sqlite3

    live = tmp_path / "live.db"
    shutil.copyfile(history, live)
    writer = sqlite3.connect(live, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO fills SELECT 'new-' || fill_id, order_id, client_order_id, symbol, side, price, "
                       "qty, fee, fee_asset, liquidity, exch_ts, ts + 1, mid_at_fill, decision_mid, arrival_mid, "
                       "slippage_decision, slippage_arrival, queue_wait_ns FROM fills")
        status, _, stderr = qf("report", "--db", str(live), "--out", str(tmp_path / "out"))
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert (status, stderr) == (0, "")
    assert figures((tmp_path / "out" / "summary.md").read_text())["Trades"] == "223 round trips (from 600 fills)"


def test_a_database_locked_by_another_connection_is_unavailable_now_status_1(history, tmp_path):
    """A rollback-journal file a writer holds exclusively: worth a retry (1), not bad input (2)."""
    import sqlite3

    locked = tmp_path / "locked.db"
    shutil.copyfile(history, locked)
    holder = sqlite3.connect(locked, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode = DELETE")
        holder.execute("BEGIN EXCLUSIVE")
        status, stdout, stderr = qf("report", "--db", str(locked), "--out", str(tmp_path / "out"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (status, stdout) == (1, "") and stderr.count("\n") == 1, stderr
    assert "the database is locked by another connection; try again" in stderr
    assert "not a SQLite database" not in stderr


def test_a_range_reports_only_its_part(history, tmp_path):
    status, _, _ = qf("report", "--db", history, "--out", str(tmp_path), "--from", "2024-07-05",
                      "--to", "2024-07-05T12:00:00Z")
    rows = figures((tmp_path / "summary.md").read_text())
    assert status == 0 and rows["Period"] == "2024-07-05 00:00 UTC to 2024-07-05 12:00 UTC (12 h 0 min)"
    assert int(rows["Trades"].split()[0]) < 223 // 4


def test_a_backtest_database_is_reported_alike(tmp_path):
    db = tmp_path / "bt.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    done = subprocess.run([sys.executable, "-m", "services.cli", "backtest", "--capture", SPOT_CAPTURE, "--db",
                           str(db), "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    status, _, stderr = qf("report", "--db", str(db), "--out", str(tmp_path / "out"))
    rows = figures((tmp_path / "out" / "summary.md").read_text())
    assert (status, stderr) == (0, "")
    assert rows["Trades"] == f"{summary['round_trips']} round trips (from {summary['fills']} fills)"
    assert rows["Fees"] == f"{summary['fees']} USDT"


@pytest.mark.parametrize("make, args, says", [
    (None, ["--db", "{tmp}/missing.db"], "missing.db: no such file"),
    (None, ["--db", "{tmp}"], "is a directory, not a database file"),
    ("text", ["--db", "{tmp}/x"], "x is not a SQLite database"),
    ("sqlite", ["--db", "{tmp}/x"], "is not a QuantumFlow database: it has no fills table"),
    ("text", ["--csv", "{tmp}/x"], "x line 1: not the API's trades CSV (no column fill_id"),
    ("csv_bad_side", ["--csv", "{tmp}/x"], "x line 3: side 'HOLD' is neither BUY nor SELL"),
    ("csv_bad_price", ["--csv", "{tmp}/x"], "x line 2: price '12,5' is not a decimal"),
    ("csv_short", ["--csv", "{tmp}/x"], "x line 2: 3 fields, the header has 18"),
    (None, ["--db", "{tmp}/x", "--from", "yesterday"], "--from 'yesterday': expected ns since the epoch"),
    (None, ["--csv", "{tmp}/x", "--start-cash", "-5"], "--start-cash '-5': expected an amount ≥ 0"),
    (None, ["--api", "ftp://example.org"], "expected an http:// or https:// URL"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, make, args, says):
    target = tmp_path / "x"
    header = "fill_id,order_id,client_order_id,symbol,side,price,qty,fee,fee_asset,liquidity,exch_ts,ts," \
             "mid_at_fill,decision_mid,arrival_mid,slippage_decision,slippage_arrival,queue_wait_ns\n"
    good = "f2,o2,c2,BTCUSDT,SELL,101,1,0.1,USDT,MAKER,1,2000,,,,,,\n"
    if make == "text":
        target.write_text("hello\nworld\n")
    elif make == "sqlite":
        import sqlite3
        with sqlite3.connect(target) as con:
            con.execute("CREATE TABLE t (x)")
    elif make == "csv_bad_side":
        target.write_text(header + good + "f1,o1,c1,BTCUSDT,HOLD,100,1,0.1,USDT,MAKER,1,1000,,,,,,\n")
    elif make == "csv_bad_price":
        target.write_text(header + 'f1,o1,c1,BTCUSDT,BUY,"12,5",1,0.1,USDT,MAKER,1,1000,,,,,,\n')
    elif make == "csv_short":
        target.write_text(header + "f1,o1,c1\n")
    status, stdout, stderr = qf("report", *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "o"))
    assert (status, stdout) == (2, "") and says in stderr, stderr
    assert stderr.startswith("qf report: ") and stderr.count("\n") == 1


def test_the_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "x").write_text("not a database")
    done = subprocess.run([sys.executable, "-m", "services.cli", "report", "--db", str(tmp_path / "x"), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    helped = subprocess.run([sys.executable, "-m", "services.cli", "report", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "<!-- report:start -->" in helped.stdout and "--start-cash" in helped.stdout


# -- the API ----------------------------------------------------------------------------------

def _start_api(tmp: Path, db: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update({"QF_DB": db, "QF_API_BIND": f"127.0.0.1:{port}", "QF_API_WORKERS": "1",
                "QF_RUN_DIR": str(tmp / "run"), "QF_LOG_LEVEL": "WARNING", "QF_SHABBAT_PAUSE": "false"})
    log = open(tmp / "api.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while True:
        try:
            with urllib.request.urlopen(base + "/health/live", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise AssertionError(f"the API did not start:\n{(tmp / 'api.log').read_text()[-2000:]}")
        time.sleep(0.05)  # polling interval of a bounded wait


@pytest.fixture(scope="module")
def api(history, tmp_path_factory):
    """The real API (gunicorn, one worker) serving the history on a free loopback port."""
    tmp = tmp_path_factory.mktemp("api")
    proc, base = _start_api(tmp, history)
    try:
        yield base
    finally:
        assert stop_process(proc) == 0


def _export_csv(base: str, path: Path) -> int:
    """Every page of /api/v1/trades?format=csv appended to `path` (as a workflow would). Pages fetched."""
    cursor, pages = None, 0
    with open(path, "wb") as f:
        while True:
            url = f"{base}/api/v1/trades?format=csv&limit=250" + (f"&cursor={cursor}" if cursor else "")
            with urllib.request.urlopen(url, timeout=10) as resp:
                f.write(resp.read())
                cursor = resp.headers.get("X-Next-Cursor")
            pages += 1
            if not cursor:
                return pages


def test_the_api_and_its_csv_export_give_the_databases_figures(api, drawn, tmp_path):
    want = figures((drawn / "summary.md").read_text())
    status, _, stderr = qf("report", "--api", api, "--out", str(tmp_path / "api"))
    assert (status, stderr) == (0, "")
    from_api = figures((tmp_path / "api" / "summary.md").read_text())
    assert api not in (tmp_path / "api" / "summary.md").read_text()  # the address stays out of a README
    export = tmp_path / "trades.csv"
    assert _export_csv(api, export) == 3
    status, _, stderr = qf("report", "--csv", str(export), "--out", str(tmp_path / "csv"), "--start-cash", "10000")
    assert (status, stderr) == (0, "")
    from_csv = figures((tmp_path / "csv" / "summary.md").read_text())
    for row in ("Trades", "Net P&L", "Fees", "Win rate", "Profit factor", "Average slippage", "Maker share"):
        assert from_api[row] == from_csv[row] == want[row], row
    assert from_api["Sharpe"] == want["Sharpe"]  # hourly closes: the API's 1-minute buckets keep each hour's last
    assert from_csv["Risk states"].startswith("not in this source") and "Risk states" not in from_api


class _Guarded(BaseHTTPRequestHandler):
    """A server in front of an API that wants a bearer token (as a proxy would): 401 without it;
    with it, one fill; under /html, a web page instead of the API."""
    token = "s3cret"
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.headers.get("Authorization", ""))
        if self.path.startswith("/html/"):
            return self._send(200, "text/html", b"<html>not an API</html>")
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(401, "application/json",
                              b'{"error": {"code": "unauthorized", "message": "this endpoint needs a token"}}')
        if self.path.startswith("/api/v1/trades"):
            return self._send(200, "text/csv", b"fill_id,symbol,side,price,qty,fee,fee_asset,liquidity,ts\n"
                                               b"f1,BTCUSDT,BUY,100,1,0.1,USDT,TAKER,1720051200000000000\n")
        answers = {"/api/v1/pnl": {"equity": None}, "/api/v1/equity": {"points": []}, "/api/v1/risk": {"events": []}}
        return self._send(200, "application/json", json.dumps(answers[self.path.split("?")[0]]).encode())

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def guarded():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Guarded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Guarded.seen.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_token_is_sent_as_a_bearer_header_and_a_401_says_so(guarded, tmp_path):
    status, _, stderr = qf("report", "--api", guarded, "--out", str(tmp_path / "a"))
    assert status == 2 and "401 unauthorized: this endpoint needs a token (give --token" in stderr
    status, stdout, stderr = qf("report", "--api", guarded, "--token", "s3cret", "--out", str(tmp_path / "b"))
    assert (status, stderr) == (0, "") and stdout.startswith("0 round trips from 1 fills")
    assert set(_Guarded.seen[-3:]) == {"Bearer s3cret"}
    status, _, stderr = qf("report", "--api", guarded + "/html", "--out", str(tmp_path / "c"))
    assert status == 2 and "not the API's trades CSV" in stderr


def test_an_api_that_fails_or_cannot_be_reached_is_status_1(tmp_path):
    proc, base = _start_api(tmp_path, str(tmp_path / "missing.db"))  # answers 503 db_missing
    try:
        status, _, stderr = qf("report", "--api", base, "--out", str(tmp_path / "o"))
    finally:
        stop_process(proc)
    assert status == 1 and "/api/v1/trades: the API answered 503 db_missing" in stderr
    status, _, stderr = qf("report", "--api", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "o"))
    assert status == 1 and "cannot reach the API" in stderr and stderr.count("\n") == 1
