"""Pure paper-broker core: order state machine, acks and events, cash and positions (money rules: shared/money.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from enum import Enum
from typing import Iterable, Mapping

from shared.enums import OPEN_STATUSES, OrderKind, OrderStatus, Side, TimeInForce
from shared.errors import InvalidTransition
from shared.messages import Ack, Fill, OrderEvent, OrderRequest
from shared.money import MAX_PRICE, MAX_QTY, MONEY, STEP, ZERO, canonical, quote_asset

# Reasons the broker gives (Ack.reason / OrderRow.reason).
NO_BOOK = "NO_BOOK"
BAD_BOOK = "BAD_BOOK"  # the symbol's latest book was refused (market.py): nothing trades on it until a sane one
NO_LIQUIDITY = "NO_LIQUIDITY"
IOC_REMAINDER = "IOC_REMAINDER"
WOULD_TAKE = "WOULD_TAKE"  # a post-only (GTX) LIMIT that would have matched on arrival: rejected, never taken
BAD_ORDER = "BAD_ORDER"
NOT_OPEN = "not open"
CANCELLED_BY_CLIENT = "CANCELLED_BY_CLIENT"


class Trigger(str, Enum):
    """What happened to an order; the transition table maps (status, trigger) to the next status."""
    PARTIAL_FILL = "PARTIAL_FILL"
    FILL = "FILL"  # the fill that completes the order
    CANCEL = "CANCEL"
    REJECT = "REJECT"


S = OrderStatus
TRANSITIONS: dict[tuple[OrderStatus, Trigger], OrderStatus] = {
    (S.PENDING, Trigger.PARTIAL_FILL): S.PARTIALLY_FILLED,
    (S.PENDING, Trigger.FILL): S.FILLED,
    (S.PENDING, Trigger.CANCEL): S.CANCELLED,
    (S.PENDING, Trigger.REJECT): S.REJECTED,
    (S.PARTIALLY_FILLED, Trigger.PARTIAL_FILL): S.PARTIALLY_FILLED,
    (S.PARTIALLY_FILLED, Trigger.FILL): S.FILLED,
    (S.PARTIALLY_FILLED, Trigger.CANCEL): S.CANCELLED,
}


def next_status(status: OrderStatus, trigger: Trigger) -> OrderStatus:
    """The status after `trigger`; raises InvalidTransition when the table has no entry."""
    try:
        return TRANSITIONS[(status, trigger)]
    except KeyError:
        raise InvalidTransition(f"{status.value} --{trigger.value}--> ?") from None


@dataclass(slots=True)
class Order:
    """One order as the broker tracks it. Mutated only through fill/cancel/reject,
    each checked against TRANSITIONS (InvalidTransition leaves it unchanged)."""
    order_id: str
    client_order_id: str
    strategy: str
    symbol: str
    side: Side
    kind: OrderKind
    tif: TimeInForce
    qty: Decimal
    price: Decimal | None
    created_ts: int
    status: OrderStatus = OrderStatus.PENDING
    filled_qty: Decimal = ZERO
    notional: Decimal = ZERO  # sum of price * qty over fills, exact
    fill_count: int = 0  # numbers fill ids `{order_id}-{n}`
    reason: str = ""
    updated_ts: int = 0
    # (notional, filled_qty, avg_price) of the last avg_price asked: the division is made once per fill
    _avg: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_request(cls, req: OrderRequest, order_id: str, now_ns: int) -> "Order":
        """A new PENDING order for `req`. Raises ValueError for a qty outside (0, MAX_QTY], a LIMIT
        without a price in (0, MAX_PRICE] (shared/money.py: beyond anything traded, and what keeps
        every notional, fee and cash sum exact at 50 digits), or a post-only (GTX) MARKET order."""
        if not 0 < req.qty <= MAX_QTY:
            raise ValueError(f"qty must be in (0, {MAX_QTY}], got {req.qty}")
        if req.kind is OrderKind.LIMIT and (req.price is None or not 0 < req.price <= MAX_PRICE):
            raise ValueError(f"a LIMIT order needs a price in (0, {MAX_PRICE}]")
        if req.tif is TimeInForce.GTX and req.kind is not OrderKind.LIMIT:
            raise ValueError("post-only (GTX) is for LIMIT orders only")
        price = req.price if req.kind is OrderKind.LIMIT else None
        return cls(order_id=order_id, client_order_id=req.client_order_id, strategy=req.strategy,
                   symbol=req.symbol, side=req.side, kind=req.kind, tif=req.tif, qty=req.qty,
                   price=price, created_ts=now_ns, updated_ts=now_ns)

    @classmethod
    def rejected(cls, req: OrderRequest, order_id: str, now_ns: int, reason: str) -> "Order":
        """A REJECTED order for a request that cannot even become a PENDING order (kept for idempotency)."""
        order = cls(order_id=order_id, client_order_id=req.client_order_id, strategy=req.strategy,
                    symbol=req.symbol, side=req.side, kind=req.kind, tif=req.tif, qty=req.qty,
                    price=req.price, created_ts=now_ns, updated_ts=now_ns)
        order.reject(reason, now_ns)
        return order

    @property
    def remaining(self) -> Decimal:
        return self.qty - self.filled_qty

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def avg_price(self) -> Decimal | None:
        """Average fill price rounded half-even to 1e-8; None before any fill."""
        if not self.filled_qty:
            return None
        cached = self._avg
        if cached is not None and cached[0] is self.notional and cached[1] is self.filled_qty:
            return cached[2]
        with localcontext(MONEY):
            avg = canonical((self.notional / self.filled_qty).quantize(STEP, ROUND_HALF_EVEN))
        self._avg = (self.notional, self.filled_qty, avg)
        return avg

    def copy(self) -> "Order":
        """The same order as a new object (what dataclasses.replace(order) makes, for less)."""
        new = Order(self.order_id, self.client_order_id, self.strategy, self.symbol, self.side, self.kind,
                    self.tif, self.qty, self.price, self.created_ts, self.status, self.filled_qty, self.notional,
                    self.fill_count, self.reason, self.updated_ts)
        new._avg = self._avg
        return new

    def fill(self, price: Decimal, qty: Decimal, ts: int) -> str:
        """Apply one fill; returns its fill id. Raises InvalidTransition for a
        terminal order, qty ≤ 0, a price ≤ 0, or qty beyond what remains."""
        if qty <= 0 or price <= 0:
            raise InvalidTransition(f"fill of {qty} @ {price} on {self.order_id}")
        if qty > self.remaining:
            raise InvalidTransition(f"fill of {qty} > remaining {self.remaining} on {self.order_id}")
        trigger = Trigger.FILL if qty == self.remaining else Trigger.PARTIAL_FILL
        self.status = next_status(self.status, trigger)
        self.filled_qty += qty
        with localcontext(MONEY):
            self.notional += price * qty
        self.fill_count += 1
        self.updated_ts = ts
        return f"{self.order_id}-{self.fill_count}"

    def cancel(self, reason: str, ts: int) -> None:
        """PENDING/PARTIALLY_FILLED -> CANCELLED; raises InvalidTransition otherwise."""
        self.status = next_status(self.status, Trigger.CANCEL)
        self.reason, self.updated_ts = reason, ts

    def reject(self, reason: str, ts: int) -> None:
        """PENDING -> REJECTED; raises InvalidTransition otherwise."""
        self.status = next_status(self.status, Trigger.REJECT)
        self.reason, self.updated_ts = reason, ts


def ack_for(order: Order, fills: Iterable[Fill], ts: int, reason: str | None = None) -> Ack:
    """The broker's reply for `order` with the given fills (taken as they are: the broker made
    them); `reason` overrides the order's."""
    return Ack(ts=ts, client_order_id=order.client_order_id, order_id=order.order_id,
               status=order.status, filled_qty=order.filled_qty, avg_price=order.avg_price,
               fills=list(fills), reason=order.reason if reason is None else reason)


