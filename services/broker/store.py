"""The broker's SQLite side: one transaction per batch of order changes, and state rebuilt from the database."""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Iterable

import peewee as pw

from services.broker.core import Account, Order
from services.broker.fill_model import ARRIVED, NOT_OPEN
from shared import aggregates, journal, money
from shared.aggregates import Aggregates
from shared.db import (EQUITY_INSERT, FILL_COLS, FILL_INSERT, ORDER_COLS, ORDER_INSERT, ORDER_UPDATE,
                       ORDER_UPDATE_COLS, DecimalText, EquitySnapshot, FillRow, OrderRow, database, insert_rows)
from shared.enums import OPEN_STATUSES, Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import Fill

log = logging.getLogger("qf.broker")
CHECKPOINT_S = 0.5  # how often the checkpointer moves committed WAL frames into the database file
# Past this size the checkpointer truncates the WAL (see Checkpointer), waiting at most
# RESTART_WAIT_S for readers; writers wait behind it, so this is a rare, bounded stall.
WAL_RESTART_BYTES = 64 << 20
RESTART_WAIT_S = 0.1



@dataclass(slots=True)
class Change:
    """One order to write: its row (inserted when `new`, else updated) and its new fills."""
    order: Order
    new: bool
    fills: list[Fill]
    arrival_ts: int | None = None
    decision_mid: Decimal | None = None
    arrival_mid: Decimal | None = None


def changes_of(updates) -> list[Change]:
    """The rows to write for the fill model's `updates` (services/broker/fill_model.py Update): every
    one but a cancel that found its order finished (NOT_OPEN), with its arrival time and mids."""
    out = []
    for u in updates:
        if u.event != NOT_OPEN:
            w = u.working
            out.append(Change(u.order, u.event == ARRIVED, u.fills, w.arrival_ts if w else None,
                              w.decision_mid if w else None, w.arrival_mid if w else None))
    return out


def fill_from_row(row: FillRow) -> Fill:
    return Fill(ts=row.ts, fill_id=row.fill_id, order_id=row.order_id, client_order_id=row.client_order_id,
                symbol=row.symbol, side=Side(row.side), price=row.price, qty=row.qty, fee=row.fee,
                fee_asset=row.fee_asset, liquidity=Liquidity(row.liquidity), exch_ts=row.exch_ts,
                decision_mid=row.decision_mid, arrival_mid=row.arrival_mid,
                slippage_decision=row.slippage_decision, slippage_arrival=row.slippage_arrival,
                queue_wait_ns=row.queue_wait_ns or 0)


def order_from_row(row: OrderRow, fills: list[FillRow]) -> Order:
    order = Order(order_id=row.order_id, client_order_id=row.client_order_id, strategy=row.strategy,
                  symbol=row.symbol, side=Side(row.side), kind=OrderKind(row.kind), tif=TimeInForce(row.tif),
                  qty=row.qty, price=row.price, created_ts=row.created_ts, status=OrderStatus(row.status),
                  filled_qty=row.filled_qty, reason=row.reason, updated_ts=row.updated_ts)
    with localcontext(money.MONEY):
        order.notional = sum((f.price * f.qty for f in fills), money.ZERO)
    order.fill_count = len(fills)
    return order


def _sqlite() -> sqlite3.Connection | None:
    """This thread's sqlite3 connection (peewee opens it in autocommit mode, so BEGIN/COMMIT
    are ours to issue), or None for another database."""
    return database.connection() if isinstance(database.obj, pw.SqliteDatabase) else None


def _dec(value: object) -> str | None:
    """A money value as DecimalText stores it: its exact "f" text (any other value goes
    through the column's own db_value, which refuses floats)."""
    if type(value) is Decimal:
        return format(value, "f")
    return None if value is None else DecimalText().db_value(value)


# The statements bind tuples built straight from the objects (what order_fields/fill_fields
# and the columns' db_value would give, value for value): building dicts and converting them
# column by column cost more than the statements on the path the ack waits for. They are
# journal statements (shared/db.py JOURNAL_SQL): written to the journal before the answer,
# into SQLite after it.
def _order_params(c: Change, avg: Decimal | None) -> tuple:
    o = c.order
    return (o.order_id, o.client_order_id, o.strategy, o.symbol, o.side.value, o.kind.value, o.tif.value,
            _dec(o.qty), _dec(o.price), o.status.value, _dec(o.filled_qty), _dec(avg), o.reason, o.created_ts,
            o.updated_ts, c.arrival_ts, _dec(c.decision_mid), _dec(c.arrival_mid))


