"""Positions, P&L and fill statistics kept beside the fills (issue #15): a row per symbol, one per (day, symbol).

Why: the API computed positions and P&L by re-reading every fill on each request, which cannot
answer on a database of 1,000,000 fills. The broker now books each fill into `Aggregates` (the
shared ledger's average-cost `Position` and the tallies of the `positions` and `pnl_days` tables,
shared/db.py) and writes the rows a batch touched in the same journal record as its fills, so in
the same SQLite transaction. Rows are written whole (absolute values): storing a record twice
leaves the same rows, it cannot count a fill twice.

`Aggregates` is the pure core: `apply` a fill, `copy()` (copy on write: a copy costs a dict of the
symbols; a symbol's tallies are copied when either side first changes them after it, so the
broker builds a batch on a copy and swaps it in once the batch is durable, as it does the
Account), `upserts()` (the journal statements of what changed since the copy). The I/O is
around it: `load()` reads the tables back, `disagreement()` says whether they match the fills
table, `rebuild()` recomputes both from the fills (broker start on an older or damaged database;
benchmarks that generate a big one).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

import peewee as pw

from shared.db import (ORDER_COUNT_UPSERT, PNL_DAY_COLS, PNL_DAY_UPSERT, POSITION_COLS, POSITION_UPSERT, database,
                       journal_sql)
from shared.enums import OPEN_STATUSES, Liquidity, Side
from shared.ledger import Position
from shared.messages import Fill
from shared.money import MONEY, ZERO

DAY_NS = 86_400_000_000_000  # a UTC day; a fill's day is ts // DAY_NS (days since the epoch)
REBUILD_TRIES = 3  # rebuilds computed outside the write lock before one is made under it (see rebuild)
_SIDES = {"BUY": Side.BUY, "SELL": Side.SELL}
_MAKER = Liquidity.MAKER.value
_add, _sub, _mul = MONEY.add, MONEY.subtract, MONEY.multiply  # exact at MONEY's 50 digits (shared/money.py)
# the fills' columns a rebuild reads, in the order `Aggregates.apply_row` takes them
FILL_FIELDS = ("symbol", "side", "qty", "price", "fee", "fee_asset", "liquidity", "ts", "slippage_arrival")


@dataclass(slots=True)
class DayTally:
    """One (UTC day, symbol): a `pnl_days` row. `realized` is the change of the position's realized
    P&L (before fees) the day's fills made; `fees` the quote-asset fees they paid."""
    realized: Decimal = ZERO
    fees: Decimal = ZERO
    fills: int = 0
    trips: int = 0
    wins: int = 0
    notional: Decimal = ZERO

    def copy(self) -> DayTally:
        return DayTally(self.realized, self.fees, self.fills, self.trips, self.wins, self.notional)


@dataclass(slots=True)
class SymbolTally:
    """One symbol: its `Position` and the other figures of its `positions` row, and its days.
    The day of the latest fill is held apart (`day`, `today`: changed in place by the fills of
    that day); the others are in `past`, a dict copies share, replaced when it changes, never
    changed in place (a copy stays O(1) however many days the symbol traded)."""
    position: Position
    trips: int = 0
    wins: int = 0
    gross_win: Decimal = ZERO
    gross_loss: Decimal = ZERO
    maker_fills: int = 0
    notional: Decimal = ZERO
    maker_notional: Decimal = ZERO
    slip_n: int = 0
    slip_sum: Decimal = ZERO
    slip_cost: Decimal = ZERO
    last_ts: int | None = None
    day: int | None = None
    today: DayTally | None = None
    past: dict[int, DayTally] = field(default_factory=dict)

    def copy(self) -> SymbolTally:
        p = self.position
        pos = Position(p.symbol, p.qty, p.cost, p.realized, p.fees, dict(p.other_fees), p.last_price, p.mark,
                       p.fills, p.trip_pnl, p.quote, p.base)
        return SymbolTally(pos, self.trips, self.wins, self.gross_win, self.gross_loss, self.maker_fills,
                           self.notional, self.maker_notional, self.slip_n, self.slip_sum, self.slip_cost,
                           self.last_ts, self.day, None if self.today is None else self.today.copy(), self.past)

    def day_tally(self, day: int) -> DayTally | None:
        return self.today if day == self.day else self.past.get(day)

    def days(self) -> dict[int, DayTally]:
        """Every day this symbol traded, oldest first."""
        out = dict(self.past)
        if self.today is not None:
            out[self.day] = self.today
        return dict(sorted(out.items()))

    def _switch(self, day: int) -> DayTally:
        """Make `day` the one held apart (a fill on another day than the latest's: once a day in order)."""
        past = dict(self.past)
        if self.today is not None:
            past[self.day] = self.today
        held = past.pop(day, None)
        self.past, self.day = past, day
        self.today = DayTally() if held is None else held.copy()  # `held` may be shared with other copies
        return self.today


