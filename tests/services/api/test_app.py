"""API views over a real SQLite file: trades, exact average-cost positions, metrics, JSON errors."""
from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from services.control import dbreader, queries
from shared import aggregates
from services.api.app import create_app
from shared.config import load
from tests.services.api.conftest import all_beating


def db_state(client) -> str:
    """/health's database part ("ok" or "error"; the rest of the stack is not running here)."""
    return client.get("/health").get_json()["db"]


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.is_json
    body = resp.get_json()["error"]
    assert body["code"] and body["message"]
    return body


def test_health_reports_a_working_database(client, beats):
    all_beating(client.application, beats)
    resp = client.get("/health")
    body = resp.get_json()
    assert (resp.status_code, body["status"], body["db"], body["problems"]) == (200, "ok", "ok", [])
    assert set(body["services"]) == {"marketdata", "strategy", "risk", "broker"}
    assert all(s["fresh"] and s["status"] == "ok" and 0 <= s["age_s"] < 1 for s in body["services"].values())
    assert body["feeds"] == {"BTCUSDT": {"state": "SYNCED", "detail": "", "synced": True}}


def test_health_is_503_and_views_say_so_when_the_database_cannot_be_opened(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where the database directory should be")
    cfg = load({"QF_DB": str(tmp_path / "not-a-dir" / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run")})
    client = create_app(cfg).test_client()
    resp = client.get("/health")
    body = resp.get_json()
    assert (resp.status_code, body["status"], body["db"]) == (503, "error", "error")
    assert error_of(resp, 503)["code"] == "db_unreadable"  # the health body names the problem too
    assert error_of(client.get("/api/v1/trades"), 503)["code"] == "db_unreadable"


def test_a_database_that_fails_mid_run_is_503_not_500(client, db):
    assert db_state(client) == "ok"  # opened, tables created
    db.execute_sql("DROP TABLE fills")
    db.execute_sql("DROP TABLE positions")
    assert db_state(client) == "error"
    assert error_of(client.get("/api/v1/positions"), 503)["code"] == "db_unavailable"
    assert error_of(client.get("/metrics"), 503)["code"] == "db_unavailable"


def test_trades_newest_first_with_decimal_strings(client, add_fill):
    add_fill("BTCUSDT", "BUY", "0.00200000", "61837.63000000", fee="0.12367526", ts=1_000)
    add_fill("ETHUSDT", "BUY", "0.5", "2000.1", ts=2_000)
    add_fill("BTCUSDT", "SELL", "0.001", "61900.01", ts=3_000)
    body = client.get("/api/v1/trades").get_json()
    assert body["count"] == 3
    assert [t["ts"] for t in body["trades"]] == [3_000, 2_000, 1_000]
    oldest = body["trades"][-1]
    assert (oldest["price"], oldest["qty"], oldest["fee"]) == ("61837.63", "0.002", "0.12367526")
    assert (oldest["symbol"], oldest["side"], oldest["fee_asset"], oldest["liquidity"]) == (
        "BTCUSDT", "BUY", "USDT", "TAKER")
    assert set(oldest) >= {"fill_id", "order_id", "client_order_id", "exch_ts"}


def test_trades_filters_by_symbol_since_and_limit(client, add_fill):
    for i in range(105):
        add_fill("BTCUSDT" if i % 2 else "ETHUSDT", "BUY", "1", "10", ts=1_000 + i)
    assert client.get("/api/v1/trades").get_json()["count"] == 100  # the default limit
    btc = client.get("/api/v1/trades?symbol=btcusdt&limit=1000").get_json()["trades"]
    assert len(btc) == 52 and {t["symbol"] for t in btc} == {"BTCUSDT"}
    recent = client.get("/api/v1/trades?since=1100").get_json()["trades"]
    assert [t["ts"] for t in recent] == [1_104, 1_103, 1_102, 1_101, 1_100]
    assert len(client.get("/api/v1/trades?limit=3&symbol=ETHUSDT").get_json()["trades"]) == 3


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "limit=", "limit=-1", "since=-5",
                                   "since=1.5", "symbol=BTC-USDT", "symbol=", "limt=5"])
def test_bad_trade_params_are_400_json(client, query):
    body = error_of(client.get(f"/api/v1/trades?{query}"), 400)
    assert body["code"] == "bad_param"


def test_unknown_path_and_wrong_method_are_json(client):
    assert error_of(client.get("/api/v1/nope"), 404)["code"] == "not_found"
    assert error_of(client.post("/api/v1/trades"), 405)["code"] == "method_not_allowed"


def test_positions_are_exact_from_the_fills(client, add_fill):
    # buy 0.002 @ 100 (fee 0.0002), sell 0.001 @ 110 (fee 0.00011):
    # left 0.001 at cost 0.1, realized (110 - 100) × 0.001 = 0.01, fees 0.00031
    add_fill("BTCUSDT", "BUY", "0.00200000", "100.00000000", fee="0.00020000")
    add_fill("BTCUSDT", "SELL", "0.001", "110", fee="0.00011")
    # a round trip that loses: (1999.9 - 2000.1) × 0.5 = -0.1
    add_fill("ETHUSDT", "BUY", "0.5", "2000.1", fee="1.00005")
    add_fill("ETHUSDT", "SELL", "0.5", "1999.9", fee="0.99995")
    body = client.get("/api/v1/positions").get_json()
    btc, eth = body["positions"]
    assert btc == {"symbol": "BTCUSDT", "qty": "0.001", "avg_entry_price": "100", "cost_basis": "0.1",
                   "realized_pnl": "0.01", "fees": {"USDT": "0.00031"}, "net_realized_pnl": "0.00969",
                   "unrealized_pnl": "0.01",  # 0.001 held at cost 0.1, marked at the last fill, 110
                   "last_price": "110", "fills": 2}
    assert (eth["qty"], eth["avg_entry_price"], eth["realized_pnl"], eth["fees"], eth["net_realized_pnl"]) == (
        "0", None, "-0.1", {"USDT": "2"}, "-2.1")
    only = client.get("/api/v1/positions?symbol=ethusdt").get_json()["positions"]
    assert [p["symbol"] for p in only] == ["ETHUSDT"]


def test_average_cost_of_the_open_quantity(client, add_fill):
    add_fill("BTCUSDT", "BUY", "1", "100")
    add_fill("BTCUSDT", "BUY", "2", "130")  # 3 at an average of 120
    add_fill("BTCUSDT", "SELL", "1.5", "120")  # closes 1.5 at the average: nothing realized
    (pos,) = client.get("/api/v1/positions").get_json()["positions"]
    assert (pos["qty"], pos["cost_basis"], pos["avg_entry_price"], pos["realized_pnl"]) == (
        "1.5", "180", "120", "0")


def test_metrics_are_prometheus_text_from_the_database(client, add_fill, add_order, add_equity):
    add_fill("BTCUSDT", "BUY", "0.002", "100")
    add_fill("BTCUSDT", "SELL", "0.001", "110")
    add_order("FILLED")
    add_order("FILLED")
    add_order("REJECTED")
    add_equity(1, "10000", "10000")
    add_equity(2, "10000.01", "9999.91")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(resp.get_data(as_text=True)) for s in fam.samples}
    assert samples[("qf_fills_total", ())] == 2
    assert samples[("qf_orders", (("status", "FILLED"),))] == 2
    assert samples[("qf_orders", (("status", "REJECTED"),))] == 1
    assert samples[("qf_orders", (("status", "PENDING"),))] == 0
    assert samples[("qf_equity", ())] == pytest.approx(10000.01)
    assert samples[("qf_position", (("symbol", "BTCUSDT"),))] == pytest.approx(0.001)
    assert samples[("qf_realized_pnl", (("symbol", "BTCUSDT"),))] == pytest.approx(0.01)


def test_status_summarises_orders_equity_and_positions(client, add_fill, add_order, add_equity):
    add_fill("BTCUSDT", "BUY", "0.002", "100")
    add_order("FILLED")
    add_equity(5, "10000.5", "9999.8")
    body = client.get("/api/v1/status").get_json()
    assert body["fills"] == 1 and body["orders"]["FILLED"] == 1 and body["orders"]["CANCELLED"] == 0
    assert body["equity"] == {"ts": 5, "equity": "10000.5", "cash": "9999.8", "note": ""}
    assert body["positions"] == {"BTCUSDT": "0.002"}


def test_empty_database_gives_empty_answers(client):
    assert client.get("/api/v1/trades").get_json() == {"trades": [], "count": 0, "next_cursor": None}
    assert client.get("/api/v1/positions").get_json() == {"positions": []}
    assert client.get("/api/v1/status").get_json()["equity"] is None


# -- property: positions equal a brute-force average-cost ledger of exact fractions ----------

UNIT = Decimal("0.001")
fill_seqs = st.lists(st.tuples(st.sampled_from(["BUY", "SELL"]), st.integers(1, 12),  # qty in UNITs
                               st.integers(1, 500_000).map(lambda c: Decimal(c) / 100),  # price, 2 dp
                               st.integers(0, 999).map(lambda c: Decimal(c) / 10**6)),  # fee
                     max_size=40)


def brute_force(fills):
    """Position, cost, realized P&L at the average cost, fees, as Fractions: no rounding anywhere."""
    qty = cost = realized = fees = Fraction(0)
    for side, units, price, fee in fills:
        q, p = Fraction(units * UNIT), Fraction(price)
        sign = 1 if side == "BUY" else -1
        if qty and (qty > 0) != (sign > 0):
            closing = min(q, abs(qty))
            avg = cost / qty
            realized += closing * (p - avg) * (1 if qty > 0 else -1)
            cost -= avg * closing * (1 if qty > 0 else -1)
            qty += sign * closing
            q -= closing
        qty += sign * q
        cost += sign * q * p
        fees += Fraction(fee)
    return qty, cost, realized, fees


@settings(max_examples=300, deadline=None)
@given(fill_seqs)
def test_positions_equal_a_brute_force_ledger(fills):
    rows = [("BTCUSDT", side, units * UNIT, price, fee, "USDT") for side, units, price, fee in fills]
    pos = queries.positions_from(rows).get("BTCUSDT", queries.Position("BTCUSDT"))
    qty, cost, realized, fees = brute_force(fills)
    assert pos.qty == qty and pos.fees == fees
    # the only rounding is the cost share of a partial close, to 1e-12, once per fill
    assert abs(Fraction(pos.realized) - realized) <= Fraction(len(fills), 2 * 10**12)
    assert abs(Fraction(pos.cost) - cost) <= Fraction(len(fills), 2 * 10**12)
    assert pos.last_price == (fills[-1][2] if fills else None)
    # the cash ledger balances exactly: what was paid and received = realized P&L - open cost
    cash = sum((-(u * UNIT) * p if s == "BUY" else u * UNIT * p for s, u, p, _ in fills), Decimal(0))
    assert cash == pos.realized - pos.cost


# -- issue #11: the API reads the broker's database, never creates it, follows it being replaced ---

def _fresh_db(path, fills: list[tuple[str, str, str, str]]) -> None:
    """A database file at `path` (made elsewhere, as a restore would) holding `fills`
    (fill_id, symbol, qty, price), checkpointed and closed: nothing left in a WAL."""
    import sqlite3

    from shared.db import FillRow, close_db, init_db
    made = init_db(str(path))
    with made.bind_ctx([FillRow]):
        for n, (fid, symbol, qty, price) in enumerate(fills):
            FillRow.create(fill_id=fid, order_id=f"o-{fid}", client_order_id=f"c-{fid}", symbol=symbol,
                           side="BUY", price=Decimal(price), qty=Decimal(qty), fee=Decimal(0), fee_asset="USDT",
                           liquidity="TAKER", exch_ts=n, ts=1_000 + n)
    aggregates.rebuild()  # the rows the broker keeps beside its fills
    made.close()
    close_db()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _remove_db(path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def _fill_ids(client) -> list[str]:
    resp = client.get("/api/v1/trades")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return sorted(t["fill_id"] for t in resp.get_json()["trades"])


def test_a_missing_database_is_503_and_is_never_created(tmp_path):
    target = tmp_path / "data" / "qf.db"
    cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
    app = create_app(cfg)
    client = app.test_client()
    resp = client.get("/health")
    body = resp.get_json()
    assert (resp.status_code, body["status"], body["db"]) == (503, "error", "error")
    assert body["error"]["code"] == "db_missing" and "broker" in body["error"]["message"]
    for path in ("/api/v1/trades", "/api/v1/positions", "/api/v1/status", "/metrics"):
        assert error_of(client.get(path), 503)["code"] == "db_missing", path
    assert not (tmp_path / "data").exists()  # neither the file nor its directory

    _fresh_db(tmp_path / "made-by-broker.db", [("f1", "BTCUSDT", "0.001", "100")])
    target.parent.mkdir()
    os.replace(tmp_path / "made-by-broker.db", target)
    assert db_state(client) == "ok"  # the next request finds it: no restart needed
    assert _fill_ids(client) == ["f1"]
    app.extensions["qf_db"].close()


def test_the_api_never_writes_the_database(tmp_path):
    target = tmp_path / "qf.db"
    target.write_bytes(b"")  # the broker created the file and has not made its tables yet
    cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
    app = create_app(cfg)
    client = app.test_client()
    assert error_of(client.get("/api/v1/trades"), 503)["code"] == "db_unavailable"
    assert db_state(client) == "error"
    app.extensions["qf_db"].close()
    assert target.read_bytes() == b""  # no tables made behind the broker's back


def test_another_programs_database_is_503_not_rows_made_of_its_column_names(tmp_path):
    # SQLite reads a double-quoted column a table lacks as a string literal: without a schema check
    # another program's `fills(x)` was served as a 200 fill whose price was "price".
    target = tmp_path / "other.db"
    with closing(sqlite3.connect(target, isolation_level=None)) as con:
        con.execute("CREATE TABLE fills (x)")
        con.execute("INSERT INTO fills VALUES (1)")
    cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
    app = create_app(cfg)
    client = app.test_client()
    for path in ("/api/v1/trades", "/api/v1/trades?format=csv", "/api/v1/orders", "/api/v1/status", "/health"):
        body = error_of(client.get(path), 503)
        assert body["code"] == "db_unavailable" and "not a QuantumFlow database" in body["message"], path
    _remove_db(target)
    _fresh_db(tmp_path / "ours.db", [("f1", "BTCUSDT", "0.001", "100")])
    with closing(sqlite3.connect(tmp_path / "ours.db", isolation_level=None)) as con:
        con.execute('ALTER TABLE fills DROP COLUMN "fee"')  # one of ours, a column short
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.replace(tmp_path / "ours.db", target)
    body = error_of(client.get("/api/v1/trades"), 503)
    assert body["code"] == "db_unavailable" and "fills table has no fee column" in body["message"]
    _fresh_db(tmp_path / "whole.db", [("f1", "BTCUSDT", "0.001", "100")])
    os.replace(tmp_path / "whole.db", target)
    assert _fill_ids(client) == ["f1"]
    app.extensions["qf_db"].close()


def test_a_database_locked_by_another_connection_is_unavailable_not_unreadable(tmp_path, monkeypatch):
    _fresh_db(tmp_path / "made.db", [("f1", "BTCUSDT", "0.001", "100")])
    target = tmp_path / "qf.db"
    shutil.copy(tmp_path / "made.db", target)  # checkpointed: the file alone holds it all
    holder = sqlite3.connect(target, isolation_level=None)
    holder.execute("PRAGMA journal_mode = DELETE")  # WAL readers never wait: a rollback journal's do
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setitem(dbreader.READ_PRAGMAS, "busy_timeout", 50)  # not a real reader's 5 s wait
    try:
        cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
        app = create_app(cfg)
        body = error_of(app.test_client().get("/api/v1/trades"), 503)
        assert body["code"] == "db_unavailable" and "locked by another connection" in body["message"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _fill_ids(app.test_client()) == ["f1"]
    app.extensions["qf_db"].close()


def test_a_database_deleted_while_running_is_503_at_once_and_200_when_restored(tmp_path):
    target = tmp_path / "qf.db"
    _fresh_db(target, [("f1", "BTCUSDT", "0.001", "100")])
    cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
    app = create_app(cfg)
    client = app.test_client()
    assert _fill_ids(client) == ["f1"]
    _remove_db(target)  # the connection still holds the unlinked file: it must not be served
    assert error_of(client.get("/api/v1/trades"), 503)["code"] == "db_missing"
    assert error_of(client.get("/health"), 503)["code"] == "db_missing"
    _fresh_db(tmp_path / "backup.db", [("f1", "BTCUSDT", "0.001", "100"), ("f2", "ETHUSDT", "1", "2000")])
    os.replace(tmp_path / "backup.db", target)
    assert db_state(client) == "ok"
    assert _fill_ids(client) == ["f1", "f2"]
    app.extensions["qf_db"].close()


def test_a_database_replaced_while_running_is_followed(tmp_path):
    target = tmp_path / "qf.db"
    _fresh_db(target, [("old1", "BTCUSDT", "0.001", "100")])
    cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
    app = create_app(cfg)
    client = app.test_client()
    assert _fill_ids(client) == ["old1"]
    _fresh_db(tmp_path / "other.db", [("new1", "ETHUSDT", "2", "1999.5"), ("new2", "ETHUSDT", "1", "2001")])
    os.replace(tmp_path / "other.db", target)  # atomically, while the API holds the old file open
    assert _fill_ids(client) == ["new1", "new2"]
    (pos,) = client.get("/api/v1/positions").get_json()["positions"]
    assert (pos["symbol"], pos["qty"]) == ("ETHUSDT", "3")
    target.write_bytes(b"this is not a database" * 100)  # replaced in place by garbage: same inode
    assert client.get("/api/v1/trades").status_code == 503
    os.remove(target)
    target.write_bytes(b"not a database either" * 100)  # a new file, not SQLite
    assert error_of(client.get("/api/v1/trades"), 503)["code"] == "db_unreadable"
    app.extensions["qf_db"].close()


@pytest.mark.parametrize("query", ["limit=1&limit=2", "symbol=BTCUSDT&symbol=ETHUSDT", "since=1&since=1"])
def test_a_parameter_given_twice_is_400(client, query):
    assert "more than once" in error_of(client.get(f"/api/v1/trades?{query}"), 400)["message"]


def test_unknown_parameters_are_named_briefly(client):
    query = "&".join(f"p{i}={'x' * 100}" for i in range(50)) + "&" + "q" * 500 + "=1"
    message = error_of(client.get(f"/api/v1/trades?{query}"), 400)["message"]
    assert "and 46 more" in message and len(message) < 400


def test_a_database_rewritten_in_place_is_read_afresh_after_a_failed_query(tmp_path):
    """Same inode, new content (a restore by `cp` over the file): a query that fails drops the
    connection, so the next request opens the file as it is now instead of failing for ever."""
    target = tmp_path / "qf.db"
    _fresh_db(target, [("old1", "BTCUSDT", "0.001", "100")])
    _fresh_db(tmp_path / "restored.db", [("new1", "ETHUSDT", "1", "2000")])
    cfg = load({"QF_DB": str(target), "QF_RUN_DIR": str(tmp_path / "run")})
    app = create_app(cfg)
    client = app.test_client()
    assert _fill_ids(client) == ["old1"]
    inode = target.stat().st_ino
    with open(target, "r+b") as f:  # garbage over the header, in place
        f.write(b"\0" * 4096)
    assert client.get("/api/v1/trades").status_code == 503
    with open(target, "r+b") as f:  # then a good database, in place
        f.truncate(0)
        f.write((tmp_path / "restored.db").read_bytes())
    assert target.stat().st_ino == inode
    assert _fill_ids(client) == ["new1"]
    app.extensions["qf_db"].close()


def test_a_database_path_that_is_a_directory_is_503_unreadable(tmp_path):
    (tmp_path / "qf.db").mkdir()
    app = create_app(load({"QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run")}))
    client = app.test_client()
    assert error_of(client.get("/api/v1/status"), 503)["code"] == "db_unreadable"
    assert error_of(client.get("/health"), 503)["code"] == "db_unreadable"


def test_error_bodies_never_carry_a_urls_password():
    from services.api.errors import error_body
    body = error_body("db_unavailable", "cannot reach postgresql://qf:Zz9-pw@db/qf?password=Yy8")
    assert "Zz9-pw" not in str(body) and "Yy8" not in str(body) and "qf:***@db" in str(body)


def test_positions_show_fees_per_asset_and_a_base_fee_comes_off_the_quantity(client, add_fill):
    """QF_BROKER_FEE_ASSET=received: a BUY's fee is paid in BTC out of what it received, a SELL's in
    USDT. The position holds 0.999 (not 1) at the BUY's whole cost; each fee shows under its asset."""
    add_fill("BTCUSDT", "BUY", "1", "100", fee="0.001", fee_asset="BTC")
    (pos,) = client.get("/api/v1/positions").get_json()["positions"]
    assert (pos["qty"], pos["cost_basis"], pos["avg_entry_price"], pos["fees"]) == (
        "0.999", "100", "100.1001001", {"BTC": "0.001"})
    add_fill("BTCUSDT", "SELL", "0.999", "110", fee="0.10989", fee_asset="USDT")
    (pos,) = client.get("/api/v1/positions").get_json()["positions"]
    assert (pos["qty"], pos["realized_pnl"], pos["fees"], pos["net_realized_pnl"]) == (
        "0", "9.89", {"USDT": "0.10989", "BTC": "0.001"}, "9.78011")  # 0.999 × 110 − 100, less the USDT fee
    status = client.get("/api/v1/status").get_json()
    assert status["positions"] == {"BTCUSDT": "0"}
