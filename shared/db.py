"""Peewee models and database initialisation (SQLite WAL, or a peewee URL).

Money columns are TEXT holding canonical decimal strings: exact, unlike
SQLite's NUMERIC affinity, which would store them as REAL."""
from __future__ import annotations

import os
import sqlite3
from decimal import Decimal
from urllib.parse import urlparse

import peewee as pw
from playhouse.db_url import connect as connect_url
from playhouse.db_url import parse as parse_url

from shared import storage
from shared.errors import ConfigError, StorageError

database = pw.DatabaseProxy()


class DecimalText(pw.TextField):
    """A Decimal stored as its exact decimal string."""

    def db_value(self, value):
        if value is None:
            return None
        if not isinstance(value, Decimal):
            value = Decimal(value) if not isinstance(value, float) else None
            if value is None:
                raise TypeError("refusing to store a float in a money column")
        return format(value, "f")  # exact, and never exponent notation

    def python_value(self, value):
        return None if value is None else Decimal(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class OrderRow(BaseModel):
    """One order as the broker knows it; `client_order_id` is the idempotency key."""
    order_id = pw.TextField(primary_key=True)
    client_order_id = pw.TextField(unique=True)
    strategy = pw.TextField()
    symbol = pw.TextField()  # no index: no query selects orders by symbol, and each index costs the commit pages
    side = pw.TextField()
    kind = pw.TextField()
    tif = pw.TextField()
    qty = DecimalText()
    price = DecimalText(null=True)
    status = pw.TextField(index=True)
    filled_qty = DecimalText()
    avg_price = DecimalText(null=True)
    reason = pw.TextField(default="")
    created_ts = pw.BigIntegerField()
    updated_ts = pw.BigIntegerField()
    # issue #5: when the order reached the simulated exchange, and the mids it was judged against
    arrival_ts = pw.BigIntegerField(null=True)
    decision_mid = DecimalText(null=True)
    arrival_mid = DecimalText(null=True)

    class Meta:
        table_name = "orders"
        # /api/v1/orders pages newest first by (created_ts, order_id): the index is that order
        indexes = ((("created_ts", "order_id"), False),)


class FillRow(BaseModel):
    """One execution; committed before anyone is told of it."""
    fill_id = pw.TextField(primary_key=True)
    order_id = pw.TextField(index=True)
    # no index on client_order_id or symbol: lookups go by order_id, the API's symbol filter
    # walks the ts index; each index costs pages on the broker's commit-before-ack path
    client_order_id = pw.TextField()
    symbol = pw.TextField()
    side = pw.TextField()
    price = DecimalText()
    qty = DecimalText()
    fee = DecimalText()
    fee_asset = pw.TextField()
    liquidity = pw.TextField()
    exch_ts = pw.BigIntegerField()
    ts = pw.BigIntegerField()  # indexed with fill_id (Meta): a page of /api/v1/trades is an index range
    mid_at_fill = DecimalText(null=True)
    # issue #5: fill quality (see messages.Fill)
    decision_mid = DecimalText(null=True)
    arrival_mid = DecimalText(null=True)
    slippage_decision = DecimalText(null=True)
    slippage_arrival = DecimalText(null=True)
    queue_wait_ns = pw.BigIntegerField(null=True)

    class Meta:
        table_name = "fills"
        # the one ts index, (ts, fill_id): ordered as the API pages fills, so a page needs no sort
        # (it replaced an index on ts alone: `init_db` drops that one from an older file)
        indexes = ((("ts", "fill_id"), False),)


class EquitySnapshot(BaseModel):
    """Equity marked to mid, for the equity curve."""
    ts = pw.BigIntegerField(index=True)
    equity = DecimalText()
    cash = DecimalText()
    note = pw.TextField(default="")

    class Meta:
        table_name = "equity"


class RiskEvent(BaseModel):
    """A risk decision worth keeping: a denial, or a trading-state change."""
    ts = pw.BigIntegerField(index=True)
    kind = pw.TextField()  # DENIED | STATE
    code = pw.TextField()
    text = pw.TextField(default="")
    client_order_id = pw.TextField(default="")
    symbol = pw.TextField(default="")
    state = pw.TextField(default="")

    class Meta:
        table_name = "risk_events"
        # the API's latest trading state (kind STATE, newest first) without walking every denial
        indexes = ((("kind", "ts"), False),)


MODELS = (OrderRow, FillRow, EquitySnapshot, RiskEvent)

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    # NORMAL in WAL mode survives any process crash (kill -9); only an OS
    # crash or power loss can lose the last transactions.
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
}