def _update_params(c: Change, avg: Decimal | None) -> tuple:
    o = c.order
    return (o.status.value, _dec(o.filled_qty), _dec(avg), o.reason, o.updated_ts, c.arrival_ts,
            _dec(c.decision_mid), _dec(c.arrival_mid), o.order_id)


def _fill_params(f: Fill, mid: Decimal | None) -> tuple:
    return (f.fill_id, f.order_id, f.client_order_id, f.symbol, f.side.value, _dec(f.price), _dec(f.qty),
            _dec(f.fee), f.fee_asset, f.liquidity.value, f.exch_ts, f.ts, _dec(mid), _dec(f.decision_mid),
            _dec(f.arrival_mid), _dec(f.slippage_decision), _dec(f.slippage_arrival), f.queue_wait_ns)


@dataclass(slots=True)
class Batch:
    """What `batch` makes of a batch of changes: the journal `statements` that store it, and the
    account and aggregates with its fills applied (new objects: the caller swaps them in only
    once the statements are durable)."""
    statements: list
    account: Account
    aggregates: Aggregates | None


def batch(changes: Iterable[Change], account: Account, marks: dict[str, Decimal],
          aggregates: Aggregates | None) -> Batch:
    """The journal statements that store `changes`, with an equity snapshot after each order that
    filled and, after the last change, the `positions` and `pnl_days` rows its fills touched
    (issue #15: shared/aggregates.py; each once, whole, in the same record as the fills, so in the
    same transaction), with the account and a copy of `aggregates` the fills were applied to.
    `aggregates` None: no such rows (the caller rebuilds the tables after)."""
    acct = Account(account.cash, dict(account.positions), dict(account.last_price))
    aggs = None if aggregates is None else aggregates.copy()
    out: list = []
    for c in changes:
        if aggs is not None:
            aggs.orders.change(c.order.order_id, c.order.status.value, c.new, _stored_status)
        avg = c.order.avg_price
        if c.new:
            out.append((ORDER_INSERT, _order_params(c, avg)))
        else:
            out.append((ORDER_UPDATE, _update_params(c, avg)))
        if c.fills:
            mid = marks.get(c.order.symbol)
            for f in c.fills:
                out.append((FILL_INSERT, _fill_params(f, mid)))
                acct.apply(f.symbol, f.side, f.price, f.qty, f.fee, f.fee_asset)
                if aggs is not None:
                    aggs.apply_fill(f)
            out.append((EQUITY_INSERT, (c.order.updated_ts, _dec(acct.equity(marks)), _dec(acct.cash),
                                        c.order.order_id)))
    if aggs is not None:
        out.extend(aggs.upserts())
    return Batch(out, acct, aggs)


def _stored_status(order_id: str) -> str | None:
    """The status the database holds for `order_id` (an update of an order the counts do not track
    as open: not expected, but the count must move from where the order was); None if unknown."""
    try:
        row = database.execute_sql(f'SELECT "status" FROM "orders" WHERE "order_id" = {database.param}',
                                   [order_id]).fetchone()
    except (pw.PeeweeException, sqlite3.Error):
        return None
    return None if row is None else row[0]


def statements(changes: Iterable[Change], account: Account, marks: dict[str, Decimal],
               aggregates: Aggregates | None = None) -> tuple[list, Account]:
    """`batch`'s statements and account (the aggregates' rows only when `aggregates` is given)."""
    b = batch(changes, account, marks, aggregates)
    return b.statements, b.account


def commit(changes: Iterable[Change], account: Account, marks: dict[str, Decimal]) -> Account:
    """Write `changes` straight into the database in ONE transaction (no journal), with an
    equity snapshot after each order that filled (no aggregates: `load_aggregates` rebuilds
    them). Returns the account with the fills applied. Raises peewee or sqlite3 errors (nothing
    written)."""
    stmts, acct = statements(changes, account, marks)
    journal.write(stmts)
    return acct


def snapshot(ts: int, account: Account, marks: dict[str, Decimal], note: str = "periodic") -> None:
    """One equity snapshot, committed."""
    with database.atomic():
        insert_rows(EquitySnapshot, [dict(ts=ts, equity=account.equity(marks), cash=account.cash, note=note)])