_OPEN = frozenset(s.value for s in OPEN_STATUSES)


class OrderCounts:
    """How many orders are in each status (table `order_counts`), and the status of each open order
    (an update moves an order from the status it had). Small: the open orders only. No I/O: an
    update of an order it does not track asks `lookup(order_id)` for the stored status."""

    __slots__ = ("n", "open", "_dirty")

    def __init__(self, n: dict[str, int] | None = None, open_: dict[str, str] | None = None) -> None:
        self.n: dict[str, int] = dict(n or {})
        self.open: dict[str, str] = dict(open_ or {})
        self._dirty: dict[str, None] = {}

    def copy(self) -> OrderCounts:
        return OrderCounts(self.n, self.open)

    def change(self, order_id: str, status: str, new: bool, lookup=None) -> None:
        """Order `order_id` inserted (`new`) or updated with `status`."""
        prev = None
        if not new:
            prev = self.open.pop(order_id, None)
            if prev is None and lookup is not None:
                prev = lookup(order_id)
        if status in _OPEN:
            self.open[order_id] = status
        if prev == status:
            return
        if prev is not None:
            self.n[prev] = self.n.get(prev, 0) - 1
            self._dirty[prev] = None
        self.n[status] = self.n.get(status, 0) + 1
        self._dirty[status] = None

    def upserts(self) -> list[tuple[int, tuple]]:
        return [(ORDER_COUNT_UPSERT, (status, self.n.get(status, 0))) for status in self._dirty]

    def rows(self) -> list[tuple]:
        return sorted(self.n.items())


