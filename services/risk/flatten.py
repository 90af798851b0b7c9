"""FLATTEN: cancel the working orders, then send closing orders through the normal path, then answer."""
from __future__ import annotations

import time
from typing import Callable

from services.risk.checks import FLATTEN_PREFIX
from services.risk.core import RiskEngine
from services.risk.desk import Notify
from shared import messages
from shared.errors import DecodeError
from shared.messages import Ack, Decision, OrderRequest

FLATTEN_RETRY_NS = 60 * 1_000_000_000  # a pause's flatten that left a position is tried again this often


class FlattenJob:
    """One FLATTEN request, made by the shell (RiskService.control) and `start`ed at once.
    Cancels go first, because working orders on the closing side count against a REDUCING
    order; when every cancel is answered the closing orders go out; when every order is
    decided, `done(results)` answers the control request.

    It takes only what it uses: the `engine` (which orders to cancel, which to send), the
    desk's `submit_order(req, payload, now, notify, decoded_ns)` and `submit_cancel(coid,
    now, notify)`, and `later(fn)`, which runs `fn` once what is being handled now is done."""

    def __init__(self, engine: RiskEngine,
                 submit_order: Callable[[OrderRequest, bytes | None, int, Notify, int], None],
                 submit_cancel: Callable[[str, int, Callable[[bytes], None]], None],
                 later: Callable[[Callable[[], object]], None], now: int,
                 done: Callable[[list[dict]], None], id_prefix: str | None = None) -> None:
        self.engine, self.submit_order, self.submit_cancel, self.later = engine, submit_order, submit_cancel, later
        self.now, self.done = now, done
        self.id_prefix = id_prefix or f"{FLATTEN_PREFIX}{now:x}"  # the closing orders' client_order_id prefix
        self.results: list[dict] = []
        self.waiting = 0

    def start(self) -> None:
        cancels = self.engine.cancellable_ids()
        self.waiting = len(cancels)
        if not cancels:
            self._close_positions()
            return
        for coid in cancels:
            self.submit_cancel(coid, self.now, lambda raw, coid=coid: self._cancelled(coid, raw))

    def _cancelled(self, coid: str, raw: bytes) -> None:
        try:
            reply = messages.decode(raw, messages.REQUESTS)
            status = reply.status.value if isinstance(reply, Ack) else getattr(reply, "code", reply.TYPE)
        except DecodeError as exc:
            status = exc.reason
        self.results.append({"client_order_id": coid, "action": "CANCEL", "status": status})
        self.waiting -= 1
        if not self.waiting:
            self._close_positions()

    def _close_positions(self) -> None:
        orders = self.engine.flatten_orders(self.now, self.id_prefix)
        self.waiting = len(orders)
        if not orders:
            self.done(self.results)
            return
        for order in orders:
            self.submit_order(order, None, self.now, self._decided, time.perf_counter_ns())

    def _decided(self, payload: bytes, _spent_ns: int, _since_ns: int) -> None:
        decision = messages.decode(payload, messages.REQUESTS)
        assert isinstance(decision, Decision)  # the desk encodes nothing else
        self.results.append({"client_order_id": decision.client_order_id, "action": "CLOSE",
                             "verdict": decision.verdict.value, "qty": f"{decision.qty:f}",
                             "reason": (decision.reason or {}).get("code", ""),
                             "status": decision.order.status.value if decision.order else ""})
        self.waiting -= 1
        if not self.waiting:
            # decisions are told before their fills are booked: answer once the desk is done
            self.later(lambda: self.done(self.results))
