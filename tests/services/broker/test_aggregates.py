"""The broker keeps `positions` and `pnl_days` in its fills' transactions, equal to a rebuild, row for row."""
from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal as D

import pytest

from services.broker import store
from services.broker.core import Account, Order
from services.broker.desk import BrokerDesk, rebuild
from services.broker.keeper import StoreKeeper
from services.broker.service import BrokerService
from shared import aggregates, journal
from shared.aggregates import DAY_NS
from shared.alerts import Alerter
from shared.config import load
from shared.db import FILL_INSERT, PNL_DAY_UPSERT, POSITION_UPSERT, close_db, init_db
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.journal import Journal, journal_path
from shared.messages import Ack, Book, Error, Fill, OrderRequest
from tests.shared.test_aggregates import _tables  # the two tables as rows, by symbol then day

MS = 1_000_000
T0 = 19_950 * DAY_NS + DAY_NS - 60_000 * MS  # a minute before a UTC midnight


def _book(symbol: str, bids, asks, ts: int) -> Book:
    mid = (bids[0][0] + asks[0][0]) / 2
    return Book(ts=ts, symbol=symbol, exch_ts=ts // MS, update_id=ts, bids=bids, asks=asks, mid=mid, spread=0.0,
                spread_bps=0.0, imbalance=0.0, microprice=mid, recv_ts=ts)


def _order(coid: str, qty: str, side: Side = Side.BUY, symbol: str = "BTCUSDT", price: str | None = None,
           tif: TimeInForce = TimeInForce.GTC) -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="t", symbol=symbol, side=side,
                        kind=OrderKind.MARKET if price is None else OrderKind.LIMIT, qty=D(qty),
                        price=None if price is None else D(price), tif=tif)


def _rebuilt(path: str) -> tuple[list, list]:
    """What a from-scratch rebuild makes of the same fills (on a copy of the file: the original stays)."""
    copy = path + ".rebuilt"
    src, dst = sqlite3.connect(path), sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    other = sqlite3.connect(copy)
    other.execute("DELETE FROM positions")  # nothing of the broker's rows is kept
    other.execute("DELETE FROM pnl_days")
    other.commit()
    other.close()
    from shared.db import database
    bound = database.obj
    try:
        init_db(copy)
        aggregates.rebuild()
        close_db()
    finally:
        database.initialize(bound)
    return _tables(copy)


class Desk:
    """The broker's desk as BrokerService builds it (desk.rebuild over the journal and a SQLite file),
    no sockets: replies caught in a list, the clock moved by the test, latency 0."""

    def __init__(self, cfg) -> None:
        self.cfg, self.db = cfg, cfg.common.db
        init_db(self.db)
        self.journal = Journal(journal_path(self.db, cfg.common.run_dir))
        self.stats: dict = {}
        self.keeper = StoreKeeper(self.journal, self.db, Alerter("broker"), self.stats)
        model, account, aggs, known, _ = rebuild(cfg, self.journal)
        self.now = T0
        self.replies: list = []
        self.desk = BrokerDesk(model, account, known, self.keeper, self.stats, lambda: self.now,
                               lambda w, m: self.replies.append(m), lambda evs: None, aggregates=aggs)

    def books(self, btc_bids, btc_asks, eth_bids=((2999.0, 50.0),), eth_asks=((3001.0, 50.0),)) -> None:
        for symbol, bids, asks in (("BTCUSDT", btc_bids, btc_asks), ("ETHUSDT", eth_bids, eth_asks)):
            self.desk.process(self.desk.model.on_book(_book(symbol, [list(b) for b in bids],
                                                            [list(a) for a in asks], self.now), self.now))

    def order(self, req: OrderRequest, ms: int = 1) -> Ack:
        self.now += ms * MS
        self.desk.place(req.client_order_id, req, self.now)
        self.desk.advance(self.now)
        ack = self.replies[-1]
        assert isinstance(ack, Ack), ack
        return ack

    def reload(self) -> None:
        model, account, aggs, known, _ = rebuild(self.cfg, self.journal)
        self.desk.restore(model, account, aggs, known)

    def close(self) -> None:
        self.journal.close()
        close_db()


@pytest.fixture
def desk(cfg):
    d = Desk(cfg)
    try:
        yield d
    finally:
        d.close()


