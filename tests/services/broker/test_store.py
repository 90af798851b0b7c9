"""The broker's commit on a real SQLite file: all or nothing, and rows peewee reads back exactly."""
from __future__ import annotations

from decimal import Decimal as D

import pytest

from services.broker import store
from services.broker.core import Account, Order
from shared.db import EquitySnapshot, FillRow, OrderRow, close_db, database, init_db
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
