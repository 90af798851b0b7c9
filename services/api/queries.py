"""The one query layer over shared/db.py: trades, exact FIFO positions, summaries."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import (ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow,
                     localcontext)
from typing import Any, Iterable

import peewee as pw

from shared.db import EquitySnapshot, FillRow, OrderRow, database
from shared.enums import OrderStatus, Side

ZERO = Decimal(0)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
AVG_QUANTUM = Decimal("1e-8")  # the display step of an average price (Binance's finest tick)
# quote assets known to the broker's fee rule, longest first so "FDUSD" wins over a shorter suffix
QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR")

_TRADE_FIELDS = (FillRow.fill_id, FillRow.order_id, FillRow.client_order_id, FillRow.symbol, FillRow.side,
                 FillRow.price, FillRow.qty, FillRow.fee, FillRow.fee_asset, FillRow.liquidity,
                 FillRow.exch_ts, FillRow.ts)


def quote_asset(symbol: str) -> str:
    """The quote asset of a spot symbol (`BTCUSDT` → `USDT`); "" when unknown."""
    return next((q for q in QUOTE_ASSETS if symbol.endswith(q) and len(symbol) > len(q)), "")


# position arithmetic must be exact: any rounding raises instead of passing silently
EXACT = Context(prec=100, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
WIDE = Context(prec=100)


@dataclass
class Position:
    """One symbol's position from its fills, FIFO lots (so P&L needs no division).

    `qty` is signed (spot is long/flat, but a short is accounted, not refused);
    `cost_basis` is Σ lot qty × lot price of the open lots (negative when short);
    `realized_pnl` is before fees; `fees` is per fee asset."""
    symbol: str
    qty: Decimal = ZERO
    cost_basis: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    fees: dict[str, Decimal] = field(default_factory=dict)
    last_price: Decimal | None = None
    fills: int = 0
    lots: deque = field(default_factory=deque)  # [signed qty, price], oldest first

    def apply(self, side: Side | str, qty: Decimal, price: Decimal, fee: Decimal = ZERO,
              fee_asset: str = "") -> None:
        """Add one fill. Raises ValueError on a negative quantity."""
        if qty < 0:
            raise ValueError(f"negative fill qty {qty}")
        with localcontext(EXACT):
            left = qty if Side(side) is Side.BUY else -qty
            self.qty += left
            # close the oldest opposite lots first
            while left and self.lots and (self.lots[0][0] > 0) != (left > 0):
                lot = self.lots[0]
                matched = min(abs(left), abs(lot[0]))
                direction = 1 if lot[0] > 0 else -1
                self.realized_pnl += (price - lot[1]) * matched * direction
                self.cost_basis -= lot[1] * matched * direction
                lot[0] -= matched * direction
                left += matched * direction
                if not lot[0]:
                    self.lots.popleft()
            if left:
                self.lots.append([left, price])
                self.cost_basis += left * price
            if fee:
                self.fees[fee_asset] = self.fees.get(fee_asset, ZERO) + fee
        self.last_price = price
        self.fills += 1

    @property
    def avg_entry_price(self) -> Decimal | None:
        """Average price of the open lots, rounded half-even to 1e-8; None when flat."""
        if not self.qty:
            return None
        with localcontext(WIDE):
            return (self.cost_basis / self.qty).quantize(AVG_QUANTUM, rounding=ROUND_HALF_EVEN)

    @property
    def net_pnl(self) -> Decimal:
        """Realized P&L minus the fees paid in this symbol's quote asset."""
        return self.realized_pnl - self.fees.get(quote_asset(self.symbol), ZERO)

    def as_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "qty": self.qty, "avg_entry_price": self.avg_entry_price,
                "cost_basis": self.cost_basis, "realized_pnl": self.realized_pnl, "fees": dict(self.fees),
                "net_realized_pnl": self.net_pnl, "last_price": self.last_price, "fills": self.fills}


def positions_from(fills: Iterable[tuple]) -> dict[str, Position]:
    """Positions from `(symbol, side, qty, price, fee, fee_asset)` tuples in time order."""
    out: dict[str, Position] = {}
    for symbol, side, qty, price, fee, fee_asset in fills:
        pos = out.get(symbol)
        if pos is None:
            pos = out[symbol] = Position(symbol)
        pos.apply(side, qty, price, fee, fee_asset)
    return out


def ping() -> None:
    """Raise if the database cannot answer a query on the fills table."""
    FillRow.select(FillRow.fill_id).limit(1).execute()


def trades(symbol: str | None = None, limit: int = DEFAULT_LIMIT, since: int | None = None) -> list[dict]:
    """Fills newest first; `symbol` filters, `since` keeps fills with ts ≥ since (ns).

    Raises ValueError when `limit` is outside 1..MAX_LIMIT or `since` is negative."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    if since is not None and since < 0:
        raise ValueError("since must be a non-negative ns timestamp")
    query = FillRow.select(*_TRADE_FIELDS)
    if symbol:
        query = query.where(FillRow.symbol == symbol.upper())
    if since is not None:
        query = query.where(FillRow.ts >= since)
    query = query.order_by(FillRow.ts.desc(), FillRow.exch_ts.desc(), FillRow.fill_id.desc()).limit(limit)
    return list(query.dicts())


def positions(symbol: str | None = None) -> list[Position]:
    """Every symbol's position computed from all its fills, sorted by symbol."""
    query = FillRow.select(FillRow.symbol, FillRow.side, FillRow.qty, FillRow.price, FillRow.fee,
                           FillRow.fee_asset)
    if symbol:
        query = query.where(FillRow.symbol == symbol.upper())
    query = query.order_by(FillRow.ts, FillRow.exch_ts, FillRow.fill_id)
    found = positions_from(query.tuples())
    return [found[s] for s in sorted(found)]


def latest_equity() -> dict | None:
    """The newest equity snapshot as {ts, equity, cash, note}, or None."""
    row = EquitySnapshot.select().order_by(EquitySnapshot.ts.desc(), EquitySnapshot.id.desc()).first()
    return None if row is None else {"ts": row.ts, "equity": row.equity, "cash": row.cash, "note": row.note}


def order_counts() -> dict[str, int]:
    """Orders per status; every status present, zero when none."""
    counts = {s.value: 0 for s in OrderStatus}
    query = OrderRow.select(OrderRow.status, pw.fn.COUNT(OrderRow.order_id)).group_by(OrderRow.status)
    for status, n in query.tuples():
        counts[status] = n
    return counts


def summary() -> dict[str, Any]:
    """Fills count, orders by status, latest equity and positions, from one read snapshot."""
    with database.atomic():
        return {"fills": FillRow.select().count(), "orders": order_counts(), "equity": latest_equity(),
                "positions": positions()}


def render_decimal(value: Decimal) -> str:
    """Fixed-point text without exponent or trailing zeros ("1E-8" → "0.00000001")."""
    if not value:
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def jsonable(obj: Any) -> Any:
    """Replace Decimals (as strings) and Positions (as dicts) anywhere in `obj`."""
    if isinstance(obj, Decimal):
        return render_decimal(obj)
    if isinstance(obj, Position):
        return jsonable(obj.as_dict())
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
