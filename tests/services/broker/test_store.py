"""The broker's commit on a real SQLite file: all or nothing, and rows peewee reads back exactly."""
from __future__ import annotations

from decimal import Decimal as D

import pytest

from services.broker import store
from services.broker.core import Account, Order
from shared.db import FILL_COLS, ORDER_COLS, EquitySnapshot, FillRow, OrderRow, close_db, database, init_db
from shared.enums import Liquidity, OrderKind, OrderStatus, Side
from shared.messages import Fill, OrderRequest


@pytest.fixture
def db(tmp_path):
    init_db(str(tmp_path / "store.db"))
    try:
        yield database
    finally:
        close_db()


def _order(coid: str) -> Order:
    req = OrderRequest(ts=1, client_order_id=coid, strategy="s", symbol="BTCUSDT", side=Side.BUY,
                       kind=OrderKind.MARKET, qty=D("0.5"))
    return Order.from_request(req, f"id-{coid}", 10)


def _fill(order: Order, n: int) -> Fill:
    return Fill(ts=20 + n, fill_id=f"f-{order.client_order_id}-{n}", order_id=order.order_id,
                client_order_id=order.client_order_id, symbol="BTCUSDT", side=Side.BUY, price=D("100.10"),
                qty=D("0.25"), fee=D("0.0250250"), fee_asset="USDT", liquidity=Liquidity.TAKER, exch_ts=5)


def test_commit_writes_order_fills_and_snapshot_exactly(db):
    order = _order("a")
    order.status = OrderStatus.FILLED
    acct = store.commit([store.Change(order, True, [_fill(order, 0), _fill(order, 1)])], Account(D(1000)),
                        {"BTCUSDT": D("100")})
    assert acct.cash == D(1000) - D("50.050") - D("0.0500500")  # 2 × 0.25 × 100.10, and two fees
    row = OrderRow.get(OrderRow.client_order_id == "a")
    assert (row.status, row.qty, row.filled_qty) == ("FILLED", D("0.5"), order.filled_qty)
    assert [(f.price, f.fee) for f in FillRow.select().order_by(FillRow.fill_id)] == [(D("100.10"), D("0.0250250"))] * 2
    snap = EquitySnapshot.get()
    assert (snap.cash, snap.note) == (acct.cash, order.order_id)
    order.status = OrderStatus.CANCELLED
    store.commit([store.Change(order, False, [])], acct, {})  # an update, no fill: no snapshot
    assert OrderRow.get(OrderRow.client_order_id == "a").status == "CANCELLED"
    assert EquitySnapshot.select().count() == 1
    assert store.exists("a") and not store.exists("b")


def test_a_failed_commit_writes_nothing_and_leaves_no_transaction_open(db):
    first = _order("a")
    store.commit([store.Change(first, True, [_fill(first, 0)])], Account(D(1000)), {})
    second = _order("b")
    with pytest.raises(Exception):  # the repeated fill_id breaks the primary key, after b's order row
        store.commit([store.Change(second, True, [_fill(first, 0)])], Account(D(1000)), {})
    assert not store.exists("b")
    assert (FillRow.select().count(), EquitySnapshot.select().count()) == (1, 1)
    assert not database.connection().in_transaction
    third = _order("c")  # the connection still commits
    store.commit([store.Change(third, True, [])], Account(D(1000)), {})
    assert store.exists("c")


def test_the_raw_rows_are_the_rows_peewee_would_write(db):
    order = _order("r")
    order.fill(D("100.10"), D("0.25"), 30)
    fill = _fill(order, 0)
    change = store.Change(order, True, [fill], 31, D("100.05"), D("100.07"))
    o = order  # the reference: each column's value through peewee's own db_value
    fields = dict(order_id=o.order_id, client_order_id=o.client_order_id, strategy=o.strategy, symbol=o.symbol,
                  side=o.side.value, kind=o.kind.value, tif=o.tif.value, qty=o.qty, price=o.price,
                  status=o.status.value, filled_qty=o.filled_qty, avg_price=o.avg_price, reason=o.reason,
                  created_ts=o.created_ts, updated_ts=o.updated_ts, arrival_ts=31, decision_mid=D("100.05"),
                  arrival_mid=D("100.07"))
    meta = OrderRow._meta.fields
    assert store._order_params(change, order.avg_price) == tuple(meta[c].db_value(fields[c]) for c in ORDER_COLS)
    f = fill
    row = dict(fill_id=f.fill_id, order_id=f.order_id, client_order_id=f.client_order_id, symbol=f.symbol,
               side=f.side.value, price=f.price, qty=f.qty, fee=f.fee, fee_asset=f.fee_asset,
               liquidity=f.liquidity.value, exch_ts=f.exch_ts, ts=f.ts, mid_at_fill=D("100.06"),
               decision_mid=f.decision_mid, arrival_mid=f.arrival_mid, slippage_decision=f.slippage_decision,
               slippage_arrival=f.slippage_arrival, queue_wait_ns=f.queue_wait_ns)
    meta = FillRow._meta.fields
    assert store._fill_params(fill, D("100.06")) == tuple(meta[c].db_value(row[c]) for c in FILL_COLS)
    assert set(fields) == set(ORDER_COLS) and set(row) == set(FILL_COLS)


