"""The one query layer over shared/db.py: trades, positions (the shared average-cost ledger), summaries."""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Iterable

import peewee as pw

from shared.db import EquitySnapshot, FillRow, OrderRow, RiskEvent, database
from shared.enums import OrderStatus, TradingState
from shared.ledger import Ledger, Position
from shared.money import quote_asset

ZERO = Decimal(0)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_TRADE_FIELDS = (FillRow.fill_id, FillRow.order_id, FillRow.client_order_id, FillRow.symbol, FillRow.side,
                 FillRow.price, FillRow.qty, FillRow.fee, FillRow.fee_asset, FillRow.liquidity,
                 FillRow.exch_ts, FillRow.ts)

__all__ = ["Position", "quote_asset", "positions_from", "position_dict", "ping", "trades", "positions",
           "latest_equity", "order_counts", "summary", "risk_state", "render_decimal", "jsonable"]


def positions_from(fills: Iterable[tuple]) -> dict[str, Position]:
    """Positions from `(symbol, side, qty, price, fee, fee_asset)` tuples in time order, by the
    same average-cost ledger risk keeps (rows from the database are unique: no id tracking)."""
    ledger = Ledger(remember=0)
    for symbol, side, qty, price, fee, fee_asset in fills:
        ledger.apply("", symbol, side, qty, price, fee, fee_asset)
    return ledger.positions


def position_dict(pos: Position) -> dict[str, Any]:
    """A position as the API shows it: realized P&L before fees, fees per asset, net of the quote fees."""
    return {"symbol": pos.symbol, "qty": pos.qty, "avg_entry_price": pos.avg_price, "cost_basis": pos.cost,
            "realized_pnl": pos.realized, "fees": pos.fees_by_asset(), "net_realized_pnl": pos.net_realized,
            "last_price": pos.last_price, "fills": pos.fills}


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


def risk_state() -> dict[str, Any]:
    """The newest trading-state change risk stored (a `risk_events` row of kind STATE) as
    {state, code, reason, by, ts}; {"state": "ACTIVE", code/reason/by "", ts None} when none.
    One query, newest first by `ts` (risk writes "reason [by who]" in `text`)."""
    row = (RiskEvent.select(RiskEvent.ts, RiskEvent.code, RiskEvent.text, RiskEvent.state)
           .where(RiskEvent.kind == "STATE").order_by(RiskEvent.ts.desc(), RiskEvent.id.desc())
           .limit(1).tuples().first())
    if row is None:
        return {"state": TradingState.ACTIVE.value, "code": "", "reason": "", "by": "", "ts": None}
    ts, code, text, state = row
    reason, by = text, ""
    head, sep, tail = text.rpartition(" [by ")
    if sep and tail.endswith("]"):
        reason, by = head, tail[:-1]
    return {"state": state, "code": code, "reason": reason, "by": by, "ts": ts}


def render_decimal(value: Decimal) -> str:
    """Fixed-point text without exponent or trailing zeros ("1E-8" → "0.00000001")."""
    if not value:
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def jsonable(obj: Any) -> Any:
    """Replace Decimals (as strings) and Positions (as `position_dict`) anywhere in `obj`."""
    if isinstance(obj, Decimal):
        return render_decimal(obj)
    if isinstance(obj, Position):
        return jsonable(position_dict(obj))
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