class Aggregates:
    """Every symbol's `SymbolTally`, from fills applied in the order they were stored.

    `apply`/`apply_fill`/`apply_row` book one fill; `copy()` gives an independent copy for the
    price of a dict of symbols (copy on write: whichever side changes a symbol after the copy
    works on its own copy of that symbol's tallies); `upserts()` gives the journal statements
    for what this object changed since it was made or copied. No I/O."""

    __slots__ = ("tallies", "_own", "_dirty", "orders")

    def __init__(self, tallies: dict[str, SymbolTally] | None = None, orders: OrderCounts | None = None) -> None:
        self.tallies: dict[str, SymbolTally] = {} if tallies is None else tallies
        self.orders = OrderCounts() if orders is None else orders  # order_counts, kept beside
        self._own: set[str] = set(self.tallies)  # tallies no other Aggregates shares: changed in place
        self._dirty: dict[tuple[int, str], None] = {}  # (day, symbol) changed since made or copied, in order

    def copy(self) -> Aggregates:
        """An independent copy, nothing changed yet (`upserts()` empty). O(symbols): the tallies
        are shared until one side changes them; this object stays valid and usable."""
        new = Aggregates.__new__(Aggregates)
        new.tallies, new._own, new._dirty = dict(self.tallies), set(), {}
        new.orders = self.orders.copy()
        self._own = set()  # shared from now on: this side copies before it changes one too
        return new

    def _tally(self, symbol: str) -> SymbolTally:
        t = self.tallies.get(symbol)
        if symbol not in self._own:
            t = SymbolTally(Position(symbol)) if t is None else t.copy()
            self.tallies[symbol] = t
            self._own.add(symbol)
        return t

    def apply(self, symbol: str, side: Side, qty: Decimal, price: Decimal, fee: Decimal = ZERO,
              fee_asset: str = "", liquidity: str = "TAKER", slippage: Decimal | None = None,
              ts: int = 0) -> Decimal | None:
        """Book one fill of `symbol` at `ts` (ns; its UTC day is ts // DAY_NS). `slippage` is the
        fill's slippage_arrival (None: not counted). Returns the net P&L of the round trip it
        completed, else None (Position.apply). Raises ValueError for qty ≤ 0 or price ≤ 0
        (nothing changed)."""
        t = self._tally(symbol)
        pos = t.position
        realized, fees = pos.realized, pos.fees
        trip = pos.apply(side, qty, price, fee, fee_asset)
        day = ts // DAY_NS
        d = t.today if day == t.day else t._switch(day)
        self._dirty[(day, symbol)] = None
        notional = _mul(price, qty)
        t.notional = _add(t.notional, notional)
        d.notional = _add(d.notional, notional)
        d.fills += 1
        if pos.realized is not realized:
            d.realized = _add(d.realized, _sub(pos.realized, realized))
        if pos.fees is not fees:
            d.fees = _add(d.fees, _sub(pos.fees, fees))
        if trip is not None:
            t.trips += 1
            d.trips += 1
            if trip > 0:
                t.wins += 1
                d.wins += 1
                t.gross_win = _add(t.gross_win, trip)
            elif trip < 0:
                t.gross_loss = _add(t.gross_loss, trip)
        if liquidity == _MAKER:
            t.maker_fills += 1
            t.maker_notional = _add(t.maker_notional, notional)
        if slippage is not None:
            t.slip_n += 1
            t.slip_sum = _add(t.slip_sum, slippage)
            t.slip_cost = _add(t.slip_cost, _mul(slippage, qty))
        if t.last_ts is None or ts > t.last_ts:
            t.last_ts = ts
        return trip

    def apply_fill(self, f: Fill) -> Decimal | None:
        """`apply` for a broker `Fill`."""
        return self.apply(f.symbol, f.side, f.qty, f.price, f.fee, f.fee_asset, f.liquidity, f.slippage_arrival,
                          f.ts)

    def apply_row(self, row: tuple) -> Decimal | None:
        """`apply` for a fills-table row of FILL_FIELDS as stored (sides and money as text)."""
        symbol, side, qty, price, fee, fee_asset, liquidity, ts, slip = row
        return self.apply(symbol, _SIDES[side], Decimal(qty), Decimal(price), Decimal(fee), fee_asset, liquidity,
                          None if slip is None else Decimal(slip), ts)

    # -- reading ---------------------------------------------------------------------------

    def position(self, symbol: str) -> Position | None:
        t = self.tallies.get(symbol)
        return None if t is None else t.position

    def position_row(self, symbol: str) -> tuple:
        """The `positions` row of `symbol` as its columns store it (POSITION_COLS' order; money as
        exact decimal text, other_fees as compact JSON). Raises KeyError for a symbol never traded."""
        t = self.tallies[symbol]
        p = t.position
        other = "{}" if not p.other_fees else json.dumps(
            {a: format(v, "f") for a, v in sorted(p.other_fees.items())}, separators=(",", ":"))
        return (symbol, format(p.qty, "f"), format(p.cost, "f"), format(p.realized, "f"), format(p.fees, "f"),
                other, p.fills, None if p.last_price is None else format(p.last_price, "f"), t.last_ts,
                format(p.trip_pnl, "f"), t.trips, t.wins, format(t.gross_win, "f"), format(t.gross_loss, "f"),
                t.maker_fills, format(t.notional, "f"), format(t.maker_notional, "f"), t.slip_n,
                format(t.slip_sum, "f"), format(t.slip_cost, "f"))

    def day_row(self, day: int, symbol: str) -> tuple:
        """The `pnl_days` row of (`day`, `symbol`) as its columns store it (PNL_DAY_COLS' order).
        Raises KeyError when the symbol did not trade that day."""
        d = self.tallies[symbol].day_tally(day)
        if d is None:
            raise KeyError((day, symbol))
        return (day, symbol, format(d.realized, "f"), format(d.fees, "f"), d.fills, d.trips, d.wins,
                format(d.notional, "f"))

    def upserts(self) -> list[tuple[int, tuple]]:
        """The journal statements (POSITION_UPSERT, PNL_DAY_UPSERT) that store every row changed since
        this object was made or copied: each symbol's and each (day, symbol)'s once, values whole."""
        out, seen = [], set()
        for day, symbol in self._dirty:
            if symbol not in seen:
                seen.add(symbol)
                out.append((POSITION_UPSERT, self.position_row(symbol)))
            out.append((PNL_DAY_UPSERT, self.day_row(day, symbol)))
        out.extend(self.orders.upserts())
        return out

    def rows(self) -> tuple[list[tuple], list[tuple]]:
        """Every `positions` row and every `pnl_days` row, by symbol then day."""
        positions, days = [], []
        for symbol in sorted(self.tallies):
            positions.append(self.position_row(symbol))
            days.extend(self.day_row(day, symbol) for day in self.tallies[symbol].days())
        return positions, days


