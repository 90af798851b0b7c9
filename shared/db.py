"""Peewee models and database initialisation (SQLite WAL, or a peewee URL).

Money columns are TEXT holding canonical decimal strings: exact, unlike
SQLite's NUMERIC affinity, which would store them as REAL."""
from __future__ import annotations

import os
from decimal import Decimal

import peewee as pw
from playhouse.db_url import connect as connect_url

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
    symbol = pw.TextField(index=True)
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

    class Meta:
        table_name = "orders"


class FillRow(BaseModel):
    """One execution; committed before anyone is told of it."""
    fill_id = pw.TextField(primary_key=True)
    order_id = pw.TextField(index=True)
    client_order_id = pw.TextField(index=True)
    symbol = pw.TextField(index=True)
    side = pw.TextField()
    price = DecimalText()
    qty = DecimalText()
    fee = DecimalText()
    fee_asset = pw.TextField()
    liquidity = pw.TextField()
    exch_ts = pw.BigIntegerField()
    ts = pw.BigIntegerField(index=True)
    mid_at_fill = DecimalText(null=True)

    class Meta:
        table_name = "fills"


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
    bind the models to it and create missing tables. Returns the database."""
    if "://" in target:
        db = connect_url(target)
    else:
        parent = os.path.dirname(os.path.abspath(target))
        os.makedirs(parent, exist_ok=True)
        db = pw.SqliteDatabase(target, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    database.initialize(db)
    db.connect(reuse_if_open=True)
    if create:
        db.create_tables(MODELS, safe=True)
    return db


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