def test_known_ids_never_forget_a_stored_order(db):
    for coid in ("a", "b"):
        store.commit([store.Change(_order(coid), True, [])], Account(D(1000)), {})
    known = store.known_ids()
    assert known.maybe("a") and known.maybe("b")
    ids = [f"coid-{i}" for i in range(20_000)]
    for coid in ids[::2]:
        known.add(coid)
    assert all(known.maybe(coid) for coid in ids[::2])  # no false negatives
    assert sum(known.maybe(coid) for coid in ids[1::2]) < 20  # and few false positives


def test_the_wal_is_truncated_once_it_passes_its_limit(db, tmp_path, monkeypatch):
    """A passive checkpoint never waits, so under steady commits with readers on the file the
    WAL is never found fully copied when a writer starts, is never reused, and never shrinks.
    Past WAL_RESTART_BYTES the checkpointer truncates it."""
    import os
    import sqlite3
    import threading

    from tests.conftest import wait_for

    limit = 256 * 1024
    monkeypatch.setattr(store, "CHECKPOINT_S", 0.01)
    monkeypatch.setattr(store, "WAL_RESTART_BYTES", limit)
    path = str(tmp_path / "store.db")
    wal = path + "-wal"
    cp = store.Checkpointer(path)
    cp.start()
    stop = threading.Event()

    def reader() -> None:  # the API and risk read the same file while the broker writes
        con = sqlite3.connect(path, timeout=5)
        try:
            while not stop.is_set():
                con.execute("SELECT count(*) FROM fills").fetchall()
        finally:
            con.close()

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    acct, biggest = Account(D(10**9)), 0
    try:
        for i in range(1500):
            order = _order(f"o{i}")
            order.status = OrderStatus.FILLED
            acct = store.commit([store.Change(order, True, [_fill(order, 0)])], acct, {"BTCUSDT": D("100")})
            if i % 50 == 0:
                biggest = max(biggest, os.path.getsize(wal))
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    try:
        wait_for(lambda: os.path.getsize(wal) < limit, 20, "the WAL to be truncated")
    finally:
        cp.stop()
    assert biggest > limit  # the path was taken: without it the WAL would have stayed this big
    assert cp.restarts >= 1 and FillRow.select().count() == 1500


def test_a_lookup_reads_the_database_with_the_journals_unstored_records_over_it(db):
    """While the database refuses the journal's rows, a repeat is still answered as the broker told it."""
    a = _order("a")
    a.fill(D("100.10"), D("0.25"), 20)
    stored_fill = _fill(a, 0)
    store.commit([store.Change(a, True, [stored_fill])], Account(D(1000)), {})
    # durable in the journal only: a's second fill and final status, and all of b
    a.fill(D("100.10"), D("0.25"), 21)
    b = _order("b")
    b.fill(D("100.10"), D("0.25"), 22)
    pending, _ = store.statements([store.Change(a, False, [_fill(a, 1)]), store.Change(b, True, [_fill(b, 0)])],
                                  Account(D(1000)), {})
    assert store.stored("a")[0].status is OrderStatus.PARTIALLY_FILLED  # the database alone is behind
    order, fills = store.stored("a", pending)
    assert (order.status, order.filled_qty, order.fill_count) == (OrderStatus.FILLED, D("0.5"), 2)
    assert [f.fill_id for f in fills] == ["f-a-0", "f-a-1"] and fills[1].qty == D("0.25")
    order, fills = store.stored("b", pending)
    assert (order.order_id, order.status, [f.fill_id for f in fills]) == ("id-b", OrderStatus.PARTIALLY_FILLED,
                                                                          ["f-b-0"])
    assert store.stored("c", pending) is None
    assert store.inserts("b", pending) and not store.inserts("a", pending)
