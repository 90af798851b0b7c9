"""Fixtures for the API tests: config, a real SQLite file, row factories."""
from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from shared.config import load
from shared.db import EquitySnapshot, FillRow, OrderRow, close_db, init_db


@pytest.fixture
def api_config(tmp_path):
    """Config from explicit variables only: a database file in tmp_path."""
    return load({"QF_DB": str(tmp_path / "data" / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
                 "QF_SHABBAT_PAUSE": "false"})  # the wall clock: no weekday may change an answer


@pytest.fixture
def db(api_config):
    """The test's own connection to the same file the app will open."""
    database = init_db(api_config.common.db)
    yield database
    database.close()
    close_db()


@pytest.fixture
def add_fill(db):
    """`add_fill(symbol, side, qty, price, fee="0", ts=...)` inserts one fill row (strings → Decimal)."""
    counter = itertools.count(1)

    def add(symbol: str, side: str, qty: str, price: str, fee: str = "0", ts: int | None = None,
            fee_asset: str = "USDT") -> FillRow:
        n = next(counter)
        ts = 1_700_000_000_000_000_000 + n * 1_000_000 if ts is None else ts
        with db.bind_ctx([FillRow]):
            return FillRow.create(fill_id=f"f{n:04d}", order_id=f"o{n:04d}", client_order_id=f"c{n:04d}",
                                  symbol=symbol, side=side, price=Decimal(price), qty=Decimal(qty),
                                  fee=Decimal(fee), fee_asset=fee_asset, liquidity="TAKER",
                                  exch_ts=ts // 1_000_000, ts=ts)
    return add


@pytest.fixture
def add_order(db):
    counter = itertools.count(1)

    def add(status: str, symbol: str = "BTCUSDT", qty: str = "0.001") -> OrderRow:
        n = next(counter)
        with db.bind_ctx([OrderRow]):
            return OrderRow.create(order_id=f"ord{n}", client_order_id=f"cid{n}", strategy="imbalance",
                                   symbol=symbol, side="BUY", kind="MARKET", tif="GTC", qty=Decimal(qty),
                                   status=status, filled_qty=Decimal(0), created_ts=n, updated_ts=n)
    return add


@pytest.fixture
def add_equity(db):
    def add(ts: int, equity: str, cash: str) -> EquitySnapshot:
        with db.bind_ctx([EquitySnapshot]):
            return EquitySnapshot.create(ts=ts, equity=Decimal(equity), cash=Decimal(cash))
    return add