def exists(client_order_id: str) -> bool:
    """Whether an order with this client_order_id is stored (one indexed lookup)."""
    con = _sqlite()
    if con is not None:  # peewee's execute_sql wrapper costs more than the indexed lookup
        return con.execute('SELECT 1 FROM "orders" WHERE "client_order_id" = ? LIMIT 1',
                           (client_order_id,)).fetchone() is not None
    param = database.obj.param
    cur = database.execute_sql(f'SELECT 1 FROM "orders" WHERE "client_order_id" = {param} LIMIT 1',
                               [client_order_id])
    return cur.fetchone() is not None


class KnownIds:
    """The client_order_ids stored in the orders table, as a Bloom filter: `maybe(coid)` is
    False only for an id that is certainly not stored (no false negatives), so a new order
    skips the indexed lookup `exists` and a repeat still finds its stored answer. Fed with
    every stored id at start and every id the broker takes after (`add`); sized for 16 bits
    an id (false positives, which cost only the lookup, stay rare until the history doubles)."""

    def __init__(self, ids: Iterable[str] = (), count: int = 0) -> None:
        size = 1 << 24
        while size < count * 16:
            size <<= 1
        self.mask = size - 1
        self.bits = bytearray(size >> 3)
        for coid in ids:
            self.add(coid)

    def _slots(self, coid: str) -> tuple[int, int, int]:
        h = hash(coid)
        a, b = h & self.mask, ((h >> 32) | 1) & self.mask
        return a, (a + b) & self.mask, (a + 2 * b) & self.mask

    def add(self, coid: str) -> None:
        bits = self.bits
        for i in self._slots(coid):
            bits[i >> 3] |= 1 << (i & 7)

    def maybe(self, coid: str) -> bool:
        bits = self.bits
        for i in self._slots(coid):
            if not bits[i >> 3] & (1 << (i & 7)):
                return False
        return True


def known_ids() -> KnownIds:
    """A KnownIds of every client_order_id stored now (needs the database bound)."""
    count = OrderRow.select().count()
    query = OrderRow.select(OrderRow.client_order_id).tuples().iterator()
    return KnownIds((coid for (coid,) in query), count)


def stored(client_order_id: str, pending: list = ()) -> tuple[Order, list[Fill]] | None:
    """The order and its fills (oldest first) as the database holds them with the journal
    statements `pending` (durable, not stored yet: the database may be refusing them) applied
    over it, or None. Raises peewee or sqlite3 errors when the database cannot be read."""
    row = OrderRow.get_or_none(OrderRow.client_order_id == client_order_id)
    rows = [] if row is None else list(
        FillRow.select().where(FillRow.order_id == row.order_id).order_by(FillRow.ts, FillRow.fill_id))
    if pending:
        row = _overlay(client_order_id, row, rows, pending)
    if row is None:
        return None
    return order_from_row(row, rows), [fill_from_row(f) for f in rows]


def _overlay(client_order_id: str, row: OrderRow | None, fills: list[FillRow], statements: list) -> OrderRow | None:
    """Apply what `statements` do to the order `client_order_id` onto its `row` (None: not
    stored) and its `fills` (appended); returns the row."""
    order_id = row.order_id if row is not None else None
    for kind, params in statements:
        if kind == ORDER_INSERT:
            if params[1] == client_order_id:
                row = _row(OrderRow, ORDER_COLS, params)
                order_id = row.order_id
        elif order_id is None:
            continue
        elif kind == ORDER_UPDATE and params[-1] == order_id:
            for col, value in zip(ORDER_UPDATE_COLS, params):
                setattr(row, col, OrderRow._meta.fields[col].python_value(value))
        elif kind == FILL_INSERT and params[1] == order_id:
            fills.append(_row(FillRow, FILL_COLS, params))
    return row


def _row(model: type, cols: tuple[str, ...], params) -> object:
    fields_ = model._meta.fields
    return model(**{c: fields_[c].python_value(v) for c, v in zip(cols, params)})


def inserts(client_order_id: str, statements: list) -> bool:
    """Whether journal `statements` insert the order `client_order_id`."""
    return any(kind == ORDER_INSERT and params[1] == client_order_id for kind, params in statements)


def load_account(start_cash: Decimal) -> tuple[Account, int]:
    """Cash and positions from every stored fill; returns (account, fills counted)."""
    account, n = Account(start_cash), 0
    query = FillRow.select(FillRow.symbol, FillRow.side, FillRow.price, FillRow.qty, FillRow.fee, FillRow.fee_asset)
    for symbol, side, price, qty, fee_, asset in query.order_by(FillRow.ts, FillRow.fill_id).tuples().iterator():
        account.apply(symbol, Side(side), Decimal(price), Decimal(qty), Decimal(fee_), asset)
        n += 1
    return account, n


