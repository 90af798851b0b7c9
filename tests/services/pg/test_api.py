"""The API over PostgreSQL answers what it answers over SQLite: the same backtest written to both, every read endpoint compared."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from services.api.app import create_app
from shared import aggregates
from shared.config import load
from shared.db import EquitySnapshot, RiskEvent, close_db, database, init_db, insert_rows
from tests import pg
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ

pytestmark = pytest.mark.e2e

HOUR_NS = 3600 * 10**9


def _backtest(db: str) -> None:
    """`qf backtest` of the spot capture into `db` (its orders, fills, equity, signals, aggregates)."""
    done = subprocess.run([sys.executable, "-m", "services.cli", "backtest", "--capture", SPOT_CAPTURE, "--db", db,
                           "--json"], cwd=ROOT, env=clean_environ(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _more_rows(db: str, first_ts: int) -> None:
    """What a backtest of ten minutes lacks: equity over three days (irregular, distinct times,
    a drawdown), denials and state changes; the aggregates rebuilt as the broker would."""
    init_db(db)
    try:
        rows, equity = [], 10_000
        for i in range(400):
            equity += (-1) ** (i // 37) * (i % 11) * 0.37
            rows.append(dict(ts=first_ts - 3 * 24 * HOUR_NS + i * 647_000_000_123, equity=f"{equity:.8f}",
                             cash=f"{equity / 2:.8f}", note="periodic"))
        events = [dict(ts=first_ts - HOUR_NS + i * 10**9, kind="DENIED" if i % 4 else "STATE",
                       code=("MAX_POSITION", "PRICE_BAND", "STALE_BOOK")[i % 3], text=f"reason {i} [by api]",
                       client_order_id=f"c{i}", symbol="BTCUSDT", state=("ACTIVE", "HALTED")[i % 2])
                  for i in range(30)]
        with database.atomic():
            insert_rows(EquitySnapshot, rows)
            insert_rows(RiskEvent, events)
        aggregates.rebuild()
    finally:
        close_db()


@pytest.fixture(scope="module")
def twins(pg_server, tmp_path_factory):
    """(sqlite path, postgresql url, now): the same data in both."""
    sqlite = str(tmp_path_factory.mktemp("api") / "qf.db")
    url = pg_server.create_database()
    for db in (sqlite, url):
        _backtest(db)
    first = pg.rows(url, 'SELECT MIN("ts") FROM "fills"')[0][0]
    for db in (sqlite, url):
        _more_rows(db, first)
    last = pg.rows(url, 'SELECT MAX("ts") FROM "equity"')[0][0]
    yield sqlite, url, last + HOUR_NS
    pg_server.drop_database(url)


def _client(db: str, now: int, tmp_path):
    cfg = load({"QF_DB": db, "QF_RUN_DIR": str(tmp_path / "run"), "QF_SHABBAT_PAUSE": "false",
                **{f"QF_{k}_PUB": f"inproc://qf-{uuid.uuid4().hex[:8]}-{k.lower()}"
                   for k in ("MD", "BROKER", "RISK", "STRATEGY")}})
    return create_app(cfg, clock=lambda: now).test_client()


def _pages(client, path: str, key: str) -> list[dict]:
    """Every row of a paginated endpoint, following next_cursor (small pages: many cursors)."""
    out, cursor = [], None
    for _ in range(1000):
        sep = "&" if "?" in path else "?"
        resp = client.get(path + (f"{sep}cursor={cursor}" if cursor else ""))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
        out += body[key]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination did not end")


def _close(a, b, path=""):
    """a == b, floats within 1e-9 relative (SQLite's and PostgreSQL's text-to-double may differ in the last bit)."""
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)), (path, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (path, sorted(a.keys() ^ b.keys()))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


SINGLE = ["/api/v1/status", "/api/v1/positions", "/api/v1/positions?symbol=btcusdt", "/api/v1/pnl",
          "/api/v1/stats", "/api/v1/risk?window=86400&limit=20",
          "/api/v1/trades?limit=1000", "/api/v1/orders?limit=1000", "/api/v1/signals?limit=1000"]
PAGED = [("/api/v1/trades?limit=4", "trades"), ("/api/v1/trades?limit=3&side=BUY&symbol=BTCUSDT", "trades"),
         ("/api/v1/orders?limit=7", "orders"), ("/api/v1/orders?limit=5&status=FILLED", "orders"),
         ("/api/v1/signals?limit=50", "signals")]


def test_every_read_endpoint_answers_over_postgresql_as_over_sqlite(twins, tmp_path):
    sqlite, url, now = twins
    lite, server = _client(sqlite, now, tmp_path), _client(url, now, tmp_path)
    assert server.get("/health").get_json()["db"] == "ok"
    first = lite.get("/api/v1/trades?limit=1000").get_json()["trades"][-1]["ts"]
    ranges = [f"/api/v1/equity?interval={i}&from={first - 4 * 24 * HOUR_NS}&to={now}" for i in ("1m", "1h", "auto")]
    ranges += [f"/api/v1/stats?from={first - 2 * 24 * HOUR_NS}&to={now}", f"/api/v1/stats?from={first}"]
    for path in SINGLE + ranges:
        a, b = lite.get(path), server.get(path)
        assert (a.status_code, b.status_code) == (200, 200), (path, b.get_data(as_text=True)[:500])
        _close(a.get_json(), b.get_json(), path)
    for path, key in PAGED:
        a, b = _pages(lite, path, key), _pages(server, path, key)
        assert a, path
        _close(a, b, path)
    # not vacuous: the data is there, and the curve has buckets, a Sharpe and a drawdown
    stats = server.get("/api/v1/stats").get_json()
    assert stats["fills"] == 35 and stats["equity"]["hourly_closes"] > 24 and stats["equity"]["max_drawdown"] > 0
    assert len(server.get(ranges[1]).get_json()["points"]) > 24
    assert server.get("/api/v1/risk?window=86400&limit=20").get_json()["denials"]
    metrics_a, metrics_b = lite.get("/metrics").get_data(as_text=True), server.get("/metrics").get_data(as_text=True)
    assert _figures(metrics_a) == _figures(metrics_b) and "qf_fills_total 35.0" in metrics_b


def _figures(text: str) -> list[str]:
    """The Prometheus lines about trading (not the process's own)."""
    return sorted(line for line in text.splitlines() if line.startswith("qf_") and "scrape" not in line)


def test_the_api_never_writes_a_postgresql_database(twins, tmp_path):
    """Its session is read-only, as SQLite's mode=ro: a write through its connection is refused."""
    _, url, now = twins
    client = _client(url, now, tmp_path)
    assert client.get("/api/v1/status").status_code == 200
    db = client.application.extensions["qf_db"].db
    with pytest.raises(Exception, match="read-only transaction"):
        db.execute_sql('DELETE FROM "fills"')
    db.close()
    assert json.dumps(client.get("/api/v1/stats").get_json())


def test_a_restarted_server_is_served_again_from_the_next_request(twins, pg_server, tmp_path):
    _, url, now = twins
    client = _client(url, now, tmp_path)
    assert client.get("/api/v1/positions").status_code == 200
    pg_server.restart()  # the API's connection is dropped by the server
    first = client.get("/api/v1/positions")
    assert first.status_code in (200, 503), first.get_data(as_text=True)
    if first.status_code == 503:  # the request that found the connection dead; its answer says so
        assert first.get_json()["error"]["code"] == "db_unavailable"
    assert client.get("/api/v1/positions").status_code == 200
    assert pg_server.password not in first.get_data(as_text=True)


def _risk_rebuilt(db: str, tmp_path) -> dict[str, str]:
    """`qf risk` started on `db`: its `rebuilt` log line as key=value pairs (then stopped)."""
    from tests.conftest import stop_process, tcp_env, wait_for
    from tests.docker.stack import parse_kv
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**clean_environ(), **tcp_env(tmp_path, QF_DB=db), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "risk.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "risk"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        line = wait_for(lambda: next((l for l in log.read_text().splitlines() if "event=rebuilt" in l), None)
                        or proc.poll() is not None, 60, "risk's rebuilt line")
        assert isinstance(line, str), log.read_text()[-3000:]
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]
    return parse_kv(line)


