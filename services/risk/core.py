"""Pure risk core: pre-trade checks returning reason codes, the trading state, and the position ledger."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import TYPE_CHECKING, Iterable, Mapping

from shared.enums import ControlAction, OrderKind, Side, TradingState
from shared.messages import OrderRequest

if TYPE_CHECKING:
    from shared.config import Config

ZERO = Decimal(0)
STEP = Decimal("1e-8")
COST_STEP = Decimal("1e-12")  # the cost taken off a partly closed position is rounded here, once
# 8-decimal prices times 8-decimal quantities need more than the default 28
# digits at the extremes; with 50 every sum and product below is exact.
MONEY = Context(prec=50)
SEEN_FILLS_MAX = 200_000  # fill ids remembered for exactly-once; duplicates arrive within moments


class Reason:
    """Denial codes (Decision.reason["code"])."""
    HALTED = "HALTED"
    REDUCE_ONLY = "REDUCE_ONLY"
    NON_POSITIVE_QTY = "NON_POSITIVE_QTY"
    BAD_PRICE = "BAD_PRICE"
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    STALE_BOOK = "STALE_BOOK"
    MAX_POSITION = "MAX_POSITION"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    BROKER_ERROR = "BROKER_ERROR"


TEXTS = {
    Reason.HALTED: "trading is halted",
    Reason.REDUCE_ONLY: "trading state is REDUCING: only orders that shrink a position",
    Reason.NON_POSITIVE_QTY: "quantity must be positive",
    Reason.BAD_PRICE: "a LIMIT order needs a positive price",
    Reason.UNKNOWN_SYMBOL: "symbol is not traded here",
    Reason.STALE_BOOK: "no fresh order book for the symbol",
    Reason.MAX_POSITION: "position including this order (and working orders) would exceed the limit",
    Reason.BROKER_UNAVAILABLE: "broker did not answer",
    Reason.BROKER_ERROR: "broker could not read the order",
}


@dataclass(frozen=True, slots=True)
class Denial:
    """A pre-trade rejection: data, not an exception."""
    code: str
    text: str

    def as_reason(self) -> dict:
        return {"code": self.code, "text": self.text}


# -- checks: each returns a reason code or None ------------------------------------

def check_state(state: TradingState, position: Decimal, order: OrderRequest) -> str | None:
    """HALTED denies everything; REDUCING allows only orders that shrink |position| without flipping it."""
    if state is TradingState.HALTED:
        return Reason.HALTED
    if state is TradingState.REDUCING:
        reduces = position * order.side.sign < 0 and order.qty <= abs(position)
        return None if reduces else Reason.REDUCE_ONLY
    return None


def check_qty(order: OrderRequest) -> str | None:
    """NON_POSITIVE_QTY for qty ≤ 0."""
    return Reason.NON_POSITIVE_QTY if order.qty <= 0 else None


def check_price(order: OrderRequest) -> str | None:
    """BAD_PRICE for a LIMIT order without a positive price."""
    if order.kind is OrderKind.LIMIT and (order.price is None or order.price <= 0):
        return Reason.BAD_PRICE
    return None


def check_symbol(order: OrderRequest, symbols: frozenset[str]) -> str | None:
    """UNKNOWN_SYMBOL unless the order's symbol is one of `symbols` (cfg.md.symbols)."""
    return None if order.symbol in symbols else Reason.UNKNOWN_SYMBOL


def check_book(last_book_ns: int | None, now_ns: int, stale_ns: int) -> str | None:
    """Stale when no book ever arrived or the last one is older than `stale_ns`."""
    if last_book_ns is None or now_ns - last_book_ns > stale_ns:
        return Reason.STALE_BOOK
    return None


def check_max_position(position: Decimal, working: Decimal, order: OrderRequest,
                       max_position: Decimal) -> str | None:
    """Worst case on the order's side: position, plus what working orders on that
    side may still fill (`working` ≥ 0), plus this order; its absolute value must stay ≤ the limit."""
    worst = position + order.side.sign * (working + order.qty)
    return Reason.MAX_POSITION if abs(worst) > max_position else None


# -- ledger ---------------------------------------------------------------------------

