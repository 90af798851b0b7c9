"""FillModel: the pure paper exchange — latency queue, book walking, queue positions, maker/taker fees."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Iterable, Mapping

from services.broker import core, market as mkt
from services.broker.core import Order
from services.broker.latency import LatencyModel
from services.broker.market import Market, Refused, check_book, check_trade, to_dec, to_units
from services.broker.queue import UNIT, QueuePos, RiskAverseQueue
from shared.enums import Liquidity, OrderKind, Side, TimeInForce
from shared import money
from shared.messages import Book, Fill, Trade

if TYPE_CHECKING:
    from shared.config import Config

NEW, CANCEL = 0, 1
# Update.event
ARRIVED = "ARRIVED"  # a new order reached the exchange: matched, rested or rejected (answer its request)
FILLED = "FILLED"  # a resting order filled (some or all)
CANCELLED = "CANCELLED"  # a cancel took effect (answer the cancel)
NOT_OPEN = "NOT_OPEN"  # a cancel arrived after the order had finished (answer the cancel)
FEE_MODES = ("quote", "received")


def lot_units(lot: Decimal) -> int:
    """A symbol's quantity step (Binance's LOT_SIZE stepSize) -> the smallest positive number of
    1e-8 units that is a multiple of it: 0.00001 -> 1000; a step off the 1e-8 grid (1.5e-8) -> the
    least common multiple (3). Raises ValueError for a step that is not a positive finite number."""
    if not isinstance(lot, Decimal) or not lot.is_finite() or lot <= 0:
        raise ValueError(f"a lot size must be a positive decimal, got {lot!r}")
    return (Fraction(lot) * UNIT).numerator


def lot_sizes(cfg: "Config") -> dict[str, Decimal]:
    """Each traded symbol's lot size as risk has it (services/risk/limits.py from_config): the
    QF_RISK_SYMBOL_LIMITS override's `lot_size`, else QF_RISK_LOT_SIZE. For FillModel(lots=...)."""
    from services.risk.limits import parse_symbol_limits
    overrides = parse_symbol_limits(cfg.risk.symbol_limits)
    return {sym: overrides.get(sym, {}).get("lot_size", cfg.risk.lot_size) for sym in cfg.md.symbols}


@dataclass(slots=True)
class Working:
    """An order the exchange holds: in flight until `arrival_ts` is set, then resting."""
    order: Order
    decision_mid: Decimal | None
    price_u: int | None
    arrival_ts: int | None = None  # on our clock: when the book as of its arrival is seen here
    arrival_mid: Decimal | None = None
    queue: QueuePos = field(default_factory=QueuePos)
    lot: int = 1  # the symbol's quantity step in 1e-8 units: every maker fill but a completing one is a multiple
    buy: bool = field(init=False)

    def __post_init__(self) -> None:
        self.buy = self.order.side is Side.BUY


@dataclass(slots=True)
class Update:
    """What happened to one order in one call; the shell commits it, then tells."""
    event: str
    client_order_id: str
    order: Order | None  # a copy, as this update left it; None for NOT_OPEN on an order no longer held
    fills: list[Fill] = field(default_factory=list)
    cancel_token: int | None = None
    working: Working | None = None  # arrival time and mids, for storage


