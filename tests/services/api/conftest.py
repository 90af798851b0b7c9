"""Fixtures for the API tests: config, a real SQLite file, row factories."""
from __future__ import annotations

import itertools
import time
import uuid
from decimal import Decimal

import pytest

from shared import aggregates
from shared.bus import Publisher
from shared.config import load
from shared.db import EquitySnapshot, FillRow, OrderRow, close_db, init_db
from shared.messages import Heartbeat, MdStatus, RiskState
from tests.conftest import wait_for


def bus_env(tag: str) -> dict[str, str]:
    """The four publishers' endpoints as inproc names of this test (the API's watcher and the
    test's publishers share the process's ZeroMQ context), heartbeats every 100 ms."""
    return {f"QF_{k}_PUB": f"inproc://qf-{tag}-{k.lower()}" for k in ("MD", "BROKER", "RISK", "STRATEGY")} | \
        {"QF_HEARTBEAT_MS": "100"}


@pytest.fixture
def api_config(tmp_path):
    """Config from explicit variables only: a database file in tmp_path, the bus on inproc names."""
    return load({"QF_DB": str(tmp_path / "data" / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
                 "QF_SHABBAT_PAUSE": "false",  # the wall clock: no weekday may change an answer
                 **bus_env(uuid.uuid4().hex[:8])})


class Beats:
    """Real PUB sockets on the config's four publisher endpoints, sending what the services send:
    heartbeats (marketdata's with each symbol's state), `status.*`, `risk.state`."""

    SERVICES = {"marketdata": "md_pub", "broker": "broker_pub", "risk": "risk_pub", "strategy": "strategy_pub"}

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.pubs = {name: Publisher(getattr(cfg.bus, attr), 1000) for name, attr in self.SERVICES.items()}

    def beat(self, services=("marketdata", "strategy", "risk", "broker"), symbols: dict | None = None,
             status: str = "ok") -> None:
        for name in services:
            stats = {"symbols": symbols if symbols is not None else dict.fromkeys(self.cfg.md.symbols, "SYNCED")} \
                if name == "marketdata" else {}
            self.pubs[name].publish(f"heartbeat.{name}", Heartbeat(ts=time.time_ns(), service=name, pid=1234,
                                                                   started_ts=1, status=status, stats=stats))

    def md_status(self, symbol: str, state: str, detail: str) -> None:
        self.pubs["marketdata"].publish(f"status.{symbol}", MdStatus(ts=time.time_ns(), symbol=symbol, state=state,
                                                                     detail=detail))

    def risk_state(self, state: str, reason: str = "") -> None:
        from shared.enums import TradingState
        self.pubs["risk"].publish("risk.state", RiskState(ts=time.time_ns(), state=TradingState(state), reason=reason,
                                                          equity=Decimal("10000"), drawdown=Decimal("0")))

    def until(self, app, predicate, what: str, **beat) -> None:
        """Beat (again and again: a subscriber misses what was sent before it joined) until
        `predicate(app's watcher snapshot)` holds; bounded."""
        watch = app.extensions["qf_watch"].start()

        def heard():
            self.beat(**beat)
            return predicate(watch.snapshot())
        wait_for(heard, 10, what, step=0.02)

    def close(self) -> None:
        for pub in self.pubs.values():
            pub.close()


@pytest.fixture
def beats(api_config):
    b = Beats(api_config)
    yield b
    b.close()


def all_beating(app, beats: Beats, **beat) -> None:
    """Every expected service heard by `app`'s watcher (and the symbols' states, when given)."""
    expected = app.extensions["qf_watch"].expected
    beats.until(app, lambda snap: all(s in snap.beats for s in expected), "every service's heartbeat heard", **beat)


@pytest.fixture
def db(api_config):
    """The test's own connection to the same file the app will open."""
    database = init_db(api_config.common.db)
    yield database
    database.close()
    close_db()


@pytest.fixture
def client(api_config, db):
    """A test client of the app over the test's database file (its connection closed after)."""
    from services.api.app import create_app
    app = create_app(api_config)
    yield app.test_client()
    handle = app.extensions["qf_db"]
    if handle.db is not None:
        handle.db.close()


def rebuild_aggregates(db) -> None:
    """What the broker keeps beside its fills (positions, pnl_days), made on the test's own
    writable connection (an app in this process may have bound the models to its read-only one)."""
    from shared.db import database
    before = database.obj
    database.initialize(db)
    try:
        aggregates.rebuild()
    finally:
        if before is not None:
            database.initialize(before)


@pytest.fixture
def add_fill(db):
    """`add_fill(symbol, side, qty, price, fee="0", ts=...)` inserts one fill row (strings → Decimal)."""
    counter = itertools.count(1)

    def add(symbol: str, side: str, qty: str, price: str, fee: str = "0", ts: int | None = None,
            fee_asset: str = "USDT") -> FillRow:
        n = next(counter)
        ts = 1_700_000_000_000_000_000 + n * 1_000_000 if ts is None else ts
        with db.bind_ctx([FillRow]):
            row = FillRow.create(fill_id=f"f{n:04d}", order_id=f"o{n:04d}", client_order_id=f"c{n:04d}",
                                 symbol=symbol, side=side, price=Decimal(price), qty=Decimal(qty),
                                 fee=Decimal(fee), fee_asset=fee_asset, liquidity="TAKER",
                                 exch_ts=ts // 1_000_000, ts=ts)
        rebuild_aggregates(db)
        return row
    return add


@pytest.fixture
def add_order(db):
    counter = itertools.count(1)

    def add(status: str, symbol: str = "BTCUSDT", qty: str = "0.001") -> OrderRow:
        n = next(counter)
        with db.bind_ctx([OrderRow]):
            row = OrderRow.create(order_id=f"ord{n}", client_order_id=f"cid{n}", strategy="imbalance",
                                  symbol=symbol, side="BUY", kind="MARKET", tif="GTC", qty=Decimal(qty),
                                  status=status, filled_qty=Decimal(0), created_ts=n, updated_ts=n)
        rebuild_aggregates(db)  # order_counts, as the broker keeps it
        return row
    return add


@pytest.fixture
def add_equity(db):
    def add(ts: int, equity: str, cash: str) -> EquitySnapshot:
        with db.bind_ctx([EquitySnapshot]):
            return EquitySnapshot.create(ts=ts, equity=Decimal(equity), cash=Decimal(cash))
    return add
