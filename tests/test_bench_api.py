"""bench/api.py's database generator: row counts, exact decimal money text, a file init_db opens (no load here)."""
from __future__ import annotations

import random
import re
import sqlite3
from decimal import Decimal

import pytest

from bench.api import _txt, make_db
from shared import money
from shared.db import FillRow, OrderRow, close_db, init_db

CANONICAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")
MONEY_COLS = {"fills": ("price", "qty", "fee", "mid_at_fill", "decision_mid", "arrival_mid", "slippage_decision",
                        "slippage_arrival"),
              "orders": ("qty", "price", "filled_qty", "avg_price", "decision_mid", "arrival_mid"),
              "equity": ("equity", "cash")}
FILLS = 2000


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("bench-api") / "api.db")
    counts = make_db(path, fills=FILLS, days=1, seed=7)
    close_db()
    return path, counts


def _con(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_row_counts(generated):
    path, counts = generated
    con = _con(path)
    n = {t: con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
         for t in ("fills", "orders", "equity", "signals", "risk_events")}
    assert n["fills"] == counts["fills"] == FILLS
    assert FILLS // 3 <= n["orders"] <= FILLS * 1.3  # one order per 1–3 fills, some that never filled
    assert n["equity"] >= 8640  # one per 10 s over the day, plus one per filled order
    assert n["signals"] == counts["signals"] > 0 and n["risk_events"] == counts["risk_events"] > 0
    statuses = dict(con.execute('SELECT status, COUNT(*) FROM "orders" GROUP BY status'))
    assert set(statuses) <= {"FILLED", "CANCELLED", "REJECTED"} and statuses["FILLED"] > n["orders"] / 2
    assert con.execute('SELECT COUNT(*) FROM "fills" f LEFT JOIN "orders" o USING (order_id) '
                       'WHERE o.order_id IS NULL').fetchone()[0] == 0
    ts = [t for (t,) in con.execute('SELECT ts FROM "fills" ORDER BY rowid')]
    assert ts == sorted(ts)  # stored in time order, as the broker commits them
    assert {k for (k,) in con.execute('SELECT DISTINCT kind FROM "risk_events"')} == {"DENIED", "STATE"}


def test_money_is_exact_decimal_text(generated):
    path, _ = generated
    con = _con(path)
    for table, cols in MONEY_COLS.items():
        for col in cols:
            kinds = {k for (k,) in con.execute(f'SELECT DISTINCT typeof("{col}") FROM "{table}"')}
            assert kinds <= {"text", "null"} and "text" in kinds, (table, col, kinds)
            for (value,) in con.execute(f'SELECT "{col}" FROM "{table}" WHERE "{col}" IS NOT NULL'):
                assert CANONICAL.fullmatch(value), (table, col, value)
    rates = {"MAKER": Decimal("0.0002"), "TAKER": Decimal("0.001")}
    for price, qty, fee, liq in con.execute('SELECT price, qty, fee, liquidity FROM "fills"'):
        assert Decimal(fee) == Decimal(price) * Decimal(qty) * rates[liq]
    fills: dict[str, list] = {}
    for order_id, price, qty in con.execute('SELECT order_id, price, qty FROM "fills"'):
        fills.setdefault(order_id, []).append((Decimal(price), Decimal(qty)))
    for order_id, filled, avg in con.execute('SELECT order_id, filled_qty, avg_price FROM "orders"'):
        slices = fills.get(order_id, [])
        assert Decimal(filled) == sum((q for _, q in slices), Decimal(0))
        assert (None if avg is None else Decimal(avg)) == money.vwap(slices)


def test_opens_with_init_db(generated):
    path, _ = generated
    db = init_db(path)
    try:
        assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert FillRow.select().count() == FILLS
        fill = FillRow.select().order_by(FillRow.ts.desc()).first()
        assert isinstance(fill.price, Decimal) and isinstance(fill.fee, Decimal)
        assert isinstance(OrderRow.get(OrderRow.order_id == fill.order_id).filled_qty, Decimal)
    finally:
        close_db()


def test_same_seed_same_history_and_no_overwrite(generated, tmp_path):
    path, _ = generated
    again = str(tmp_path / "again.db")
    make_db(again, fills=FILLS, days=1, seed=7)
    close_db()
    query = 'SELECT * FROM "fills" ORDER BY rowid'
    assert _con(again).execute(query).fetchall() == _con(path).execute(query).fetchall()
    with pytest.raises(FileExistsError):
        make_db(again, fills=10, days=1)


def test_txt_is_canonical():
    rng = random.Random(3)
    for _ in range(2000):
        units, scale = rng.randint(-10**12, 10**12) // rng.choice((1, 10, 1000)), rng.randint(0, 14)
        assert _txt(units, scale) == money.text(Decimal(units).scaleb(-scale))


def test_the_live_writer_commits_fills_newer_than_every_other(generated, tmp_path):
    import shutil
    from bench.api import LiveWriter
    from tests.conftest import wait_for
    path = str(tmp_path / "live.db")
    shutil.copyfile(generated[0], path)
    newest = _con(path).execute('SELECT MAX(ts) FROM "fills"').fetchone()[0]
    writer = LiveWriter(path, per_s=200)
    writer.start()
    try:
        wait_for(lambda: writer.commits >= 5, 10, "five commits by the live writer")
    finally:
        writer.stop()
    assert writer.error is None and not writer.is_alive()
    con = _con(path)
    rows = con.execute('SELECT fill_id, ts FROM "fills" WHERE ts > ? ORDER BY ts', [newest]).fetchall()
    assert len(rows) == writer.commits and [r[0] for r in rows] == [f"bench-live-{n}" for n in range(len(rows))]
    assert con.execute('SELECT COUNT(*) FROM "fills"').fetchone()[0] == FILLS + writer.commits
