"""Pure top-of-book imbalance strategy: books and decisions in, order intents out."""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

from shared.config import StrategyConfig
from shared.enums import OrderKind, Side, TimeInForce, Verdict
from shared.messages import Book, Decision
from shared.money import MONEY, ZERO


MAX_POSITION = Decimal("1e12")  # a position risk reports at or above this is not one (sync refuses it)


@dataclass(frozen=True, slots=True)
class OrderIntent:
    """An order the strategy wants sent; the shell turns it into an OrderRequest."""
    client_order_id: str
    symbol: str
    side: Side
    qty: Decimal
    kind: OrderKind = OrderKind.MARKET
    confidence: float = 0.0
    signal_ts: int = 0  # recv_ts of the triggering book (its ts when recv_ts is unknown)
    price: Decimal | None = None  # LIMIT orders
    tif: TimeInForce = TimeInForce.GTC  # GTX: post-only
    reason: str = ""  # why it was sent ("entry", "exit:stop_loss", ...), for the log and the signal row


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one decision did to the strategy's state (for the shell's log line)."""
    client_order_id: str
    symbol: str
    verdict: Verdict
    filled_qty: Decimal
    avg_price: Decimal | None
    position: Decimal


@dataclass(slots=True)
class _SymbolState:
    position: Decimal = ZERO
    in_flight: OrderIntent | None = None
    last_order_ns: int | None = None


@dataclass(slots=True)
class Features:
    """The latest book metrics per symbol; thin on purpose (issue #2)."""
    imbalance: dict[str, float] = field(default_factory=dict)
    mid: dict[str, float] = field(default_factory=dict)
    books: int = 0

    def update(self, book: Book) -> float:
        """Record `book`'s metrics; returns its top-N imbalance in [-1, 1]."""
        self.books += 1
        self.imbalance[book.symbol] = book.imbalance
        self.mid[book.symbol] = book.mid
        return book.imbalance


def fills_of(decision: Decision, side: Side, max_qty: Decimal | None = None) -> tuple[Decimal, Decimal | None]:
    """(signed filled base qty, average price) from a decision's broker ack for an order on `side`.

    The ack was checked field by field when the decision was decoded (shared/messages.py: every
    amount an exact wire decimal); what is left is whether it is credible for this order. The
    fills are authoritative; an ack without fills falls back to its `filled_qty`. Raises
    ValueError for an ack that is not: a fill on the other side, a negative quantity, or more
    filled than `max_qty` (the order's qty). Nothing is applied then: a spot long/flat position
    driven short or past its order by a lying ack would never trade again."""
    ack = decision.order
    if ack is None:
        return ZERO, None
    qty, notional = ZERO, ZERO
    for i, fill in enumerate(ack.fills):
        if fill.qty < 0:
            raise ValueError(f"fills[{i}].qty is negative")
        if fill.side is not side:
            raise ValueError(f"fills[{i}].side: expected {side.value}, the order's side")
        qty = MONEY.add(qty, fill.qty)
        notional = MONEY.add(notional, MONEY.multiply(fill.qty, fill.price))
    if not ack.fills:
        qty = ack.filled_qty
    if qty < 0 or (max_qty is not None and qty > max_qty):
        raise ValueError(f"filled {qty} of an order for {max_qty}")
    avg = ack.avg_price
    if avg is None and ack.fills and qty:
        avg = MONEY.divide(notional, qty)
    return (qty if side.sign > 0 else qty.copy_negate()), avg  # copy_negate: exact at any length


def credible(book: Book) -> bool:
    """Whether the strategy may decide on `book`: its imbalance is a share in [-1, 1] (top-N
    (bid - ask) / (bid + ask)); anything else was not computed from a real book."""
    return -1.0 <= book.imbalance <= 1.0


class ImbalanceStrategy:
    """Spot long/flat on top-N book imbalance.

    Flat and imbalance ≥ threshold → BUY `cfg.qty` MARKET; long and
    imbalance ≤ −threshold → SELL the whole position MARKET. At most one
    order in flight per symbol and `cfg.cooldown_ms` between orders. Time is
    always an argument (event time in backtests, wall clock live)."""

    def __init__(self, cfg: StrategyConfig, symbols: Iterable[str], id_prefix: str | None = None) -> None:
        self.cfg = cfg
        self.threshold = cfg.imbalance
        self.cooldown_ns = cfg.cooldown_ms * 1_000_000
        # the prefix must differ between runs (the shell adds its start time):
        # client_order_id is the idempotency key at risk and the broker
        self.id_prefix = id_prefix or cfg.name
        self.features = Features()
        self._state = {s.upper(): _SymbolState() for s in symbols}
        self.refused_books = 0  # books not credible (see `credible`): counted, never decided on
        self._by_cid: dict[str, str] = {}
        self._n = 0

    def trades(self, symbol: str) -> bool:
        """Whether `symbol` is one of the strategy's symbols (books of others are ignored)."""
        return symbol in self._state

    def position(self, symbol: str) -> Decimal:
        """The strategy's own base position in `symbol` (exact)."""
        return self._state[symbol].position

    def in_flight(self, symbol: str) -> OrderIntent | None:
        """The order waiting for its decision in `symbol`, if any."""
        return self._state[symbol].in_flight

    def sync(self, positions: dict[str, Decimal]) -> dict[str, Decimal]:
        """Take risk's position of each traded symbol with no order in flight (a symbol risk does
        not list is flat); returns the positions that changed. A negative position (not a spot
        account's) is taken as flat: this strategy never sells what it does not hold."""
        for symbol, qty in positions.items():
            if symbol in self._state and not qty < MAX_POSITION:
                raise ValueError(f"{symbol[:24]}: a position of {str(qty)[:40]} is not credible")
        changed = {}
        for symbol, st in self._state.items():
            if st.in_flight is not None:
                continue
            qty = max(positions.get(symbol, ZERO), ZERO)
            if qty != st.position:
                st.position = changed[symbol] = qty
        return changed

    def on_book(self, book: Book, now_ns: int) -> OrderIntent | None:
        """Feed one book; returns the order to send now, or None.

        A returned intent is in flight until `on_decision` gets its answer."""
        st = self._state.get(book.symbol)
        if st is None:
            return None  # a symbol we were not configured for
        if not credible(book):
            self.refused_books += 1
            return None
        imbalance = self.features.update(book)
        if st.in_flight is not None:
            return None
        if st.last_order_ns is not None and now_ns - st.last_order_ns < self.cooldown_ns:
            return None
        if st.position == ZERO and imbalance >= self.threshold:
            side, qty = Side.BUY, self.cfg.qty
        elif st.position > ZERO and imbalance <= -self.threshold:
            side, qty = Side.SELL, st.position
        else:
            return None
        self._n += 1
        intent = OrderIntent(client_order_id=f"{self.id_prefix}-{self._n}", symbol=book.symbol, side=side,
                             qty=qty, confidence=min(abs(imbalance), 1.0),
                             signal_ts=book.recv_ts or book.ts)
        st.in_flight = intent
        st.last_order_ns = now_ns
        self._by_cid[intent.client_order_id] = book.symbol
        return intent

    def on_decision(self, decision: Decision) -> Outcome | None:
        """Apply risk's answer to the order in flight with the same client_order_id.

        Fills move the position (exact Decimal); a rejection changes nothing
        but clears the in-flight flag. Returns None for an unknown id. Raises
        ValueError on a malformed ack, after clearing the flag (nothing applied)."""
        symbol = self._by_cid.pop(decision.client_order_id, None)
        if symbol is None:
            return None
        st = self._state[symbol]
        intent, st.in_flight = st.in_flight, None
        if decision.verdict is Verdict.REJECTED or intent is None:
            return Outcome(decision.client_order_id, symbol, decision.verdict, ZERO, None, st.position)
        signed, avg = fills_of(decision, intent.side, intent.qty)
        st.position += signed
        return Outcome(decision.client_order_id, symbol, decision.verdict, abs(signed), avg, st.position)