def from_rows(rows: Iterable[tuple]) -> Aggregates:
    """Aggregates of fills-table rows (FILL_FIELDS, as stored) in the order they were stored."""
    aggs = Aggregates()
    apply = aggs.apply_row
    for row in rows:
        apply(row)
    aggs._dirty.clear()
    return aggs


# -- the database ------------------------------------------------------------------------------

def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def load() -> Aggregates:
    """The aggregates as the `positions` and `pnl_days` tables of the bound database hold them (check
    `disagreement()` first: rows that miss fills give figures that miss them). Raises peewee or
    sqlite3 errors."""
    tallies: dict[str, SymbolTally] = {}
    cols = ", ".join(f'"{c}"' for c in POSITION_COLS)
    for row in database.execute_sql(f'SELECT {cols} FROM "positions"').fetchall():
        (symbol, qty, cost, realized, fees, other, fills, last_price, last_ts, trip_pnl, trips, wins, gross_win,
         gross_loss, maker_fills, notional, maker_notional, slip_n, slip_sum, slip_cost) = row
        pos = Position(symbol, Decimal(qty), Decimal(cost), Decimal(realized), Decimal(fees),
                       {a: Decimal(v) for a, v in json.loads(other or "{}").items()}, _dec(last_price), None,
                       fills, Decimal(trip_pnl))
        tallies[symbol] = SymbolTally(pos, trips, wins, Decimal(gross_win), Decimal(gross_loss), maker_fills,
                                      Decimal(notional), Decimal(maker_notional), slip_n, Decimal(slip_sum),
                                      Decimal(slip_cost), last_ts)
    cols = ", ".join(f'"{c}"' for c in PNL_DAY_COLS)
    for day, symbol, realized, fees, fills, trips, wins, notional in database.execute_sql(
            f'SELECT {cols} FROM "pnl_days" ORDER BY "day"').fetchall():
        t = tallies.get(symbol)
        if t is None:
            t = tallies[symbol] = SymbolTally(Position(symbol))
        tally = DayTally(Decimal(realized), Decimal(fees), fills, trips, wins, Decimal(notional))
        if t.today is not None:  # days come oldest first: the newest ends up held apart
            t.past[t.day] = t.today
        t.day, t.today = day, tally
    return Aggregates(tallies, orders_from(database.execute_sql))


def orders_from(execute) -> OrderCounts:
    """The order counts by status and the open orders' statuses, counted from the orders table
    (`execute(sql)` gives a cursor): one GROUP BY over the status index."""
    n = dict(execute('SELECT "status", COUNT(*) FROM "orders" GROUP BY "status"').fetchall())
    marks = ", ".join(f"'{s}'" for s in sorted(_OPEN))  # constants, not input
    open_ = dict(execute(f'SELECT "order_id", "status" FROM "orders" WHERE "status" IN ({marks})').fetchall())
    return OrderCounts(n, open_)