def load_aggregates() -> Aggregates:
    """The aggregates (shared/aggregates.py) from the `positions` and `pnl_days` tables when they
    count every stored fill, symbol by symbol; else (a database older than them, or rows lost)
    recomputed from the fills and stored, with a warning `aggregates_rebuilt`. Raises peewee or
    sqlite3 errors."""
    differs = aggregates.disagreement()
    if differs is None:
        return aggregates.load()
    started = time.perf_counter()
    aggs = aggregates.rebuild()
    log.warning("aggregates_rebuilt", extra={**differs, "symbols_rebuilt": len(aggs.tallies),
                                             "seconds": round(time.perf_counter() - started, 3)})
    return aggs


def load_open() -> list[tuple[Order, OrderRow]]:
    """Every open order with its row (for arrival time and mids), oldest first."""
    out = []
    query = OrderRow.select().where(OrderRow.status.in_([s.value for s in OPEN_STATUSES]))
    for row in query.order_by(OrderRow.created_ts):
        fills = list(FillRow.select().where(FillRow.order_id == row.order_id).order_by(FillRow.ts))
        out.append((order_from_row(row, fills), row))
    return out


def _file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`, None when there is none (or it cannot be told)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Checkpointer:
    """WAL checkpoints on a thread and connection of their own. SQLite's automatic
    checkpoint runs inside the commit that crosses its threshold and stalls it 4–12 ms;
    `start()` turns it off on the caller's connection and checkpoints every CHECKPOINT_S
    (PASSIVE: never blocks the writer). A passive checkpoint never waits either, so under steady
    commits with readers on the file the WAL may never be found fully copied when a writer
    starts, and is then never reused: it grows without bound (100 MB after ~2,300 orders in
    the risk benchmark). Past WAL_RESTART_BYTES a TRUNCATE checkpoint resets it, waiting at most
    RESTART_WAIT_S (its busy timeout) for readers. A no-op for a non-SQLite database."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._fresh: sqlite3.Connection | None = None  # a connection `reopen` made, for the thread to take
        self._fresh_id: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0
        self.restarts = 0  # TRUNCATE checkpoints that reset the WAL
        self.failures = 0  # checkpoints that failed (a full disk fails each one: logged once a streak)
        self.failing = False

    def start(self) -> None:
        """Call from the thread that commits, with the database open."""
        if not isinstance(database.obj, pw.SqliteDatabase):
            return
        database.execute_sql("PRAGMA wal_autocheckpoint=0")
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        con = sqlite3.connect(self.path, timeout=RESTART_WAIT_S, check_same_thread=False)
        mine = _file_id(self.path)
        wal = self.path + "-wal"
        try:
            while not self._stop.wait(CHECKPOINT_S):
                with self._lock:
                    fresh, fresh_id, self._fresh = self._fresh, self._fresh_id, None
                if fresh is not None:  # the broker put a lost database file back (keeper.py)
                    con.close()
                    con, mine = fresh, fresh_id
                if _file_id(self.path) != mine:  # deleted or replaced: the broker puts its own back, then reopen()
                    continue
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                    if os.path.exists(wal) and os.path.getsize(wal) > WAL_RESTART_BYTES:
                        busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                        if busy:
                            log.warning("wal_truncate_busy", extra={"wal_bytes": os.path.getsize(wal)})
                        else:
                            self.restarts += 1
                    if self.failing:
                        self.failing = False
                        log.info("checkpoint_recovered", extra={"failures": self.failures})
                except (sqlite3.Error, OSError):
                    self.failures += 1
                    if not self.failing:  # the WAL keeps the frames; the next turn tries again
                        self.failing = True
                        log.exception("checkpoint_failed")
        finally:
            con.close()
            with self._lock:
                if self._fresh is not None:
                    self._fresh.close()
                    self._fresh = None

    def reopen(self) -> None:
        """Checkpoint the file at `path` from now on (StoreKeeper._put_back just put it there).
        Opened here, at once, with a read that opens its WAL too, and handed to the thread: opened
        by the thread at its next turn, it could be some other file put there meanwhile."""
        if self._thread is None:
            return
        con = sqlite3.connect(self.path, timeout=RESTART_WAIT_S, check_same_thread=False)
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
        with self._lock:
            old, self._fresh, self._fresh_id = self._fresh, con, _file_id(self.path)
        if old is not None:
            old.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
