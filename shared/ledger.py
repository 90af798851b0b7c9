"""The one position and P&L ledger (average cost, exact Decimals) shared by risk, the API and strategy."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Mapping

from shared.enums import Side
from shared.money import (COST_STEP, MAX_PRICE, MAX_QTY, MONEY, STEP, ZERO, UnknownAsset, base_asset, quote_asset,
                          to_decimal)

SEEN_FILLS_MAX = 200_000  # fill ids remembered for exactly-once; duplicates arrive within moments
_SIDES = {"BUY": Side.BUY, "SELL": Side.SELL, Side.BUY: Side.BUY, Side.SELL: Side.SELL}


@dataclass(slots=True)
class Position:
    """One symbol's position with an average-cost basis.

    `cost` is signed (qty × average entry price), so `realized - cost` moves by
    exactly each fill's cash flow and the ledger balances to the last digit; the
    only rounding is the cost share taken off by a partial close (to 1e-12).
    `fees` are those paid in the symbol's quote asset (they count in P&L);
    fees paid in any other asset are kept apart in `other_fees`. A fee paid in the
    base asset (a BUY's with QF_BROKER_FEE_ASSET=received) also comes off the quantity
    held, its cost unchanged (the average price rises): the P&L counts it when that
    quantity is marked or sold, as the broker's Account counts it."""
    symbol: str = ""
    qty: Decimal = ZERO
    cost: Decimal = ZERO
    realized: Decimal = ZERO
    fees: Decimal = ZERO
    other_fees: dict = field(default_factory=dict)
    last_price: Decimal | None = None
    mark: Decimal | None = None
    fills: int = 0
    trip_pnl: Decimal = ZERO  # realized - fees since the position last opened from flat
    quote: str = field(default="", repr=False)  # the symbol's quote asset, looked up once
    base: str = field(default="", repr=False)  # its base asset ("USDM:BTC" for a USD-M key, as the broker names it)

    def __post_init__(self) -> None:
        try:
            self.quote, self.base = quote_asset(self.symbol), base_asset(self.symbol)
        except UnknownAsset:  # kept all the same (the API shows what the database holds): "" and
            self.quote = ""  # every fee then counts as the quote asset's

    @property
    def avg_price(self) -> Decimal | None:
        """Average entry price of the open quantity, rounded half-even to 1e-8; None when flat."""
        if not self.qty:
            return None
        with localcontext(MONEY):
            return (self.cost / self.qty).quantize(STEP, ROUND_HALF_EVEN)

    @property
    def net_realized(self) -> Decimal:
        """Realized P&L minus the fees paid in the quote asset."""
        return self.realized - self.fees

    def price_for_mark(self) -> Decimal | None:
        """The book mid when known, else the last fill price (None before both)."""
        return self.last_price if self.mark is None else self.mark

    def unrealized(self) -> Decimal:
        """Open quantity marked at `price_for_mark()` minus its cost; 0 when flat."""
        if not self.qty:
            return ZERO
        mark = self.price_for_mark()
        with localcontext(MONEY):
            return self.qty * mark - self.cost

    def fees_by_asset(self) -> dict[str, Decimal]:
        """Every fee paid, per asset (the quote asset's under its name, or "" when unknown)."""
        out = {self.quote: self.fees} if self.fees else {}
        for asset, amount in self.other_fees.items():
            out[asset] = out.get(asset, ZERO) + amount
        return out

    def apply(self, side: Side, qty: Decimal, price: Decimal, fee: Decimal = ZERO,
              fee_asset: str = "") -> Decimal | None:
        """Book one fill: close against the open quantity first (realizing P&L at the
        average cost), open with the rest; a fee in the base asset then comes off the
        quantity. Returns the net P&L (realized - fees) of the round trip this fill
        completed, when it brought the position to flat or through it; else None.
        Raises ValueError for qty ≤ 0 or price ≤ 0."""
        if qty <= 0 or price <= 0:
            raise ValueError(f"fill of {qty} @ {price}: quantity and price must be positive")
        sign = side.sign
        trip = None
        with localcontext(MONEY):
            left = qty
            realized_before = self.realized
            closing = ZERO
            if self.qty and (self.qty > 0) != (sign > 0):
                open_qty = abs(self.qty)
                closing = qty if qty < open_qty else open_qty
                if closing == open_qty:
                    removed = self.cost
                else:
                    removed = (self.cost * closing / open_qty).quantize(COST_STEP, ROUND_HALF_EVEN)
                self.realized += -sign * closing * price - removed
                self.cost -= removed
                self.qty += sign * closing
                left -= closing
            in_quote = not fee_asset or fee_asset == self.quote or not self.quote
            if in_quote:
                self.fees += fee
            elif fee:
                self.other_fees[fee_asset] = self.other_fees.get(fee_asset, ZERO) + fee
            self.trip_pnl += self.realized - realized_before - (fee if in_quote else ZERO)
            if closing and (not self.qty or left):
                trip, self.trip_pnl = self.trip_pnl, ZERO
            if left:
                self.qty += sign * left
                self.cost += sign * left * price
            if fee and fee_asset == self.base and not in_quote:
                self.qty -= fee  # paid out of the base held: no cash moved, so the cost stays
        self.last_price = price
        self.fills += 1
        return trip


class Ledger:
    """Positions of every symbol from fills applied exactly once (by `fill_id`), and
    the account figures built on them. `remember` bounds the fill ids kept for
    exactly-once (0 keeps none: for callers reading unique rows from the database)."""

    def __init__(self, start_cash: Decimal = ZERO, remember: int = SEEN_FILLS_MAX) -> None:
        self.start_cash = start_cash
        self.positions: dict[str, Position] = {}
        self.remember = remember
        self.seen: OrderedDict[str, str] = OrderedDict()  # fill_id -> the client_order_id it was booked for

    def position(self, symbol: str) -> Position:
        """The position of `symbol`, created flat on first use."""
        pos = self.positions.get(symbol)
        if pos is None:
            pos = self.positions[symbol] = Position(symbol)
        return pos

    def qty(self, symbol: str) -> Decimal:
        pos = self.positions.get(symbol)
        return ZERO if pos is None else pos.qty

    def has_seen(self, fill_id: str) -> bool:
        return fill_id in self.seen

    def booked_for(self, fill_id: str) -> str | None:
        """The client_order_id a remembered fill was applied for ("" when not given); None when not
        remembered. A repeat of a fill belongs to the same order: risk refuses an ack reusing another's id."""
        return self.seen.get(fill_id)

    def apply(self, fill_id: str, symbol: str, side: Side | str, qty: Decimal, price: Decimal,
              fee: Decimal = ZERO, fee_asset: str = "", owner: str = "") -> tuple[Position, Decimal | None] | None:
        """Apply one fill unless `fill_id` was applied before. Returns None for a duplicate,
        else `(position, round-trip P&L or None)` (see Position.apply). Raises
        ValueError for a bad side, qty or price (nothing applied, the id not burned). `owner`:
        the client_order_id of the fill, remembered with its id (`booked_for`)."""
        side_ = _SIDES.get(side)
        if side_ is None:
            raise ValueError(f"side must be BUY or SELL, got {str(side)[:20]!r}")
        if self.remember and fill_id in self.seen:
            return None
        pos = self.position(symbol)
        trip = pos.apply(side_, qty, price, fee, fee_asset)
        if self.remember:
            self.seen[fill_id] = owner
            if len(self.seen) > self.remember:
                self.seen.popitem(last=False)
        return pos, trip

    def apply_map(self, fill: Mapping) -> tuple[Position, Decimal | None] | None:
        """`apply` for a fill map as on the wire or in an Ack (`fill_id`, `symbol`, `side`,
        `price`, `qty`, `fee`, `fee_asset`; decimal strings). Raises ValueError when malformed or out
        of range (qty below 1e12, price below 1e15, at most 12 decimals), so no later sum can overflow."""
        try:
            fill_id, symbol = fill["fill_id"], fill["symbol"]
            if self.remember and type(fill_id) is str and fill_id in self.seen:
                return None  # the common duplicate (ack, then bus) costs no parsing
            price, qty = to_decimal(fill["price"], "price"), to_decimal(fill["qty"], "qty")
            fee = to_decimal(fill.get("fee", 0), "fee")
            fee_asset = fill.get("fee_asset", "")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed fill: {exc!r}") from None
        if type(fill_id) is not str or type(symbol) is not str or type(fee_asset) is not str:
            raise ValueError(f"malformed fill {str(fill_id)[:40]!r}")
        for name, value, top, places in (("qty", qty, MAX_QTY, 12), ("price", price, MAX_PRICE, 12),
                                         ("fee", abs(fee), MAX_QTY, 30)):
            if not value < top or value.as_tuple().exponent < -places:
                raise ValueError(f"fill {fill_id[:40]!r}: {name} {str(value)[:40]} is out of range")
        owner = fill.get("client_order_id", "")
        return self.apply(fill_id, symbol, fill.get("side"), qty, price, fee, fee_asset,
                          owner if type(owner) is str else "")

    def mark(self, symbol: str, price: Decimal) -> None:
        """Mark `symbol` at `price` (> 0, exact) for unrealized P&L."""
        self.position(symbol).mark = price

    def realized(self) -> Decimal:
        return sum((p.realized for p in self.positions.values()), ZERO)

    def fees(self) -> Decimal:
        """Fees paid in the quote assets (those that count in P&L as cash; a base-asset fee counts
        through the quantity it took off)."""
        return sum((p.fees for p in self.positions.values()), ZERO)

    def fees_by_asset(self) -> dict[str, Decimal]:
        """Every fee paid, summed per asset over all positions (Position.fees_by_asset)."""
        out: dict[str, Decimal] = {}
        for p in self.positions.values():
            for asset, amount in p.fees_by_asset().items():
                out[asset] = MONEY.add(out.get(asset, ZERO), amount)
        return out

    def unrealized(self) -> Decimal:
        return sum((p.unrealized() for p in self.positions.values()), ZERO)

    def equity(self) -> Decimal:
        """start cash + realized - fees + unrealized (one quote asset is assumed)."""
        with localcontext(MONEY):
            total = self.start_cash
            for p in self.positions.values():
                total += p.realized - p.fees
                if p.qty:
                    total += p.unrealized()
            return total

    def cash(self) -> Decimal:
        """start cash plus every fill's cash flow, minus fees: what a cash account would hold."""
        with localcontext(MONEY):
            return self.start_cash + sum((p.realized - p.cost - p.fees for p in self.positions.values()), ZERO)
