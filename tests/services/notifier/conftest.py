"""Fixtures for the notifier: a bot token, the fake Bot API on loopback, messages to feed it."""
from __future__ import annotations

from decimal import Decimal

import pytest

from shared.enums import Liquidity, Side, TradingState
from shared.messages import Fill, RiskState
from tests.services.notifier.fake_bot_api import FakeBotApi

# Shaped like a real token (digits:35 characters), made up for the tests.
TOKEN = "987654321:AAF3kQz9xV7cT2mWq8LrB5nYh4pJd6sE1uG"
SECRET = TOKEN.partition(":")[2]
NS = 1_000_000_000
T0 = 1_765_400_000 * NS  # Wed 2025-12-10 20:53:20 UTC


@pytest.fixture
def fake_api():
    api = FakeBotApi(TOKEN)
    yield api
    api.close()


def fill(n: int, side: Side = Side.BUY, price: str = "61234.5", qty: str = "0.001", symbol: str = "BTCUSDT",
         fee: str = "0.0612345", liquidity: Liquidity = Liquidity.TAKER) -> Fill:
    return Fill(ts=T0, fill_id=f"F{n}", order_id=f"O{n // 2}", client_order_id=f"ofi-{n // 2}", symbol=symbol,
                side=side, price=Decimal(price), qty=Decimal(qty), fee=Decimal(fee), fee_asset="USDT",
                liquidity=liquidity, exch_ts=T0 // 1_000_000)


def risk_state(state: TradingState, reason: str = "", equity: str = "10000", drawdown: str = "0") -> RiskState:
    return RiskState(ts=T0, state=state, reason=reason, equity=Decimal(equity), drawdown=Decimal(drawdown))


class FakeStack:
    """The PUBs the notifier listens to, bound by the test (broker, risk, marketdata, strategy),
    with a broker and a risk that beat every 100 ms (their heartbeats, risk.state ACTIVE) as live
    ones do. One thread owns the sockets; `publish` hands it an event."""

    def __init__(self, env: dict[str, str], broker_pid: int = 1000) -> None:
        import queue
        import threading

        from shared.bus import Publisher
        self._queue: queue.Queue = queue.Queue()
        self._ready, self._done = threading.Event(), threading.Event()
        self.broker_pid = broker_pid
        self.endpoints = {k: env[k] for k in ("QF_BROKER_PUB", "QF_RISK_PUB", "QF_MD_PUB", "QF_STRATEGY_PUB")}
        self._Publisher = Publisher
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-stack")
        self._thread.start()
        assert self._ready.wait(5), "the fake stack's PUBs did not bind"

    def _run(self) -> None:
        import queue
        import time

        from shared.messages import Heartbeat
        pubs = {k: self._Publisher(ep, 100_000) for k, ep in self.endpoints.items()}
        self._ready.set()
        started = time.time_ns()
        next_beat = 0.0
        try:
            while not self._done.is_set():
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + 0.1
                    now = time.time_ns()
                    pubs["QF_BROKER_PUB"].publish("heartbeat.broker", Heartbeat(
                        ts=now, service="broker", pid=self.broker_pid, started_ts=started, status="ok"))
                    pubs["QF_RISK_PUB"].publish("heartbeat.risk", Heartbeat(
                        ts=now, service="risk", pid=2000, started_ts=started, status="ok"))
                    if self.beat_state is not None:
                        pubs["QF_RISK_PUB"].publish("risk.state", self.beat_state)
                try:
                    key, topic, msg = self._queue.get(timeout=0.02)
                except queue.Empty:
                    continue
                pubs[key].publish(topic, msg)
        finally:
            for p in pubs.values():
                p.close()

    beat_state = None  # a RiskState repeated with each beat, as risk does

    def publish(self, key: str, topic: str, msg) -> None:
        self._queue.put((key, topic, msg))

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