def _trade(d: Desk) -> None:
    """Both symbols; partial closes, a flip through zero, a resting LIMIT filled as maker on a later
    book, a base-asset fee... and a UTC midnight crossed between fills of the same position."""
    d.books([(100.0, 5.0), (99.0, 5.0)], [(100.5, 0.4), (101.0, 0.5), (102.0, 10.0)])
    assert d.order(_order("b1", "1.0")).filled_qty == D("1.0")  # walks three levels: three fills
    d.order(_order("e1", "2", symbol="ETHUSDT"))
    d.order(_order("s1", "0.4", Side.SELL))  # a partial close
    rest = d.order(_order("l1", "0.5", Side.SELL, price="103"))  # rests: nothing fills yet
    assert rest.status is OrderStatus.PENDING
    d.now += 61_000 * MS  # past midnight
    d.books([(103.5, 1.0), (103.0, 5.0)], [(104.0, 5.0)])  # the resting sell fills as maker
    d.order(_order("s2", "2.0", Side.SELL))  # through zero: short 1.9... on spot, as the broker books it
    d.order(_order("b2", "0.7"), ms=10)
    d.order(_order("e2", "3", Side.SELL, symbol="ETHUSDT"))


def test_after_orders_fill_the_tables_equal_a_rebuild_from_the_fills_row_for_row(desk):
    _trade(desk)
    assert desk.keeper.store(force=True)
    positions, days = _tables(desk.db)
    assert [p[0] for p in positions] == ["BTCUSDT", "ETHUSDT"]
    assert {d[0] for d in days} == {T0 // DAY_NS, T0 // DAY_NS + 1}  # two UTC days
    assert (positions, days) == _rebuilt(desk.db)
    assert (positions, days) == desk.desk.aggregates.rows()  # what the desk holds is what is stored
    con = sqlite3.connect(desk.db)
    n, makers = con.execute("SELECT COUNT(*), SUM(liquidity = 'MAKER') FROM fills").fetchone()
    con.close()
    assert sum(p[6] for p in positions) == n and sum(p[14] for p in positions) == makers >= 1
    btc = dict(zip(aggregates.POSITION_COLS, positions[0]))
    assert btc["trips"] >= 1 and D(btc["qty"]) == D("1.0") - D("0.4") - D("0.5") - D("2.0") + D("0.7")


def test_each_record_carries_its_rows_and_storing_it_twice_changes_nothing(desk):
    desk.books([(100.0, 5.0)], [(100.5, 0.4), (101.0, 5.0)])
    desk.order(_order("b1", "1.0"))
    [(seq, stmts)] = desk.journal.pending
    kinds = [k for k, _ in stmts]
    assert kinds.count(FILL_INSERT) == 2 and kinds.count(POSITION_UPSERT) == 1 and kinds.count(PNL_DAY_UPSERT) == 1
    assert kinds.index(POSITION_UPSERT) > max(i for i, k in enumerate(kinds) if k == FILL_INSERT)
    assert desk.keeper.store(force=True)
    stored = _tables(desk.db)
    journal.write([s for s in stmts if s[0] in (POSITION_UPSERT, PNL_DAY_UPSERT)])  # its rows again
    assert _tables(desk.db) == stored
    with pytest.raises(sqlite3.IntegrityError):  # the whole record again: refused whole (its fills are stored)
        journal.store([(seq, stmts)])
    assert _tables(desk.db) == stored
    assert journal.applied_seq() == seq  # and a journal left holding it skips it at catch-up


def test_a_record_the_journal_refuses_leaves_the_aggregates_as_they_were(desk):
    desk.books([(100.0, 5.0)], [(100.5, 5.0)])
    desk.order(_order("b1", "1.0"))
    held, before = desk.desk.aggregates, desk.desk.aggregates.rows()
    good, full = desk.journal.fd, os.open("/dev/full", os.O_WRONLY)
    try:
        desk.journal.fd = full  # every write fails with ENOSPC
        desk.now += MS
        desk.desk.place("b2", _order("b2", "2.0"), desk.now)
        desk.desk.advance(desk.now)
        assert isinstance(desk.replies[-1], Error) and desk.keeper.health.frozen
    finally:
        desk.journal.fd = good
        os.close(full)
    assert desk.desk.aggregates is held and held.rows() == before  # the fill never became durable
    assert desk.keeper.store(force=True)
    desk.reload()  # what the probe does once the journal takes writes again
    assert desk.desk.aggregates.rows() == before == _tables(desk.db)


def _broker(cfg, runner, md_pub, make_book, feed):
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=[[100.0, 5.0]], asks=[[100.5, 0.4], [101.0, 5.0]]), lambda: "BTCUSDT" in svc.books)
    return svc


def _restart(env, cfg, n: int):
    return load({**env, "QF_BROKER_REP": f"{cfg.bus.broker_rep}-{n}", "QF_BROKER_PUB": f"{cfg.bus.broker_pub}-{n}"})