@dataclass(slots=True)
class Position:
    """One symbol's position with an average-cost basis. `cost` is signed
    (qty * average entry price), so realized - cost changes by exactly the
    fill's cash flow: the ledger balances to the last digit."""
    qty: Decimal = ZERO
    cost: Decimal = ZERO
    realized: Decimal = ZERO
    fees: Decimal = ZERO
    last_price: Decimal = ZERO
    mark: Decimal | None = None

    @property
    def avg_price(self) -> Decimal | None:
        """Average entry price of the open quantity, rounded half-even to 1e-8; None when flat."""
        if not self.qty:
            return None
        with localcontext(MONEY):
            return (self.cost / self.qty).quantize(STEP, ROUND_HALF_EVEN)

    def unrealized(self) -> Decimal:
        """qty marked at the book mid (or the last fill price before any book) minus its cost."""
        mark = self.last_price if self.mark is None else self.mark
        with localcontext(MONEY):
            return self.qty * mark - self.cost

    def apply(self, side: Side, qty: Decimal, price: Decimal, fee: Decimal) -> None:
        """Book one fill: close against the open quantity first (realizing P&L), open with the rest."""
        sign = side.sign
        with localcontext(MONEY):
            left = qty
            if self.qty and (self.qty > 0) != (sign > 0):
                closing = min(qty, abs(self.qty))
                if closing == abs(self.qty):
                    removed = self.cost
                else:
                    removed = (self.cost * closing / abs(self.qty)).quantize(COST_STEP, ROUND_HALF_EVEN)
                self.realized += -sign * closing * price - removed
                self.cost -= removed
                self.qty += sign * closing
                left -= closing
            if left:
                self.qty += sign * left
                self.cost += sign * left * price
            self.fees += fee
        self.last_price = price


def _dec(value: object, name: str) -> Decimal:
    # Money never passes through float (DESIGN.md, exactness).
    if isinstance(value, (float, bool)) or not isinstance(value, (str, int, Decimal)):
        raise ValueError(f"{name}: expected a decimal string, got {type(value).__name__}")
    d = Decimal(value)
    if not d.is_finite():
        raise ValueError(f"{name}: not finite")
    return d


