"""Fixtures for the strategy tests: book factory and config builder."""
from __future__ import annotations

import pytest

from shared.config import load
from shared.messages import Book


def make_book(symbol: str = "BTCUSDT", imbalance: float = 0.0, recv_ts: int = 1_000,
              update_id: int = 1, ts: int | None = None) -> Book:
    """A `book` message with the given imbalance (levels are illustrative)."""
    return Book(ts=recv_ts if ts is None else ts, symbol=symbol, exch_ts=recv_ts // 1_000_000,
                update_id=update_id, bids=[[100.0, 1.0]], asks=[[100.1, 1.0]], mid=100.05, spread=0.1,
                spread_bps=9.995, imbalance=imbalance, microprice=100.05, recv_ts=recv_ts)


@pytest.fixture(scope="session")
def book():
    return make_book


@pytest.fixture(scope="session")
def config():
    """`config(**QF_vars)` → Config from exactly those variables (never os.environ), for the
    imbalance strategy's tests: QF_STRATEGY_KIND is `imbalance` unless given (its orders are then
    named `imbalance-…`, as StrategyService runs only that kind)."""
    def build(**env: str):
        return load({"QF_STRATEGY_KIND": "imbalance", **{k: str(v) for k, v in env.items()}})
    return build