def test_a_broker_finding_a_row_deleted_rebuilds_the_tables_at_start(cfg, env, runner, md_pub, make_book, feed,
                                                                     clients, db_rows, caplog):
    svc = _broker(cfg, runner, md_pub, make_book, feed)
    client = clients(cfg.bus.broker_rep)
    for coid, qty, side in (("a", "1.0", Side.BUY), ("b", "0.3", Side.SELL), ("c", "2", Side.SELL)):
        assert isinstance(client.request(_order(coid, qty, side)), Ack)
    runner.stop(svc)
    stored = _tables(cfg.common.db)
    assert stored == _rebuilt(cfg.common.db) and len(stored[0]) == 1 and stored[0][0][6] == 4
    con = sqlite3.connect(cfg.common.db)
    con.execute("DELETE FROM positions")
    con.commit()
    con.close()
    caplog.set_level(logging.WARNING, logger="qf.broker")
    again = runner.start(BrokerService(_restart(env, cfg, 2)))
    [line] = [r for r in caplog.records if r.getMessage() == "aggregates_rebuilt"]
    assert (line.fills, line.position_fills, line.day_fills) == (4, 0, 4)
    assert _tables(cfg.common.db) == stored
    runner.stop(again)
    caplog.clear()
    runner.start(BrokerService(_restart(env, cfg, 3)))  # the tables agree now: read, not rebuilt
    assert not [r for r in caplog.records if r.getMessage() == "aggregates_rebuilt"]
    assert _tables(cfg.common.db) == stored


def _fill(order: Order, n: int, side: Side, price: str, ts: int) -> Fill:
    return Fill(ts=ts, fill_id=f"{order.order_id}-{n}", order_id=order.order_id,
                client_order_id=order.client_order_id, symbol=order.symbol, side=side, price=D(price),
                qty=D("0.5"), fee=D("0.05"), fee_asset="USDT", liquidity=Liquidity.TAKER, exch_ts=ts // MS)


def test_an_older_database_without_the_tables_rows_is_rebuilt_and_the_broker_goes_on_from_them(
        cfg, env, runner, md_pub, make_book, feed, clients, caplog):
    init_db(cfg.common.db)  # fills written as before issue #15: no positions, no pnl_days rows
    acct = Account(D(10000))
    for i, side in enumerate((Side.BUY, Side.BUY, Side.SELL)):
        o = Order.from_request(_order(f"old{i}", "0.5", side), f"id{i}", T0 + i)
        o.fill(D("100"), D("0.5"), T0 + i)
        acct = store.commit([store.Change(o, True, [_fill(o, 1, side, str(100 + i), T0 + i)])], acct, {})
    close_db()
    assert _tables(cfg.common.db) == ([], [])
    caplog.set_level(logging.WARNING, logger="qf.broker")
    svc = _broker(cfg, runner, md_pub, make_book, feed)
    assert [r.fills for r in caplog.records if r.getMessage() == "aggregates_rebuilt"] == [3]
    assert isinstance(clients(cfg.bus.broker_rep).request(_order("new", "0.2", Side.SELL)), Ack)
    runner.stop(svc)
    positions, days = _tables(cfg.common.db)
    assert (positions, days) == _rebuilt(cfg.common.db)
    assert positions[0][6] == 4 and positions[0][10] == 0 and D(positions[0][1]) == D("0.3")


def test_a_backtest_database_has_the_rows_a_rebuild_makes_of_its_fills(tmp_path):
    """`qf backtest` stores its fills through the broker's statements: the same rows come with them."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    capture = os.path.join(root, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
    db = str(tmp_path / "bt.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    done = subprocess.run([sys.executable, "-m", "services.cli", "backtest", "--capture", capture, "--db", db],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    positions, days = _tables(db)
    assert positions and positions[0][6] > 0
    assert (positions, days) == _rebuilt(db)


def test_order_counts_follow_every_order_through_its_statuses(desk):
    """order_counts (what /api/v1/status shows) equals a count of the orders table after orders
    were placed, filled in parts, filled and cancelled, and is what the desk holds."""
    _trade(desk)
    desk.books([(100.0, 5.0)], [(100.5, 0.4), (101.0, 5.0)])
    desk.order(_order("rest1", "0.3", price="99.0"))  # rests on the book: PENDING
    assert desk.keeper.store(force=True)
    con = sqlite3.connect(desk.db)
    try:
        kept = dict(con.execute("SELECT status, n FROM order_counts WHERE n > 0").fetchall())
        counted = dict(con.execute("SELECT status, COUNT(*) FROM orders GROUP BY status").fetchall())
    finally:
        con.close()
    assert kept == counted and sum(kept.values()) >= 5 and kept.get("PENDING", 0) >= 1
    assert {s: n for s, n in desk.desk.aggregates.orders.n.items() if n} == counted
    assert aggregates.disagreement() is None  # the broker's start would load, not rebuild