def init_db(target: str, create: bool = True) -> pw.Database:
    """Open `target` (a SQLite path, or a peewee URL such as postgresql://…),
    bind the models to it and create missing tables. Returns the database. Raises
    StorageError (one line naming the file) for a SQLite file that cannot be used at all:
    on a read-only file system, a directory, not a database, damaged; for a database server,
    ConfigError for a URL that names none and StorageError (one line naming user, host and
    database, never the password) for a login it refuses (a wrong password, no such database
    or role); other errors as they come (a server that does not answer: peewee's OperationalError)."""
    if "://" in target:
        db = open_url(target)
    else:
        if os.path.isdir(target):
            raise StorageError(f"cannot use {target} as the database: it is a directory")
        storage.ensure_dir(os.path.dirname(os.path.abspath(target)))
        db = pw.SqliteDatabase(target, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    database.initialize(db)
    try:
        db.connect(reuse_if_open=True)
        if create:
            if isinstance(db, pw.PostgresqlDatabase):
                _create_server_schema(db)
            else:
                db.create_tables(MODELS, safe=True)
                add_missing_columns(db)
                _drop_replaced_indexes(db)
    except (pw.DatabaseError, sqlite3.Error) as exc:
        if "://" in target:
            refused = _refused(target, exc)
            if refused is None:
                raise
            raise refused from None
        error = _unusable(target, exc)
        if error is None:
            raise
        if not db.is_closed():
            db.close()
        raise error from None
    return db


# -- a database server (PostgreSQL) ----------------------------------------------------------

PG_SCHEMES = ("postgres", "postgresql")
PG_CONNECT_TIMEOUT_S = 10  # libpq waits for the OS's TCP timeout (minutes) on a host that never answers
# every process that creates the schema takes this transaction-scoped advisory lock first: two
# services starting together (broker and risk) would otherwise race on CREATE TABLE IF NOT EXISTS,
# which PostgreSQL does not serialise (a duplicate-key error on its catalog)
PG_SCHEMA_LOCK = 0x51460001
# every transaction that stores journal records into PostgreSQL takes this one first (shared/journal.py):
# a broker killed with its store's message sent leaves a transaction the server still runs, and the
# next process's recovery must not decide what is unstored until that one has committed or failed
PG_JOURNAL_LOCK = 0x51460002


class ServerDatabase(pw.PostgresqlDatabase):
    """PostgreSQL as the services use it: FloatField as DOUBLE PRECISION (peewee's REAL is 4 bytes;
    SQLite's REAL is 8), and a connection the server dropped (a restart, a failover) forgotten
    at the next statement outside a transaction, so that statement connects afresh: the
    broker's storage probe and the API's next request then work again by themselves."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("field_types", {"FLOAT": "DOUBLE PRECISION"})
        super().__init__(*args, **kwargs)

    def cursor(self, named_cursor=None):
        state = self._state
        if not state.closed and state.conn is not None and state.conn.closed and not self.in_transaction():
            state.reset()
        return super().cursor(named_cursor)


def where(target: str) -> str:
    """`target` as an error may name it: a SQLite path as it is; a URL as scheme://user@host:port/name,
    without password or query parameters."""
    if "://" not in target:
        return target
    scheme = urlparse(target).scheme
    try:
        p = parse_url(target)
    except ValueError:
        return f"{scheme}://…"
    user = f"{p['user']}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"{scheme}://{user}{p.get('host', '')}{port}/{p.get('database', '')}"


def open_url(target: str, **params) -> pw.Database:
    """An unconnected peewee database for URL `target`: PostgreSQL (postgres:// or postgresql://)
    as a ServerDatabase, percent-escapes in user and password decoded (as libpq does), with a
    connect timeout unless the URL sets one; any other URL as playhouse.db_url makes it. `params`
    go to the driver (over the URL's own). Raises ConfigError (naming the URL without its
    password) for a PostgreSQL URL that cannot be used."""
    if urlparse(target).scheme not in PG_SCHEMES:
        return connect_url(target, **params)  # as before: SQLite URLs, other servers
    try:
        kwargs = parse_url(target, unquote_password=True, unquote_user=True)
    except ValueError as exc:  # its text may hold the whole URL
        raise ConfigError(f"QF_DB: {where(target)} is not a database URL peewee can use "
                          f"({type(exc).__name__})") from None
    if not kwargs.get("database"):
        raise ConfigError(f"QF_DB: {where(target)} names no database (postgresql://user:password@host:port/name)")
    kwargs.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
    kwargs.update(params)
    return ServerDatabase(**kwargs)


def _create_server_schema(db: pw.Database) -> None:
    with db.atomic():
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)" % PG_SCHEMA_LOCK)
        db.create_tables(MODELS, safe=True)
        add_missing_columns(db)
        _drop_replaced_indexes(db)


# what a server says when it refuses a login that only a person can fix (libpq's and the server's words)
_REFUSED = ("password authentication failed", "no password supplied", "does not exist", "permission denied",
            "authentication failed", "pg_hba.conf")


def _refused(target: str, exc: BaseException) -> StorageError | None:
    """The StorageError for a server that refuses this login or database for good, or None for an
    error that may pass (a server not up yet, a connection dropped)."""
    text = str(exc).strip()
    first = next((line for line in text.splitlines() if any(r in line.lower() for r in _REFUSED)), None)
    if first is None:
        return None
    return StorageError(f"cannot use the database {where(target)}: {first.strip()[:200]}")


def _unusable(path: str, exc: BaseException) -> StorageError | None:
    """The StorageError for a SQLite file that cannot be used at all, or None for an error that
    may pass (a lock, a full disk)."""
    text = str(exc).lower()
    if storage.read_only(path):
        return StorageError(f"cannot write {path}: read-only file system")
    if "file is not a database" in text:
        return StorageError(f"{path} is not a SQLite database (file is not a database)")
    if "malformed" in text:
        return StorageError(f"{path} is damaged ({exc})")
    if "unable to open database file" in text or "readonly database" in text:
        return StorageError(f"cannot open {path} for writing: {exc}")
    return None


# indexes an older file has that a newer one replaced (the replacement is made by create_tables)
REPLACED_INDEXES = ("fills_ts",)  # by fills (ts, fill_id)


def _drop_replaced_indexes(db: pw.Database) -> None:
    """Drop the indexes REPLACED_INDEXES names: each write would keep them up to date for no reader."""
    for name in REPLACED_INDEXES:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


def add_missing_columns(db: pw.Database) -> list[str]:
    """Add model columns an older database file lacks (new columns are nullable),
    so every service can read it. Returns the `table.column` names added."""
    from playhouse.migrate import SchemaMigrator, migrate

    def missing() -> list[tuple[str, pw.Field]]:
        out = []
        for model in MODELS:
            table = model._meta.table_name
            have = {c.name for c in db.get_columns(table)}
            out += [(table, f) for f in model._meta.sorted_fields if f.column_name not in have and f.null]
        return out

    todo = missing()
    if todo:
        migrator = SchemaMigrator.from_database(db)
        try:
            with db.atomic():
                migrate(*(migrator.add_column(t, f.column_name, f) for t, f in todo))
        except pw.OperationalError:
            if missing():  # not just another service adding the same columns first
                raise
    return [f"{t}.{f.column_name}" for t, f in todo]


def schema_problem(db: pw.Database) -> str | None:
    """What keeps the readers from querying `db` (a table or column of MODELS missing: a file
    the broker has not set up yet, or another program's), in a few words; None when every
    table and column is there. Checked before serving, not left to the queries: a column
    named in double quotes that a table lacks is, to SQLite, a string literal, so another
    program's `fills` table would read as rows of the column names."""
    tables = set(db.get_tables())
    for model in MODELS:
        table = model._meta.table_name
        if table not in tables:
            return f"it has no {table} table"
        have = {c.name for c in db.get_columns(table)}
        lacking = [f.column_name for f in model._meta.sorted_fields if f.column_name not in have]
        if lacking:
            return f"its {table} table has no {', '.join(lacking[:3])} column{'s' if len(lacking) > 1 else ''}"
    return None


def close_db() -> None:
    if database.obj is not None and not database.is_closed():
        database.close()


_INSERT_SQL: dict[tuple, str] = {}


def insert_rows(model: type[BaseModel], rows: list[dict]) -> None:
    """INSERT `rows` (dicts with the same keys) with SQL built once per model and
    column set: peewee's statement builder costs ~300 µs a row, which the
    broker's commit-before-ack path cannot afford. Runs inside the caller's
    transaction; raises peewee.IntegrityError like `Model.insert`."""
    if not rows:
        return
    cols = tuple(rows[0])
    fields_ = [model._meta.fields[c] for c in cols]
    key = (model, cols, type(database.obj).__name__)
    sql = _INSERT_SQL.get(key)
    if sql is None:
        param = database.obj.param
        sql = (f'INSERT INTO "{model._meta.table_name}" ("' + '", "'.join(f.column_name for f in fields_)
               + '") VALUES (' + ", ".join(param for _ in cols) + ")")
        _INSERT_SQL[key] = sql
    for row in rows:
        database.execute_sql(sql, [f.db_value(row[c]) for f, c in zip(fields_, cols)])


class RiskCheckpoint(BaseModel):
    """Issue #4: risk's own state that fills cannot rebuild (trading state with its reason
    and author, peak equity, the UTC day's start equity, fired breakers); the newest row
    is what risk resumes from after a restart."""
    ts = pw.BigIntegerField(index=True)
    state = pw.TextField()
    code = pw.TextField(default="")
    reason = pw.TextField(default="")
    by = pw.TextField(default="")
    state_ts = pw.BigIntegerField(default=0)
    peak_equity = DecimalText(null=True)
    day = pw.IntegerField(null=True)  # days since the epoch, UTC
    day_start_equity = DecimalText(null=True)
    tripped = pw.TextField(default="")  # breaker keys that fired and still hold, comma-separated

    class Meta:
        table_name = "risk_checkpoints"


MODELS = (*MODELS, RiskCheckpoint)


class JournalApplied(BaseModel):
    """The newest broker journal record stored here (shared/journal.py): one row, id 1. A record
    with a seq up to this one is never applied twice."""
    id = pw.IntegerField(primary_key=True)
    seq = pw.BigIntegerField()

    class Meta:
        table_name = "journal_applied"


MODELS = (*MODELS, JournalApplied)


class SignalRow(BaseModel):
    """Issue #13: a strategy signal worth keeping (a side change, or one that sent an order), with
    the features that produced it: why each order was sent. `side` is BUY, SELL or FLAT (as on `signal.*`);
    `features` a compact JSON object name -> number; `client_order_id`/`action` name the order it
    triggered ("" for none) and why ("entry", "exit:stop_loss", ...)."""
    ts = pw.BigIntegerField(index=True)
    symbol = pw.TextField()
    side = pw.TextField(default="FLAT")
    confidence = pw.FloatField()  # a score, not money
    score = pw.FloatField()
    features = pw.TextField(default="{}")
    update_id = pw.BigIntegerField(default=0)
    recv_ts = pw.BigIntegerField(default=0)
    client_order_id = pw.TextField(default="")
    action = pw.TextField(default="")

    class Meta:
        table_name = "signals"


MODELS = (*MODELS, SignalRow)


class PositionRow(BaseModel):
    """Issue #15: each symbol's position and P&L as all its fills so far make it (shared/ledger.py's
    average cost, exact), kept by the broker in the same transaction as the fills
    (shared/aggregates.py), so the API answers positions, P&L and stats from one row per
    symbol instead of re-reading every fill. Absolute values, written whole each time: storing
    a journal record twice cannot count a fill twice."""
    symbol = pw.TextField(primary_key=True)
    qty = DecimalText()
    cost = DecimalText()  # signed: qty × average entry price
    realized = DecimalText()  # before fees
    fees = DecimalText()  # paid in the symbol's quote asset (they count in P&L)
    other_fees = pw.TextField(default="{}")  # JSON {asset: "decimal"}: fees paid in any other asset
    fills = pw.BigIntegerField()
    last_price = DecimalText(null=True)
    last_ts = pw.BigIntegerField(null=True)  # the newest fill's ts
    trip_pnl = DecimalText()  # the open round trip's net P&L so far (Position.trip_pnl)
    trips = pw.BigIntegerField()  # round trips closed (to flat or through it)
    wins = pw.BigIntegerField()  # of which net P&L > 0
    gross_win = DecimalText()  # sum of the winning trips' net P&L (≥ 0)
    gross_loss = DecimalText()  # sum of the losing trips' net P&L (≤ 0)
    maker_fills = pw.BigIntegerField()
    notional = DecimalText()  # sum of price × qty
    maker_notional = DecimalText()
    slip_n = pw.BigIntegerField()  # fills with a slippage_arrival
    slip_sum = DecimalText()  # sum of their slippage_arrival (quote per unit; > 0 cost)
    slip_cost = DecimalText()  # sum of slippage_arrival × qty (quote)

    class Meta:
        table_name = "positions"


class PnlDayRow(BaseModel):
    """Issue #15: one UTC day's realized P&L per symbol (day of the fill's `ts`), kept by the
    broker beside `positions` (absolute values, written whole)."""
    day = pw.IntegerField()  # days since the epoch, UTC
    symbol = pw.TextField()
    realized = DecimalText()
    fees = DecimalText()  # quote-asset fees
    fills = pw.BigIntegerField()
    trips = pw.BigIntegerField()
    wins = pw.BigIntegerField()
    notional = DecimalText()

    class Meta:
        table_name = "pnl_days"
        primary_key = pw.CompositeKey("day", "symbol")


class OrderCountRow(BaseModel):
    """Issue #15: how many orders are in each status now, kept by the broker with the orders
    (absolute values, written whole), so a status query does not count every order."""
    status = pw.TextField(primary_key=True)
    n = pw.BigIntegerField()

    class Meta:
        table_name = "order_counts"


MODELS = (*MODELS, PositionRow, PnlDayRow, OrderCountRow)


def _insert_sql(model: type[BaseModel], cols: tuple[str, ...], param: str) -> str:
    meta = model._meta.fields
    return (f'INSERT INTO "{model._meta.table_name}" ("' + '", "'.join(meta[c].column_name for c in cols)
            + '") VALUES (' + ", ".join(param for _ in cols) + ")")


# The broker's statements, as its journal records them: (kind, parameter tuple), the values
# already as the columns store them (money as exact decimal text). Kinds are part of the
# journal's format: append new ones, never renumber.
ORDER_COLS = ("order_id", "client_order_id", "strategy", "symbol", "side", "kind", "tif", "qty", "price",
              "status", "filled_qty", "avg_price", "reason", "created_ts", "updated_ts", "arrival_ts",
              "decision_mid", "arrival_mid")
ORDER_UPDATE_COLS = ("status", "filled_qty", "avg_price", "reason", "updated_ts", "arrival_ts", "decision_mid",
                     "arrival_mid")  # then order_id
FILL_COLS = ("fill_id", "order_id", "client_order_id", "symbol", "side", "price", "qty", "fee", "fee_asset",
             "liquidity", "exch_ts", "ts", "mid_at_fill", "decision_mid", "arrival_mid", "slippage_decision",
             "slippage_arrival", "queue_wait_ns")
EQUITY_COLS = ("ts", "equity", "cash", "note")
SIGNAL_COLS = ("ts", "symbol", "side", "confidence", "score", "features", "update_id", "recv_ts", "client_order_id",
               "action")  # services/strategy/ofi.py signal_params() gives them in this order
POSITION_COLS = ("symbol", "qty", "cost", "realized", "fees", "other_fees", "fills", "last_price", "last_ts",
                 "trip_pnl", "trips", "wins", "gross_win", "gross_loss", "maker_fills", "notional", "maker_notional",
                 "slip_n", "slip_sum", "slip_cost")  # shared/aggregates.py position_row() gives them in this order
PNL_DAY_COLS = ("day", "symbol", "realized", "fees", "fills", "trips", "wins", "notional")  # day_row()'s order
ORDER_INSERT, ORDER_UPDATE, FILL_INSERT, EQUITY_INSERT, SIGNAL_INSERT = 0, 1, 2, 3, 4
# issue #15: a symbol's row of `positions` / a (day, symbol) row of `pnl_days`, written whole (absolute
# values: storing a record twice leaves the same row)
ORDER_COUNT_COLS = ("status", "n")
POSITION_UPSERT, PNL_DAY_UPSERT, ORDER_COUNT_UPSERT = 5, 6, 7


def _upsert_sql(model: type[BaseModel], cols: tuple[str, ...], keys: tuple[str, ...], param: str) -> str:
    meta = model._meta.fields
    names = [meta[c].column_name for c in cols]
    key_names = [meta[c].column_name for c in keys]
    return (_insert_sql(model, cols, param) + ' ON CONFLICT ("' + '", "'.join(key_names) + '") DO UPDATE SET '
            + ", ".join(f'"{n}" = excluded."{n}"' for n in names if n not in key_names))


def journal_sql(param: str = "?") -> dict[int, str]:
    """The SQL of each journal statement kind, with `param` as the placeholder."""
    return {ORDER_INSERT: _insert_sql(OrderRow, ORDER_COLS, param),
            ORDER_UPDATE: ('UPDATE "orders" SET ' + ", ".join(f'"{c}" = {param}' for c in ORDER_UPDATE_COLS)
                           + f' WHERE "order_id" = {param}'),
            FILL_INSERT: _insert_sql(FillRow, FILL_COLS, param),
            EQUITY_INSERT: _insert_sql(EquitySnapshot, EQUITY_COLS, param),
            SIGNAL_INSERT: _insert_sql(SignalRow, SIGNAL_COLS, param),
            POSITION_UPSERT: _upsert_sql(PositionRow, POSITION_COLS, ("symbol",), param),
            PNL_DAY_UPSERT: _upsert_sql(PnlDayRow, PNL_DAY_COLS, ("day", "symbol"), param),
            ORDER_COUNT_UPSERT: _upsert_sql(OrderCountRow, ORDER_COUNT_COLS, ("status",), param)}


JOURNAL_SQL = journal_sql()


class SessionRow(BaseModel):
    """Issue #12: one row per start of a service that records its settings (the broker, at
    start): `settings` is a JSON object of `QF_NAME -> text` (`Config.effective()`, secrets
    masked). `qf parity` backtests a capture with the newest broker row's settings."""
    ts = pw.BigIntegerField(index=True)
    service = pw.TextField()
    settings = pw.TextField()

    class Meta:
        table_name = "sessions"


MODELS = (*MODELS, SessionRow)


def record_session(service: str, settings: dict[str, str], ts: int) -> None:
    """Insert a `sessions` row for `service` started at `ts` with `settings` (already masked).
    Called once at start, off every hot path; raises peewee's error for the caller to log."""
    import json
    SessionRow.insert(ts=ts, service=service, settings=json.dumps(settings, sort_keys=True)).execute()
