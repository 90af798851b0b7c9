"""The OFI strategy's own orders as it knows them: phases, the bounded memory of them, and the check
that a fill is credible of its order before anything of it is applied."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

from shared.enums import OrderKind, OrderStatus, Side
from shared.messages import Fill
from shared.money import ZERO

# phases
SENT = "sent"  # awaiting risk's decision (a request in flight)
OPEN = "open"  # resting at the broker
CANCELLING = "cancelling"  # a cancel awaiting its answer (a request in flight)
DONE = "done"  # terminal
UNKNOWN = "unknown"  # fate unknown (the answer was lost): not working, but its fills and events still count

# rejection codes after which the broker may have the order all the same
UNSURE = frozenset({"NO_REPLY", "BROKER_UNAVAILABLE", "BROKER_ERROR", "BAD_ANSWER"})
# cancel answers after which the order may still rest
CANCEL_UNSURE = frozenset({"NO_REPLY", "BROKER_UNAVAILABLE", "BROKER_ERROR", "BAD_ANSWER", "STORE_UNAVAILABLE"})

MAX_ORDERS = 1024  # orders remembered (late fills and events of ended orders still apply)


@dataclass(slots=True, eq=False)
class WorkingOrder:
    """One order of the strategy as it knows it. `side`/`qty` are None for an adopted leftover
    (an order event carries neither)."""
    client_order_id: str
    symbol: str
    side: Side | None
    kind: OrderKind
    qty: Decimal | None
    price: Decimal | None
    purpose: str  # "entry" | "exit" | "leftover"
    action: str  # the signal action that sent it ("entry", "exit:stop_loss", ...; "leftover")
    sent_ns: int
    phase: str = SENT
    filled: Decimal = ZERO
    status: OrderStatus | None = None  # the broker's latest word
    price_f: float = 0.0
    cancel_reason: str = ""
    retry_ns: int = 0  # a cancel that failed is asked again from this time
    fill_ids: set = field(default_factory=set)

    @property
    def in_flight(self) -> bool:
        """Whether a request about it awaits its answer (its decision, or its cancel's)."""
        return self.phase is SENT or self.phase is CANCELLING

    @classmethod
    def leftover(cls, client_order_id: str, symbol: str, side: Side | None, now_ns: int,
                 status: OrderStatus | None = None) -> "WorkingOrder":
        """An order of ours this run did not send (an earlier run's), known from an event."""
        return cls(client_order_id, symbol, side, OrderKind.LIMIT, None, None, "leftover", "leftover", now_ns,
                   phase=UNKNOWN, status=status)


class KnownOrders:
    """client_order_id -> WorkingOrder, bounded: beyond MAX_ORDERS the oldest ended ones go."""

    def __init__(self, limit: int = MAX_ORDERS) -> None:
        self.limit = limit
        self._orders: OrderedDict[str, WorkingOrder] = OrderedDict()

    def get(self, client_order_id: str) -> WorkingOrder | None:
        return self._orders.get(client_order_id)

    def add(self, w: WorkingOrder) -> None:
        orders = self._orders
        orders[w.client_order_id] = w
        tries = 0
        while len(orders) > self.limit and tries < 8:
            cid, old = next(iter(orders.items()))
            if old.phase is DONE or old.phase is UNKNOWN:
                del orders[cid]
            else:
                orders.move_to_end(cid)  # still working: keep it
            tries += 1

    def __len__(self) -> int:
        return len(self._orders)


def check_fills(w: WorkingOrder, position: Decimal, fills: Iterable[Fill]) -> None:
    """Raises ValueError unless every fill is credible of `w` with the symbol's spot `position`,
    all together (a caller applies none of them then): of its order and symbol, on its side, a
    positive qty and price, no more filled than the order's qty, the position never below 0."""
    side, total, pos = w.side, w.filled, position
    for f in fills:
        if f.client_order_id != w.client_order_id or f.symbol != w.symbol:
            raise ValueError(f"fill {f.fill_id!r} is of {f.client_order_id!r} {f.symbol}, not of "
                             f"{w.client_order_id!r} {w.symbol}")
        if side is None:
            side = f.side
        if f.side is not side:
            raise ValueError(f"fill {f.fill_id!r} is a {f.side.value}, the order a {side.value}")
        if not f.qty > 0:
            raise ValueError(f"fill {f.fill_id!r} has a non-positive qty {f.qty}")
        if not f.price > 0:
            raise ValueError(f"fill {f.fill_id!r} has a non-positive price {f.price}")
        total += f.qty
        if w.qty is not None and total > w.qty:
            raise ValueError(f"fills of {w.client_order_id!r} add up to {total}, over its {w.qty}")
        pos = pos + f.qty if side is Side.BUY else pos - f.qty
        if pos < 0:
            raise ValueError(f"fill {f.fill_id!r} would take a spot position below 0 ({pos})")