def disagreement() -> dict | None:
    """None when `positions` counts every fill of the fills table (the total, then the symbol sets:
    one pass over the table, ~0.1 s for a million fills) and `pnl_days` counts each symbol's fills as
    `positions` does; else the counts each holds (`fills`, `position_fills`, `day_fills`,
    `position_symbols`, and `symbols` when the totals agree), for the caller's log line. Raises
    peewee or sqlite3 errors."""
    total = database.execute_sql('SELECT COUNT(*) FROM "fills"').fetchone()[0]
    rows = dict(database.execute_sql('SELECT "symbol", "fills" FROM "positions"').fetchall())
    days = {s: int(n) for s, n in database.execute_sql(
        'SELECT "symbol", SUM("fills") FROM "pnl_days" GROUP BY "symbol"').fetchall()}
    out = {"fills": total, "position_fills": sum(rows.values()), "day_fills": sum(days.values()),
           "position_symbols": len(rows)}
    orders = dict(database.execute_sql('SELECT "status", COUNT(*) FROM "orders" GROUP BY "status"').fetchall())
    kept = {s: n for s, n in database.execute_sql('SELECT "status", "n" FROM "order_counts"').fetchall() if n}
    if orders != kept:
        out["orders"], out["order_counts"] = sum(orders.values()), sum(kept.values())
    elif total == out["position_fills"] and rows == days:
        symbols = {s for (s,) in database.execute_sql('SELECT DISTINCT "symbol" FROM "fills"').fetchall()}
        if symbols == set(rows):
            return None
        out["symbols"] = len(symbols)
    return out


def _fills_sql(sqlite: bool) -> str:
    order = "rowid" if sqlite else '"ts", "exch_ts", "fill_id"'  # the order they were stored in
    return 'SELECT ' + ", ".join(f'"{c}"' for c in FILL_FIELDS) + f' FROM "fills" ORDER BY {order}'


def _replace(execute, executemany, aggs: Aggregates, param: str) -> None:
    sql = journal_sql(param)
    positions, days = aggs.rows()
    execute('DELETE FROM "positions"')
    execute('DELETE FROM "pnl_days"')
    execute('DELETE FROM "order_counts"')
    aggs.orders = orders_from(execute)  # under the same write lock: the orders as they are now
    if aggs.orders.n:
        executemany(sql[ORDER_COUNT_UPSERT], aggs.orders.rows())
    if positions:
        executemany(sql[POSITION_UPSERT], positions)
    if days:
        executemany(sql[PNL_DAY_UPSERT], days)


def rebuild() -> Aggregates:
    """Recompute `positions` and `pnl_days` from every row of the fills table (in the order they
    were stored: rowid on SQLite, else ts, exch_ts, fill_id) and replace both tables' rows in ONE
    transaction; returns the aggregates. Raises peewee or sqlite3 errors (nothing replaced).

    On SQLite the fills are read and folded in a read transaction (a snapshot), and only the
    replacement takes the write lock, after checking the fills table is still what was read
    (its count and newest rowid): a rebuild of a million fills takes seconds, which other
    writers (risk, strategy) must not wait (their busy timeout is 5 s). Should it change
    meanwhile, the rebuild starts over; after REBUILD_TRIES it is made under the write lock."""
    if not isinstance(database.obj, pw.SqliteDatabase):
        with database.atomic():
            aggs = from_rows(database.execute_sql(_fills_sql(False)))
            param = database.obj.param

            def executemany(sql: str, rows: list) -> None:
                for row in rows:
                    database.execute_sql(sql, list(row))
            _replace(database.execute_sql, executemany, aggs, param)
        return aggs
    con: sqlite3.Connection = database.connection()
    for attempt in range(REBUILD_TRIES + 1):
        locked = attempt == REBUILD_TRIES
        con.execute("BEGIN IMMEDIATE" if locked else "BEGIN")
        try:
            shape = con.execute('SELECT COUNT(*), MAX(rowid) FROM "fills"').fetchone()
            aggs = from_rows(con.execute(_fills_sql(True)))
            if not locked:
                con.execute("COMMIT")
                con.execute("BEGIN IMMEDIATE")
                if con.execute('SELECT COUNT(*), MAX(rowid) FROM "fills"').fetchone() != shape:
                    con.execute("ROLLBACK")
                    continue
            _replace(con.execute, con.executemany, aggs, "?")
            con.execute("COMMIT")
            return aggs
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    raise AssertionError("unreachable: the last attempt holds the write lock")

