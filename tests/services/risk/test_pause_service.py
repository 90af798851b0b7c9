"""The Shabbat pause in RiskService (issue #14 part 2), over real sockets and SQLite, on a clock the
test moves: the flatten at the window through the real broker, SHABBAT denials during the pause,
risk.state at each transition, trading again after nightfall; and a flatten that cannot close
(no broker) said loudly: the log, a counter, an alert, and still paused."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

import pytest

from services.broker.service import BrokerService
from services.risk.service import RiskService
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.enums import ControlAction, Liquidity, OrderStatus, Side, TradingState
from shared.messages import Alert, Fill, RiskState
from shared.shabbat import Calendar, place
from tests.services.risk.test_service import ASKS, BIDS, Clock, control, free_port, order, settled

S = 1_000_000_000
MIN = 60 * S
PAUSE = Calendar(place("Jerusalem")).at(int(datetime(2026, 12, 12, 12, 0, tzinfo=timezone.utc).timestamp()) * S)
WINDOW = PAUSE.start_ns - 3 * MIN


@pytest.fixture
def pcfg(env):
    return load({**env, "QF_RISK_BROKER_TIMEOUT_MS": "200", "QF_RISK_MAX_POSITION": "0.01",
                 "QF_RISK_STALE_BOOK_MS": "600000", "QF_RISK_ADJUST": "false", "QF_SHABBAT_PAUSE": "true",
                 "QF_SHABBAT_LOCATION": "Jerusalem", "QF_SHABBAT_FLATTEN_MIN": "3"})


def drain(sub: Subscriber, kind, until, wait_until, what: str) -> list:
    """Messages of `kind` from `sub` until `until(list)` holds."""
    got: list = []

    def more() -> bool:
        while sub.sock.poll(0):
            _, msg = sub.recv()
            if isinstance(msg, kind):
                got.append(msg)
        return until(got)
    wait_until(more, what)
    return got


def runs(states: list) -> list:
    """The first RiskState of each run of the same state: the changes, without the repeats."""
    return [m for i, m in enumerate(states) if i == 0 or m.state is not states[i - 1].state]


def test_flatten_at_the_window_shabbat_during_and_trading_after_nightfall(pcfg, runner, make_book, feed, clients,
                                                                          db_rows, wait_until):
    clock = Clock()
    clock.now = WINDOW - 2 * MIN
    md = Publisher(pcfg.bus.md_pub, pcfg.bus.hwm)
    states = Subscriber(pcfg.bus.risk_pub, ["risk.state"], pcfg.bus.hwm)
    try:
        broker = runner.start(BrokerService(pcfg))
        risk = runner.start(RiskService(pcfg, clock=clock))
        book = make_book(bids=BIDS, asks=ASKS)
        feed(md, book, lambda: "BTCUSDT" in broker.books and "BTCUSDT" in risk.engine.book_ns)
        client = clients(pcfg.bus.risk_rep)
        assert client.request(order("before", "0.004")).order.status is OrderStatus.FILLED  # accepted before
        settled(client)
        clock.now = WINDOW + 1  # risk's next loop turn: REDUCING, and the flatten through the broker
        wait_until(lambda: risk.engine.ledger.qty("BTCUSDT") == 0, "the position closed by risk")
        assert risk.engine.state is TradingState.REDUCING
        closing = db_rows(pcfg.common.db,
                          "SELECT client_order_id, side, qty, status FROM orders WHERE strategy = 'risk'")
        assert [(s, q, st) for _, s, q, st in closing] == [("SELL", "0.004", "FILLED")]
        assert closing[0][0].startswith("shabbat-")
        assert client.request(order("entry", "0.001")).reason["code"] == "REDUCING"
        clock.now = PAUSE.start_ns
        for coid, side in (("during", Side.BUY), ("exit", Side.SELL)):
            d = client.request(order(coid, "0.001", side=side))
            assert d.reason["code"] == "SHABBAT" and "PAUSED_SHABBAT" in d.reason["text"]
        reply, detail = control(client, ControlAction.STATE)
        assert reply.state is TradingState.PAUSED_SHABBAT and detail["pause"]["phase"] == "paused"
        assert detail["pause"]["name"] == "Shabbat" and detail["held"] == "ACTIVE"
        clock.now = PAUSE.end_ns
        wait_until(lambda: risk.engine.state is TradingState.ACTIVE, "trading resumes by itself")
        feed(md, book, lambda: risk.engine.book_ns["BTCUSDT"] >= PAUSE.end_ns, "a book after nightfall")
        assert client.request(order("after", "0.001")).order.status is OrderStatus.FILLED  # accepted again
        # risk also says its state with every heartbeat (wall clock): the changes are the runs of it
        seen = runs(drain(states, RiskState, lambda got: [m.state for m in runs(got)][-3:] == [
            TradingState.REDUCING, TradingState.PAUSED_SHABBAT, TradingState.ACTIVE], wait_until, "risk.state"))
        assert "Shabbat" in seen[-2].reason
        stored = db_rows(pcfg.common.db, "SELECT code, ts FROM risk_events WHERE kind = 'STATE' ORDER BY ts")
        assert [c for c, _ in stored] == ["SHABBAT_FLATTEN", "SHABBAT", "SHABBAT_END"]
        denied = db_rows(pcfg.common.db, "SELECT code FROM risk_events WHERE kind = 'DENIED' ORDER BY ts")
        assert [c for (c,) in denied] == ["REDUCING", "SHABBAT", "SHABBAT"]
    finally:
        md.close()
        states.close()


def test_a_flatten_that_cannot_close_is_said_loudly_and_trading_stays_paused(env, runner, make_book, feed, clients,
                                                                            wait_until):
    cfg = load({**env, "QF_RISK_BROKER_TIMEOUT_MS": "100", "QF_RISK_STALE_BOOK_MS": "600000",
                "QF_SHABBAT_PAUSE": "true", "QF_SHABBAT_FLATTEN_MIN": "3",
                "QF_BROKER_REP": f"tcp://127.0.0.1:{free_port()}"})  # no broker listens
    clock = Clock()
    clock.now = WINDOW - MIN
    md = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    broker_pub = Publisher(cfg.bus.broker_pub, cfg.bus.hwm)
    alerts = Subscriber(cfg.bus.risk_pub, ["alert."], cfg.bus.hwm)
    try:
        risk = runner.start(RiskService(cfg, clock=clock))
        feed(md, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in risk.engine.book_ns)
        fill = Fill(ts=clock.now, fill_id="f1", order_id="o1", client_order_id="held", symbol="BTCUSDT",
                    side=Side.BUY, price=D("100.5"), qty=D("0.004"), fee=D(0), fee_asset="USDT", exch_ts=1,
                    liquidity=Liquidity.TAKER)

        def booked() -> bool:  # a SUB's subscription reaches the PUB asynchronously: publish until seen
            broker_pub.publish("fill.BTCUSDT", fill)
            return risk.engine.ledger.qty("BTCUSDT") == D("0.004")
        wait_until(booked, "a position from the bus")
        clock.now = WINDOW + 1
        got = drain(alerts, Alert, lambda got: any(a.code == "PAUSE_FLATTEN_FAILED" for a in got), wait_until,
                    "the alert")
        alert = next(a for a in got if a.code == "PAUSE_FLATTEN_FAILED")
        assert alert.severity == "error" and "Shabbat" in alert.text and "BTCUSDT" in alert.text
        assert risk.stats["pause_flatten_failures"] >= 1 and risk.engine.state is TradingState.REDUCING
        clock.now = PAUSE.start_ns + MIN
        wait_until(lambda: risk.engine.state is TradingState.PAUSED_SHABBAT, "paused all the same")
        assert risk.engine.ledger.qty("BTCUSDT") == D("0.004")  # held over the pause, and said so
    finally:
        md.close()
        broker_pub.close()
        alerts.close()
