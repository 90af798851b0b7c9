"""FlattenJob alone: it needs only the engine and three callables, not the service."""
from __future__ import annotations

from decimal import Decimal as D

import msgpack

from services.risk.core import RiskEngine
from services.risk.flatten import FlattenJob
from shared import messages
from shared.enums import ControlAction, OrderStatus, Side, TradingState, Verdict
from shared.messages import Ack, Decision, Error
from tests.services.risk.test_core import T0, fill, limits


class Desk:
    """Stands in for OrderDesk.submit_cancel / submit_order: records the calls; answers when told."""

    def __init__(self) -> None:
        self.cancels: list = []
        self.orders: list = []

    def submit_cancel(self, coid, now, notify) -> None:
        self.cancels.append((coid, now, notify))

    def submit_order(self, req, payload, now, notify, decoded_ns) -> None:
        assert payload is None and decoded_ns > 0
        self.orders.append((req, now, notify))


def test_flatten_cancels_what_the_broker_has_then_closes_then_answers_later():
    eng = RiskEngine(limits(), D("1000"))
    eng.on_fill(fill("f1", Side.BUY, "0.006", "100"), T0)
    eng.track("rest", "BTCUSDT", Side.BUY, D("0.002"), D("0.002"))
    eng.on_sent("unsure", "BTCUSDT", Side.BUY, D("0.001"), False, T0)  # not known to the broker: not cancelled
    eng.control(ControlAction.FLATTEN, "ops", "wind down", T0)
    desk, later, answers = Desk(), [], []
    job = FlattenJob(eng, desk.submit_order, desk.submit_cancel, later.append, T0, answers.append)
    job.start()
    assert [(c, now) for c, now, _ in desk.cancels] == [("rest", T0)] and desk.orders == []
    ack = Ack(ts=T0, client_order_id="rest", order_id="o1", status=OrderStatus.CANCELLED, filled_qty=D(0))
    desk.cancels[0][2](messages.encode(ack))
    assert [(r.client_order_id, r.side, r.qty, r.strategy) for r, _, _ in desk.orders] == [
        (f"flatten-{T0:x}-BTCUSDT", Side.SELL, D("0.006"), "risk")]
    req, _, notify = desk.orders[0]
    close = Ack(ts=T0, client_order_id=req.client_order_id, order_id="o2", status=OrderStatus.FILLED,
                filled_qty=D("0.006"))
    notify(messages.encode(Decision(ts=T0, client_order_id=req.client_order_id, verdict=Verdict.APPROVED,
                                    qty=D("0.006"), order=msgpack.unpackb(messages.encode(close)))), 0, 0)
    assert answers == [] and len(later) == 1  # told once the desk booked the fills: at the end of the turn
    later.pop()()
    assert answers == [[{"client_order_id": "rest", "action": "CANCEL", "status": "CANCELLED"},
                        {"client_order_id": req.client_order_id, "action": "CLOSE", "verdict": "APPROVED",
                         "qty": "0.006", "reason": "", "status": "FILLED"}]]
    assert eng.state is TradingState.REDUCING


def test_flatten_with_nothing_to_cancel_or_close_answers_at_once_and_a_failed_cancel_is_reported():
    eng = RiskEngine(limits(), D("1000"))
    desk, answers = Desk(), []
    FlattenJob(eng, desk.submit_order, desk.submit_cancel, lambda fn: fn(), T0, answers.append).start()
    assert answers == [[]] and desk.cancels == desk.orders == []
    eng.track("rest", "BTCUSDT", Side.BUY, D("0.002"), D("0.002"))
    FlattenJob(eng, desk.submit_order, desk.submit_cancel, lambda fn: fn(), T0, answers.append).start()
    desk.cancels[0][2](messages.encode(Error(ts=T0, code="BROKER_UNAVAILABLE", text="no reply")))
    assert answers[1] == [{"client_order_id": "rest", "action": "CANCEL", "status": "BROKER_UNAVAILABLE"}]