def test_risk_rebuilds_the_same_state_from_postgresql_as_from_sqlite(twins, pg_server, tmp_path):
    """Positions, balances, peak and day-start equity, the trading state and the checkpoint that
    `qf backtest` left, read back by risk at start from either database (copies of the twins:
    risk's start writes a checkpoint)."""
    sqlite, url, _ = twins
    (tmp_path / "lite").mkdir()
    lite_db = shutil.copy(sqlite, tmp_path / "lite" / "qf.db")
    if os.path.exists(sqlite + "-wal"):  # what a reader still holds open may not be checkpointed yet
        shutil.copy(sqlite + "-wal", str(lite_db) + "-wal")
    url = pg_server.clone_database(url)
    try:
        lite = _risk_rebuilt(str(lite_db), tmp_path / "lite")
        server = _risk_rebuilt(url, tmp_path / "server")
    finally:
        pg_server.drop_database(url)
    keys = ("fills", "working", "state", "checkpoint", "positions", "balances", "peak_equity", "day_start_equity")
    assert {k: server.get(k) for k in keys} == {k: lite.get(k) for k in keys}
    assert server["fills"] == "35" and server["checkpoint"] == "True" and "BTCUSDT" in server["positions"]


def test_the_all_time_equity_scan_streams_through_a_server_side_cursor(pg_url):
    """The first all-time /stats reads every equity row: on PostgreSQL through a named cursor, in
    batches, never the whole result in the client's memory at once."""
    from services.control import queries
    from services.control.dbreader import ReadOnlyDatabase
    from shared import db as sdb
    writer = sdb.open_url(pg_url)
    sdb.database.initialize(writer)
    sdb._create_server_schema(writer)
    writer.execute_sql("INSERT INTO equity (ts, equity, cash, note) "
                       "SELECT g::bigint * 1000000000, '100.5', '100', 'periodic' FROM generate_series(1, 2500) g")
    writer.close()
    ReadOnlyDatabase(pg_url).ensure()
    seen = []
    for batch in queries._batches('SELECT "id", "ts" FROM "equity" ORDER BY "ts"', (), size=1000):
        seen.append(len(batch))
        open_cursors = sdb.database.execute_sql("SELECT name FROM pg_cursors").fetchall()
        assert open_cursors == [("qf_stream",)]  # the rows come from the server as they are read
    assert seen == [1000, 1000, 500]
    assert sdb.database.execute_sql("SELECT count(*) FROM pg_cursors").fetchone() == (0,)
