"""Point 7 end to end: the real strategy's Lazy Pirate through a risk slower than its timeout fills once."""
from __future__ import annotations

import dataclasses
from decimal import Decimal as D

import pytest

from services.broker.service import BrokerService
from services.risk.service import RiskService
from services.strategy.service import StrategyService
from shared.bus import Publisher
from shared.config import load


def test_retries_with_the_same_id_fill_once(env, runner, make_book, wait_until, db_rows, caplog):
    slow = {"QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "150"}
    if not slow:
        pytest.skip("this checkout's broker has no simulated latency to make risk slow with")
    cfg = load({**env, **slow, "QF_RISK_BROKER_TIMEOUT_MS": "2000", "QF_STRATEGY_TIMEOUT_MS": "40",
                "QF_STRATEGY_RETRIES": "20", "QF_STRATEGY_QTY": "0.002", "QF_STRATEGY_COOLDOWN_MS": "600000",
                "QF_SYMBOLS": "btcusdt"})
    md = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    try:
        runner.start(BrokerService(cfg))
        risk = runner.start(RiskService(cfg))
        strategy = runner.start(StrategyService(cfg))
        book = dataclasses.replace(make_book(bids=[[100.0, 5.0]], asks=[[100.5, 5.0]]), imbalance=0.9)

        def decided():  # books until the strategy got its answer (a SUB misses what precedes its join)
            md.publish("book.BTCUSDT", dataclasses.replace(book, ts=book.ts + 1))
            return strategy.stats["approved"] + strategy.stats["rejected"]
        wait_until(decided, "the strategy's order to be decided", timeout=20, step=0.02)
        assert strategy.stats == {**strategy.stats, "orders": 1, "approved": 1, "no_reply": 0}
        orders = db_rows(cfg.common.db, "SELECT client_order_id, status, filled_qty FROM orders")
        assert len(orders) == 1 and orders[0][1:] == ("FILLED", "0.002")  # asked many times, executed once
        fills = db_rows(cfg.common.db, "SELECT qty FROM fills")
        assert sum(D(q) for (q,) in fills) == D("0.002")
        assert strategy.core.position("BTCUSDT") == D("0.002")
        wait_until(lambda: risk.engine.ledger.qty("BTCUSDT") == D("0.002"), "risk's ledger")
        retries = [r for r in caplog.records if r.getMessage() == "risk_retry"]
        assert len(retries) >= 2  # the broker took 150 ms, the strategy waited 40 ms per attempt
    finally:
        md.close()
