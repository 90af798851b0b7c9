"""Risk's side of the lock-step replay (QF_LOCKSTEP, shared/lockstep.py): the socket adapters that
count what crosses them for risk's `Reporter`. Only a lock-step RiskService builds them; a
normal one uses `Server` and `BrokerLink` themselves, so nothing here costs its hot path.

Who counts what (the counters shared/lockstep.py names for risk):

- `md`, `events_in`, `orders_in`: RiskService's lock-step readers (`_drain_lockstep`,
  `_handle_lockstep` in services/risk/service.py);
- `answers_out`: `CountingServer.reply`, once for each OrderRequest received (`expect`), when
  its reply goes out — a decision, or the error of an order risk could not handle;
  `cancel_answers_out` likewise for each Cancel (the OFI strategy's); replies to controls are
  not counted (the strategy's STATE request comes before its hello);
- `cancels_in`: `_handle_lockstep`; `states_out`: `_publish_state` (one risk.state per state
  change; a lock-step risk publishes none on its heartbeat);
- `broker_out`, `broker_in`: `CountingLink.send` when a request went to the broker, and when
  BrokerLink hands the broker's reply to it (a timeout or a closed link is no reply).
"""
from __future__ import annotations

from typing import Callable

import msgpack
import zmq

from services.risk.link import BrokerLink, Callback
from shared.bus import Server
from shared.curve import Curve
from shared.lockstep import Reporter


def stamp(raw: bytes) -> int:
    """The `ts` of an encoded message (0 when it has none or cannot be read: then nothing waits)."""
    try:
        ts = msgpack.unpackb(raw, raw=False).get("ts")
    except Exception:  # msgpack raises several unrelated types; a map is not guaranteed either
        return 0
    return ts if type(ts) is int else 0


class CountingServer(Server):
    """Risk's ROUTER, counting `answers_out` (or another counter): `expect(envelope, counter)`
    when an order (a cancel) comes in on it, then its reply (to that envelope) counts once when
    sent. An envelope names one request (a REQ has one at a time; the DEALER's carry a request id)."""

    def __init__(self, endpoint: str, reporter: Reporter, ctx: zmq.Context | None = None,
                 curve: Curve | None = None) -> None:
        super().__init__(endpoint, ctx, curve)
        self.reporter = reporter
        self.awaiting: dict[tuple[bytes, ...], list[str]] = {}  # envelope -> counters of its unanswered requests

    def expect(self, envelope: list[bytes], counter: str = "answers_out") -> None:
        self.awaiting.setdefault(tuple(envelope), []).append(counter)

    def reply(self, envelope: list[bytes], payload: bytes) -> None:
        super().reply(envelope, payload)
        key = tuple(envelope)
        left = self.awaiting.get(key)
        if left is not None:
            counter = left.pop(0)
            if not left:
                del self.awaiting[key]
            self.reporter.counters[counter] += 1


class CountingLink(BrokerLink):
    """Risk's link to the broker, counting `broker_out` (a request sent) and `broker_in` (a
    reply handed over). Before a reply reaches the desk, `catch_up(its ts)` lets risk read the
    market data up to it: the broker answers a request at its due instant, and risk's clock
    must stand there too when it books the answer (as the backtest's clock does)."""

    def __init__(self, endpoint: str, timeout_ms: int, reporter: Reporter, catch_up: Callable[[int], None],
                 ctx: zmq.Context | None = None, curve: Curve | None = None) -> None:
        super().__init__(endpoint, timeout_ms, ctx, curve)
        self.reporter = reporter
        self.catch_up = catch_up

    def send(self, payload: bytes, callback: Callback) -> bool:
        counters = self.reporter.counters

        def answered(raw: bytes | None) -> None:
            if raw is not None:
                counters["broker_in"] += 1
                self.catch_up(stamp(raw))
            callback(raw)
        if not super().send(payload, answered):
            return False
        counters["broker_out"] += 1
        return True