class RiskEngine:
    """Pre-trade checks, trading state and positions. Pure: time comes in as `now_ns`.

    `symbols`: traded symbols (upper case); `max_position`: max |base position| per
    symbol; `stale_book_ms`: a book older than this denies orders (STALE_BOOK)."""

    def __init__(self, symbols: Iterable[str], max_position: Decimal, stale_book_ms: int,
                 state: TradingState = TradingState.ACTIVE) -> None:
        self.symbols = frozenset(s.upper() for s in symbols)
        self.max_position = max_position
        self.stale_ns = stale_book_ms * 1_000_000
        self.state = state
        self.state_reason = ""
        self.positions: dict[str, Position] = {}
        self.book_ns: dict[str, int] = {}
        self.working: dict[str, list] = {}  # client_order_id -> [symbol, side, remaining]
        self.peak: Decimal | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: "Config") -> "RiskEngine":
        return cls(cfg.md.symbols, cfg.risk.max_position, cfg.risk.stale_book_ms)

    def position(self, symbol: str) -> Position:
        pos = self.positions.get(symbol)
        if pos is None:
            pos = self.positions[symbol] = Position()
        return pos

    def working_qty(self, symbol: str, side: Side) -> Decimal:
        """What working (resting) orders on `side` of `symbol` may still fill."""
        return sum((w[2] for w in self.working.values() if w[0] == symbol and w[1] is side), ZERO)

    # -- decisions --------------------------------------------------------------------

    def check(self, order: OrderRequest, now_ns: int) -> Denial | None:
        """None to approve `order` at `now_ns`, else the first Denial of the checks, in order:
        state, qty, price, symbol, stale book, max position."""
        pos = self.positions.get(order.symbol)
        qty = pos.qty if pos is not None else ZERO
        code = (check_state(self.state, qty, order)
                or check_qty(order)
                or check_price(order)
                or check_symbol(order, self.symbols)
                or check_book(self.book_ns.get(order.symbol), now_ns, self.stale_ns)
                or check_max_position(qty, self.working_qty(order.symbol, order.side), order,
                                      self.max_position))
        if code is None:
            return None
        return Denial(code, f"{TEXTS[code]} ({order.side.value} {order.qty} {order.symbol}, "
                            f"position {qty}, limit {self.max_position}, state {self.state.value})")

    def control(self, action: ControlAction, reason: str = "") -> bool:
        """HALT -> HALTED, RESUME -> ACTIVE, FLATTEN -> REDUCING (only position-reducing
        orders pass), STATE -> no change. Returns whether the state changed."""
        if action is ControlAction.STATE:
            return False
        target = {ControlAction.HALT: TradingState.HALTED, ControlAction.RESUME: TradingState.ACTIVE,
                  ControlAction.FLATTEN: TradingState.REDUCING}[action]
        changed = target is not self.state
        self.state, self.state_reason = target, reason
        return changed

    # -- events -------------------------------------------------------------------------

    def on_book(self, symbol: str, mid: float | Decimal, now_ns: int) -> None:
        """A book for `symbol` was received at `now_ns`; its mid becomes the mark."""
        self.book_ns[symbol] = now_ns
        self.on_mark(symbol, mid)

    def on_mark(self, symbol: str, price: float | Decimal) -> None:
        """Mark `symbol` at `price` (a book float goes through repr, never binary float math)."""
        if not isinstance(price, Decimal):
            price = Decimal(repr(price)).quantize(STEP)
        if price > 0:  # a one-sided book has no mid; keep the last mark
            self.position(symbol).mark = price

    def on_fill(self, fill: Mapping) -> bool:
        """Apply a fill map (`fill_id`, `symbol`, `side`, `price`, `qty`, `fee`; decimal
        strings or Decimals) once per fill_id. Returns False for a duplicate.
        Raises ValueError for a malformed map (nothing applied)."""
        try:
            fill_id = fill["fill_id"]
            symbol, side = fill["symbol"], Side(fill["side"])
            price, qty = _dec(fill["price"], "price"), _dec(fill["qty"], "qty")
            fee = _dec(fill.get("fee", 0), "fee")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed fill: {exc!r}") from None
        if type(fill_id) is not str or type(symbol) is not str or qty <= 0 or price <= 0:
            raise ValueError(f"malformed fill {fill_id!r}")
        if fill_id in self._seen:
            return False
        self._seen[fill_id] = None
        if len(self._seen) > SEEN_FILLS_MAX:
            self._seen.popitem(last=False)
        self.position(symbol).apply(side, qty, price, fee)
        work = self.working.get(fill.get("client_order_id", ""))
        if work is not None:
            work[2] -= qty
            if work[2] <= 0:
                del self.working[fill["client_order_id"]]
        return True

    def track(self, client_order_id: str, symbol: str, side: Side, remaining: Decimal) -> None:
        """A resting order that may still fill `remaining`; counted by the max-position check."""
        if remaining > 0:
            self.working[client_order_id] = [symbol, side, remaining]

    def untrack(self, client_order_id: str) -> None:
        """The order reached a terminal status."""
        self.working.pop(client_order_id, None)

    # -- figures --------------------------------------------------------------------------

    def realized(self) -> Decimal:
        return sum((p.realized for p in self.positions.values()), ZERO)

    def fees(self) -> Decimal:
        return sum((p.fees for p in self.positions.values()), ZERO)

    def unrealized(self) -> Decimal:
        return sum((p.unrealized() for p in self.positions.values()), ZERO)

    def equity(self, start_cash: Decimal) -> Decimal:
        """start cash + realized - fees + unrealized (fees are taken to be in the quote asset)."""
        with localcontext(MONEY):
            return start_cash + self.realized() - self.fees() + self.unrealized()

    def observe_equity(self, equity: Decimal) -> Decimal:
        """Track the peak; returns the drawdown from it as a fraction (0 at a new peak)."""
        if self.peak is None or equity > self.peak:
            self.peak = equity
        if self.peak <= 0:
            return ZERO
        with localcontext(MONEY):
            return ((self.peak - equity) / self.peak).quantize(STEP, ROUND_HALF_EVEN)

    def position_map(self) -> dict[str, str]:
        """symbol -> signed base position as a decimal string (ControlReply.positions)."""
        return {s: str(p.qty) for s, p in sorted(self.positions.items()) if p.qty or p.realized}