def order_event(order: Order, ts: int) -> OrderEvent:
    """`order.{SYMBOL}` event for the order's current state."""
    return OrderEvent(ts=ts, order_id=order.order_id, client_order_id=order.client_order_id,
                      symbol=order.symbol, status=order.status, filled_qty=order.filled_qty,
                      avg_price=order.avg_price, reason=order.reason)


@dataclass(slots=True)
class Account:
    """Paper cash (one quote asset) and base positions per symbol, moved only by fills."""
    cash: Decimal
    positions: dict[str, Decimal] = field(default_factory=dict)
    last_price: dict[str, Decimal] = field(default_factory=dict)

    def apply(self, symbol: str, side: Side, price: Decimal, qty: Decimal, fee_paid: Decimal,
              fee_asset: str | None = None) -> None:
        """Book one fill: BUY pays price*qty, SELL receives it; the fee is paid either
        way, from cash when `fee_asset` is the quote asset (or None), else from the position."""
        in_base = fee_asset is not None and fee_asset != quote_asset(symbol)
        with localcontext(MONEY):
            self.cash -= side.sign * price * qty + (ZERO if in_base else fee_paid)
            received = side.sign * qty - (fee_paid if in_base else ZERO)
            self.positions[symbol] = self.positions.get(symbol, ZERO) + received
        self.last_price[symbol] = price

    def equity(self, marks: Mapping[str, Decimal]) -> Decimal:
        """Cash plus each position marked at `marks[symbol]`, else at its last fill price."""
        total = self.cash
        with localcontext(MONEY):
            for symbol, pos in self.positions.items():
                if pos:
                    total += pos * marks.get(symbol, self.last_price.get(symbol, ZERO))
        return total
