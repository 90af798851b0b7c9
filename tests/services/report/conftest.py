"""Fixtures for the report tests: a small trading history written into a real SQLite file with the
live schema (shared/db.py), the same bytes for the same seed, so the charts drawn from it can be
compared with stored images."""
from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from shared.db import EQUITY_COLS, FILL_COLS, close_db, init_db
from shared.ledger import Ledger

START_NS = int(datetime(2024, 7, 4, tzinfo=timezone.utc).timestamp()) * 10**9  # a Thursday 00:00 UTC
START_CASH = Decimal("10000")
SPECS = {"BTCUSDT": (Decimal("60000"), Decimal("0.001")), "ETHUSDT": (Decimal("3000"), Decimal("0.01"))}
RATES = {"MAKER": Decimal("0.0002"), "TAKER": Decimal("0.001")}
MINUTE = 60 * 10**9


def _text(d: Decimal) -> str:
    return format(d, "f")


def write_history(path: str, fills: int = 600, days: float = 3, seed: int = 3) -> dict:
    """A history of `fills` fills of BTCUSDT and ETHUSDT over `days` from START_NS: a random walk
    of the price, positions of a few lots that go flat and flip, exact fees, slippage, equity
    snapshots every 10 minutes (the ledger's equity at the last fill prices), a halt of two hours
    and a Shabbat pause from Friday 16:00 to Saturday 17:00 UTC. Returns what was written."""
    rng = random.Random(seed)
    init_db(path)
    close_db()
    ledger = Ledger(START_CASH, remember=0)
    prices = {s: p for s, (p, _) in SPECS.items()}
    rows, equity = [], []
    period = int(days * 86_400 * 10**9)
    next_snap = START_NS
    for i in range(fills):
        ts = START_NS + (i + 1) * period // (fills + 1) + rng.randrange(MINUTE)
        while next_snap <= ts:
            equity.append((next_snap, _text(ledger.equity()), _text(ledger.cash()), "periodic"))
            next_snap += 10 * MINUTE
        symbol = rng.choice(list(SPECS))
        base_price, lot = SPECS[symbol]
        step = (base_price * Decimal("0.0008") * Decimal(rng.randint(-10, 10))).quantize(Decimal("0.01"))
        prices[symbol] = max(prices[symbol] + step, base_price / 2)
        held = ledger.qty(symbol)
        lots = Decimal(rng.choice((1, 1, 2, 3)))
        side = "SELL" if held > 0 and rng.random() < 0.6 else "BUY" if held < 0 and rng.random() < 0.6 else \
            rng.choice(("BUY", "SELL"))
        qty = lots * lot
        liquidity = "MAKER" if rng.random() < 0.7 else "TAKER"
        price = prices[symbol] + (Decimal("0.01") * rng.randint(0, 5) * (1 if side == "BUY" else -1)
                                  if liquidity == "TAKER" else 0)
        fee = price * qty * RATES[liquidity]
        ledger.apply("", symbol, side, qty, price, fee, "USDT")
        mid = prices[symbol]
        slip = (price - mid) * (1 if side == "BUY" else -1)
        rows.append((f"f{i:05d}", f"o{i:05d}", f"c{i:05d}", symbol, side, _text(price), _text(qty), _text(fee), "USDT",
                     liquidity, ts // 10**6, ts, _text(mid), _text(mid), _text(mid), _text(slip),
                     _text(slip) if i % 10 else None, 0))
    end = START_NS + period
    while next_snap <= end:
        equity.append((next_snap, _text(ledger.equity()), _text(ledger.cash()), "periodic"))
        next_snap += 10 * MINUTE
    friday = START_NS + 86_400 * 10**9
    events = [(START_NS + 20 * 3600 * 10**9, "STATE", "MANUAL", "checking [by api:ops]", "HALTED"),
              (START_NS + 22 * 3600 * 10**9, "STATE", "MANUAL", "resumed [by api:ops]", "ACTIVE"),
              (friday + 16 * 3600 * 10**9, "STATE", "SHABBAT", "Shabbat [by calendar]", "PAUSED_SHABBAT"),
              (friday + 41 * 3600 * 10**9, "STATE", "SHABBAT_END", "Shabbat over [by calendar]", "ACTIVE"),
              (START_NS + 3 * 3600 * 10**9, "DENIED", "RATE_LIMIT", "rate limit", "ACTIVE")]
    con = sqlite3.connect(path)
    try:
        with con:
            con.executemany(f'INSERT INTO fills ({", ".join(FILL_COLS)}) VALUES ({", ".join("?" * len(FILL_COLS))})',
                            rows)
            con.executemany(f'INSERT INTO equity ({", ".join(EQUITY_COLS)}) VALUES (?, ?, ?, ?)', equity)
            con.executemany("INSERT INTO risk_events (ts, kind, code, text, client_order_id, symbol, state) "
                            "VALUES (?, ?, ?, ?, '', '', ?)", sorted(events))
    finally:
        con.close()
    return {"fills": len(rows), "equity": len(equity), "ledger": ledger}


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> str:
    """The path of a database holding `write_history()`'s trading (made once per module: read-only)."""
    path = str(tmp_path_factory.mktemp("history") / "qf.db")
    write_history(path)
    return path


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> str:
    """A database the broker has created and never written to."""
    path = str(tmp_path_factory.mktemp("empty") / "qf.db")
    init_db(path)
    close_db()
    return path