class FillModel:
    """Paper exchange for any number of symbols; no I/O and no clock: every call takes
    `now` (ns, one clock for orders, books and trades). Rules: docs/fill-model.md.

    `submit(order, now)` puts a new order in flight; it reaches the book after
    the entry latency and is processed when that book state is visible here
    (`now + entry + feed lag`), by `advance`, `on_book` or `on_trade`, against
    the book as it stood then. Requests travel in order (one connection), so
    none overtakes an earlier one. Each call returns the Updates it made.

    Books and trades are checked once, as they arrive (market.check_book /
    check_trade): one the broker cannot trust changes nothing but the symbol's
    trust (an order arriving meanwhile is REJECTED `BAD_BOOK`) and is counted by
    reason; `refusals()` hands the counts over. `symbols`: the only symbols whose
    books are kept (None: any, up to market.MAX_MARKETS).

    `lots`: each symbol's quantity step (risk's lot size: `lot_sizes(cfg)`); a resting order's
    maker fills are multiples of it, rounded down, the rest resting (docs/fill-model.md, rule 4).
    A symbol without one fills on the 1e-8 grid. Raises ValueError for a bad fee mode or lot."""

    def __init__(self, taker_fee: Decimal, maker_fee: Decimal, queue: RiskAverseQueue,
                 latency: LatencyModel, fee_asset: str = "quote", symbols: Iterable[str] | None = None,
                 lots: Mapping[str, Decimal] | None = None) -> None:
        if fee_asset not in FEE_MODES:
            raise ValueError(f"fee_asset must be one of {FEE_MODES}, got {fee_asset!r}")
        self.lots: dict[str, int] = {sym: lot_units(lot) for sym, lot in (lots or {}).items()}
        self.taker_fee, self.maker_fee = taker_fee, maker_fee
        self.queue, self.latency, self.fee_asset = queue, latency, fee_asset
        self.symbols = None if symbols is None else frozenset(symbols)
        self.markets: dict[str, Market] = {}
        self._refused: dict[str, int] = {}  # Refused.reason -> books and trades refused since refusals()
        self._last_refusal: Refused | None = None
        self.working: dict[str, Working] = {}  # client_order_id -> in flight or resting
        self.resting: dict[str, dict[str, Working]] = {}  # symbol -> client_order_id -> resting
        self._pending: list[tuple[int, int, int, str, int | None]] = []  # (due, seq, kind, coid, token)
        self._seq = 0
        self._last_due = 0

    # -- requests ----------------------------------------------------------------------

    @staticmethod
    def check(order: Order) -> None:
        """Raise ValueError when the order's qty or price is not on the 1e-8 grid."""
        to_units(order.qty)
        if order.price is not None:
            to_units(order.price)

    def _due(self, now: int) -> int:
        due = max(now + self.latency.entry_ns() + self.latency.visible_ns(), self._last_due)
        self._last_due = due
        self._seq += 1
        return due

    def submit(self, order: Order, now: int) -> int:
        """Put a new PENDING order in flight; returns when it will be processed.
        Raises ValueError for an off-grid qty or price, or a client_order_id already held."""
        self.check(order)
        if order.client_order_id in self.working:
            raise ValueError(f"{order.client_order_id} is already held")
        market = self.markets.get(order.symbol)
        price_u = to_units(order.price) if order.kind is OrderKind.LIMIT else None
        self.working[order.client_order_id] = Working(order, market.mid if market else None, price_u,
                                                      lot=self.lots.get(order.symbol, 1))
        due = self._due(now)
        heapq.heappush(self._pending, (due, self._seq, NEW, order.client_order_id, None))
        return due

    def cancel(self, client_order_id: str, now: int, token: int) -> bool:
        """Send a cancel for an order held here (in flight or resting); it takes
        effect after the latency. False when the model does not hold the order."""
        if client_order_id not in self.working:
            return False
        due = self._due(now)
        heapq.heappush(self._pending, (due, self._seq, CANCEL, client_order_id, token))
        return True

    def restore(self, order: Order, arrival_ts: int | None, decision_mid: Decimal | None,
                arrival_mid: Decimal | None) -> None:
        """Hold an open order rebuilt from storage. Its queue place was not kept:
        it joins the back of its level at the next book (conservative)."""
        price_u = to_units(order.price) if order.price is not None else None
        w = Working(order, decision_mid, price_u, arrival_ts if arrival_ts is not None else order.created_ts,
                    arrival_mid, lot=self.lots.get(order.symbol, 1))
        self.working[order.client_order_id] = w
        self.resting.setdefault(order.symbol, {})[order.client_order_id] = w

    def in_flight(self, client_order_id: str) -> bool:
        w = self.working.get(client_order_id)
        return w is not None and w.arrival_ts is None

    @property
    def pending(self) -> int:
        """Requests in flight (orders and cancels not yet processed)."""
        return len(self._pending)

    def next_due(self) -> int | None:
        """When the next in-flight request is to be processed (None: nothing in flight)."""
        return self._pending[0][0] if self._pending else None

    def mark(self, symbol: str) -> Decimal | None:
        market = self.markets.get(symbol)
        return market.mid if market else None

    def marks(self) -> dict[str, Decimal]:
        return {s: m.mid for s, m in self.markets.items() if m.mid is not None}

    def refusals(self) -> tuple[dict[str, int], Refused | None]:
        """Books and trades refused since the last call, counted by reason, and the last of them
        (for a log line); both reset. Call after on_book/on_trade, as often as convenient."""
        counts, last = self._refused, self._last_refusal
        if counts:
            self._refused, self._last_refusal = {}, None
        return counts, last

    def _refuse(self, exc: Refused) -> None:
        self._refused[exc.reason] = self._refused.get(exc.reason, 0) + 1
        self._last_refusal = exc

    # -- time and market events ----------------------------------------------------------

    def advance(self, now: int) -> list[Update]:
        """Process every request due at or before `now` against the books as they are."""
        out: list[Update] = []
        pending = self._pending
        while pending and pending[0][0] <= now:
            due, _, kind, coid, token = heapq.heappop(pending)
            if kind == NEW:
                out.append(self._arrive(self.working[coid], due))
            else:
                out.append(self._cancel(coid, token, due))
        return out

    def on_book(self, book: Book, now: int) -> list[Update]:
        """A new book at `now`: requests due before it meet the previous book; then
        resting orders advance in their queues and fill where the book crosses them.
        A refused book (counted) leaves the symbol's book untrusted and fills nothing."""
        market = self.markets.get(book.symbol)
        try:
            if market is None and (len(self.markets) >= mkt.MAX_MARKETS if self.symbols is None
                                   else book.symbol not in self.symbols):
                raise Refused(mkt.SYMBOL, book.symbol[:40])
            bids, asks = check_book(book)
        except Refused as exc:
            self._refuse(exc)
            out = self.advance(now)
            if market is not None:
                market.distrust()
            return out
        self.latency.feed.observe(book.recv_ts, book.exch_ts)
        out = self.advance(now)
        if market is None:
            market = self.markets[book.symbol] = Market(book, bids, asks)
        else:
            market.update(book, bids, asks)
        resting = self.resting.get(book.symbol)
        if resting:
            queue, bids, asks = self.queue, market.bids, market.asks
            best_bid, best_ask = bids.best, asks.best
            for w in list(resting.values()):  # insertion order is arrival order: time priority
                p, buy = w.price_u, w.buy
                own = bids if buy else asks
                worst = own.worst
                if worst is None or (p >= worst if buy else p <= worst):  # the book shows our price
                    new, q = own.sizes.get(p, 0), w.queue
                    if q.ahead is None or new != q.level or q.traded:
                        queue.level(q, new)
                if (best_ask is not None and best_ask <= p) if buy else (best_bid is not None and best_bid >= p):
                    fills = self._cross(w, market, now, book.exch_ts)
                    if fills:
                        out.append(self._filled(w, fills))
        return out

    def on_trade(self, trade: Trade, now: int) -> list[Update]:
        """A market trade at `now`: it advances the queues at its price, fills the
        orders it reaches, and fills in full every order whose price it traded through.
        A trade that could fill something is checked first; a bad one (counted) fills nothing."""
        if trade.exch_ts <= mkt.MAX_EXCH_MS:
            self.latency.feed.observe(trade.recv_ts, trade.exch_ts)
        out = self.advance(now)
        resting = self.resting.get(trade.symbol)
        if not resting:
            return out
        try:
            price, qty = check_trade(trade)
        except Refused as exc:
            self._refuse(exc)
            return out
        seller_took = trade.buyer_is_maker  # the aggressor sold: bids were hit
        used = 0  # of this trade, what our earlier orders at its price took (they are ahead of later ones)
        for w in list(resting.values()):  # time priority
            p, buy = w.price_u, w.buy
            if p != price and ((price > p) if buy else (price < p)):
                continue  # the common case: a trade away from our price
            order = w.order
            if (price < p) if buy else (price > p):
                out.append(self._filled(w, [self._fill(w, p, to_units(order.remaining), Liquidity.MAKER,
                                                       now, trade.exch_ts)]))
            elif price == p and seller_took == buy:
                reach = _on_lot(self.queue.trade(w.queue, qty) - used, to_units(order.remaining), w.lot)
                if reach > 0:
                    used += reach
                    out.append(self._filled(w, [self._fill(w, p, reach, Liquidity.MAKER, now, trade.exch_ts)]))
        return out

    # -- internals --------------------------------------------------------------------------

    def _arrive(self, w: Working, now: int) -> Update:
        order = w.order
        w.arrival_ts = now
        market = self.markets.get(order.symbol)
        if market is None or not market.trusted:
            order.reject(core.NO_BOOK if market is None else core.BAD_BOOK, now)
            return self._done(Update(ARRIVED, order.client_order_id, order, working=w))
        w.arrival_mid = market.mid
        view = market.opposite(order.side)
        if order.tif is TimeInForce.GTX and view.best is not None and (
                view.best <= w.price_u if w.buy else view.best >= w.price_u):
            # Post-only, and the opposite side shows liquidity at or through its price: it would
            # take, so it is rejected and matches nothing (Binance spot's LIMIT_MAKER: "Order would
            # immediately match and take"). The displayed best, not less what our fills took there:
            # conservative, a post-only order never rests against liquidity the book shows.
            order.reject(core.WOULD_TAKE, now)
            return self._done(Update(ARRIVED, order.client_order_id, order, working=w))
        fills, left = [], to_units(order.qty)
        for price, avail in market.crossing(order.side, w.price_u):
            take = min(left, avail)
            market.take(view, price, take)
            fills.append(self._fill(w, price, take, Liquidity.TAKER, now, market.book.exch_ts))
            left -= take
            if not left:
                break
        if order.is_open:
            if order.kind is OrderKind.MARKET or not order.tif.rests:
                order.cancel(core.IOC_REMAINDER if fills else core.NO_LIQUIDITY, now)
            else:
                own = market.own(order.side)
                if own.best is None or own.better(w.price_u, own.best):
                    w.queue.join(0)  # a new best price: nobody is ahead
                elif own.visible(w.price_u):
                    w.queue.join(own.sizes.get(w.price_u, 0))
                # else: deeper than the book shows; it joins when its level is first seen
                self.resting.setdefault(order.symbol, {})[order.client_order_id] = w
        return self._done(Update(ARRIVED, order.client_order_id, order, fills, working=w))

    def _cross(self, w: Working, market: Market, now: int, exch_ts: int) -> list[Fill]:
        """The opposite side shows liquidity at or through our price: it arrived after
        us, so it trades with us at our price (maker), as far as it is not yet taken, on the lot."""
        order = w.order
        view = market.opposite(order.side)
        crossing = market.crossing(order.side, w.price_u)
        total = _on_lot(sum(avail for _, avail in crossing), to_units(order.remaining), w.lot)
        if total <= 0:
            return []
        rest = total
        for price, avail in crossing:
            take = min(rest, avail)
            market.take(view, price, take)
            rest -= take
            if not rest:
                break
        return [self._fill(w, w.price_u, total, Liquidity.MAKER, now, exch_ts)]

    def _cancel(self, coid: str, token: int | None, now: int) -> Update:
        w = self.working.get(coid)
        if w is None or not w.order.is_open:
            return Update(NOT_OPEN, coid, w.order if w else None, cancel_token=token, working=w)
        w.order.cancel(core.CANCELLED_BY_CLIENT, now)
        return self._done(Update(CANCELLED, coid, w.order, cancel_token=token, working=w))

    def _filled(self, w: Working, fills: list[Fill]) -> Update:
        return self._done(Update(FILLED, w.order.client_order_id, w.order, fills, working=w))

    def _done(self, update: Update) -> Update:
        order = update.order
        update.order = order.copy()  # the state this update leaves it in, whatever comes next
        if not order.is_open:
            self.working.pop(order.client_order_id, None)
            resting = self.resting.get(order.symbol)
            if resting is not None:
                resting.pop(order.client_order_id, None)
        return update

    def _fill(self, w: Working, price_u: int, qty_u: int, liquidity: Liquidity, now: int, exch_ts: int) -> Fill:
        order = w.order
        price, qty = to_dec(price_u), to_dec(qty_u)
        fill_id = order.fill(price, qty, now)
        maker = liquidity is Liquidity.MAKER
        rate = self.maker_fee if maker else self.taker_fee
        if self.fee_asset == "received" and order.side is Side.BUY:
            fee, asset = money.canonical(money.MONEY.multiply(qty, rate)), money.base_asset(order.symbol)
        else:
            fee, asset = money.fee(price, qty, rate), money.quote_asset(order.symbol)
        sign = order.side.sign
        return Fill(ts=now, fill_id=fill_id, order_id=order.order_id, client_order_id=order.client_order_id,
                    symbol=order.symbol, side=order.side, price=price, qty=qty, fee=fee, fee_asset=asset,
                    liquidity=liquidity, exch_ts=exch_ts, decision_mid=w.decision_mid, arrival_mid=w.arrival_mid,
                    slippage_decision=_slip(sign, price, w.decision_mid),
                    slippage_arrival=_slip(sign, price, w.arrival_mid),
                    queue_wait_ns=now - w.arrival_ts if maker and w.arrival_ts is not None else 0)


def _on_lot(reach: int, left: int, lot: int) -> int:
    """What a resting order fills of `reach` units that reach it, with `left` units remaining and a
    quantity step of `lot` units: all that remains when `reach` covers it, else `reach` rounded
    down to the step (the rest keeps resting). 0 or less: no fill."""
    if reach >= left:
        return left
    return reach - reach % lot if reach > 0 else reach


def _slip(sign: int, price: Decimal, mid: Decimal | None) -> Decimal | None:
    return None if mid is None else money.canonical(money.MONEY.multiply(sign, money.MONEY.subtract(price, mid)))
