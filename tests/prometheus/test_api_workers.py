"""The API's /metrics under real gunicorn with two workers: every answer carries the same trading
figures, those of the database, before and after the database changes (the figures are read from
SQLite per scrape, never kept in a worker's memory)."""
from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from prometheus_client.parser import text_string_to_metric_families

from shared import aggregates
from shared.db import EquitySnapshot, FillRow, OrderRow, close_db, database, init_db
from tests.conftest import ROOT, clean_environ, free_port, wait_for

ROUNDS = 24  # scrapes per check, 4 at a time: they land on whichever worker is free
START_S, STOP_S = 30.0, 10.0


def figures(base: str) -> tuple:
    """One scrape's qf_* samples as a sorted tuple of (name, labels, value)."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return tuple(sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                        for fam in text_string_to_metric_families(text) for s in fam.samples
                        if s.name.startswith("qf_")))


def every_answer(base: str) -> set[tuple]:
    with ThreadPoolExecutor(4) as pool:
        return set(pool.map(lambda _: figures(base), range(ROUNDS)))


def add_fill(db, n: int, side: str, qty: str, price: str, equity: str) -> None:
    with db.bind_ctx([FillRow, OrderRow, EquitySnapshot]):
        FillRow.create(fill_id=f"f{n}", order_id=f"o{n}", client_order_id=f"c{n}", symbol="BTCUSDT", side=side,
                       price=Decimal(price), qty=Decimal(qty), fee=Decimal(0), fee_asset="USDT", liquidity="TAKER",
                       exch_ts=n, ts=1_700_000_000_000_000_000 + n)
        OrderRow.create(order_id=f"o{n}", client_order_id=f"c{n}", strategy="test", symbol="BTCUSDT", side=side,
                        kind="MARKET", tif="GTC", qty=Decimal(qty), status="FILLED", filled_qty=Decimal(qty),
                        created_ts=n, updated_ts=n)
        EquitySnapshot.create(ts=1_700_000_000_000_000_000 + n, equity=Decimal(equity), cash=Decimal(equity))
    database.initialize(db)
    aggregates.rebuild()  # the rows the broker keeps beside its fills and orders


def value(answer: tuple, name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    (v,) = [v for n, ls, v in answer if n == name and ls == want]
    return v


def test_two_gunicorn_workers_give_the_database_figures(tmp_path):
    path = tmp_path / "qf.db"
    db = init_db(str(path))
    add_fill(db, 1, "BUY", "0.002", "60000", "10000")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**clean_environ(), "QF_DB": str(path), "QF_API_BIND": f"127.0.0.1:{port}", "QF_API_WORKERS": "2",
           "QF_RUN_DIR": str(tmp_path / "run"), "QF_SHABBAT_PAUSE": "false", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"api exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(base + "/health/live", timeout=2) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
        wait_for(healthy, START_S, "the api to answer /health/live", step=0.05)

        (first,) = every_answer(base)  # one set of figures from every worker
        assert value(first, "qf_fills_total") == 1
        assert value(first, "qf_orders", status="FILLED") == 1
        assert value(first, "qf_position", symbol="BTCUSDT") == 0.002
        assert value(first, "qf_equity") == 10000

        add_fill(db, 2, "SELL", "0.0005", "61000", "10000.5")
        (second,) = every_answer(base)  # and every worker sees the database change
        assert value(second, "qf_fills_total") == 2
        assert value(second, "qf_orders", status="FILLED") == 2
        assert value(second, "qf_position", symbol="BTCUSDT") == 0.0015
        assert value(second, "qf_equity") == 10000.5
    finally:
        db.close()
        close_db()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_S)
    assert proc.returncode == 0, log.read_text()
