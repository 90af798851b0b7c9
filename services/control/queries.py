"""The one query layer over shared/db.py: trades, orders, positions, P&L, equity, risk, stats, signals.

Every answer costs O(page) or O(symbols), never O(all fills) — but a windowed /stats, which
reads the fills in its window over the ts index: positions, P&L and the trip tallies come from
the tables the broker keeps beside the fills (`positions`, `pnl_days`, `order_counts`;
shared/aggregates.py), pages are keyset-paginated on an index (a cursor is the last row's key
with its endpoint and a check, so a page never skips or repeats a row while the broker writes).
A money value that is not an amount is never served (NotAnAmount). Reads go through the
read-only WAL connection: they never block the broker's writes."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterable

import peewee as pw

from shared.db import FillRow, PositionRow, RiskEvent, SignalRow, database
from shared.enums import OrderStatus, TradingState
from shared.ledger import Ledger, Position
from shared.money import quote_asset

ZERO = Decimal(0)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


DAY_NS = 86_400 * 1_000_000_000

__all__ = ["Position", "quote_asset", "positions_from", "position_dict", "ping", "positions",
           "latest_equity", "order_counts", "summary", "risk_state", "render_decimal", "jsonable",
           "BadCursor", "NotAnAmount", "trades_page", "orders_page", "signals_page", "pnl", "equity_series", "risk_events",
           "denials_by_reason", "stats", "money_text"]


class BadCursor(ValueError):
    """A pagination cursor this endpoint did not make (a front end answers 400)."""


class NotAnAmount(pw.DatabaseError):
    """A money column holds text that is not a decimal amount (NaN, 1e999, abc: a damaged row).
    The database is the broker's and trusted, but such a value is never served as money: the
    front end answers 503 `db_unavailable` with this message (table.column and the row's key); a
    DatabaseError, so whatever treats the database as unavailable (metrics, Telegram) does too."""

    def __init__(self, table: str, column: str, key: object) -> None:
        super().__init__(f"the database holds a value that is not an amount: {table}.{column} of the row "
                         f"{str(key)[:60]}")


# what the broker writes into a money column (DecimalText: format(d, "f")); anything else is damage
_AMOUNT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
# a column's non-null texts joined by "\n": one C-level match for a page's thousand values
# (possessive: no backtracking; ~40 µs for 1000 values, a per-value match or Decimal() ~120 µs)
_AMOUNTS = re.compile(r"(?:-?[0-9]+(?:\.[0-9]+)?\n)*+-?[0-9]+(?:\.[0-9]+)?")


def amount(text, table: str, column: str, key: object) -> Decimal:
    """`text` from table.column (the row `key`) as a Decimal; NotAnAmount when it is not one."""
    if type(text) is not str or not _AMOUNT.fullmatch(text):
        if isinstance(text, (int, Decimal)) and not isinstance(text, bool) and Decimal(text).is_finite():
            return Decimal(text)  # a server database may hand a NUMERIC back as a number
        raise NotAnAmount(table, column, key)
    return Decimal(text)


def check_amounts(values: list, table: str, column: str, keys: list) -> None:
    """Raise NotAnAmount for the first of `values` (texts or None; `keys` the rows' keys) that is
    not an amount. One regex match over the column joined, not one per value (see _page)."""
    texts = [v for v in values if v is not None]
    if not texts:
        return
    try:
        if _AMOUNTS.fullmatch("\n".join(texts)):
            return
    except TypeError:  # not all text: found below
        pass
    for v, k in zip(values, keys):
        if v is not None:
            amount(v, table, column, k)


# Cursors: "<kind>.<ts hex>.<id>.<check>". The kind names the endpoint (t trades, o orders, s
# signals); the check is a keyed BLAKE2b of the rest under a fixed key: not a secret (every
# worker and every restart must take the cursors the others gave), only what makes a made-up,
# edited or another endpoint's cursor fail (a 1 in 2^40 chance by luck).
CURSOR_KINDS = {"trades": "t", "orders": "o", "signals": "s"}
_CURSOR_KEY = b"quantumflow-cursor-v1"
_CURSOR = re.compile(r"([tos])\.(-?[0-9a-f]{1,16})\.([A-Za-z0-9_-]{1,100})\.([0-9a-f]{10})")
_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_HEX_ID = re.compile(r"[0-9a-f]{1,16}")
CURSOR_REFUSED = "cursor: not one this endpoint gave (pass the next_cursor of its previous page)"


def _check(body: str) -> str:
    return hashlib.blake2b(body.encode(), key=_CURSOR_KEY, digest_size=5).hexdigest()


def encode_cursor(kind: str, ts: int, row_id: str | int) -> str:
    """A page's last row key as the next page's cursor of endpoint `kind` (CURSOR_KINDS): the
    endpoint's letter, the row's time in hex, its id (an integer id in hex), a check. An id outside
    [A-Za-z0-9_-] (never made by this broker) gives "-": a cursor of the row's time alone."""
    rid = f"{row_id:x}" if isinstance(row_id, int) else (row_id if _ID.fullmatch(row_id) else "-")
    body = f"{CURSOR_KINDS[kind]}.{ts:x}.{rid}"
    return f"{body}.{_check(body)}"


def decode_cursor(kind: str, cursor: str, int_id: bool = False) -> tuple[int, str | int]:
    """(ts, id) from a cursor endpoint `kind` gave; BadCursor for anything else: malformed, edited,
    made up, or another endpoint's."""
    m = _CURSOR.fullmatch(cursor)
    if m is None or m[1] != CURSOR_KINDS[kind] or not hmac.compare_digest(m[4], _check(cursor[:m.start(4) - 1])):
        raise BadCursor(CURSOR_REFUSED)
    ts = int(m[2], 16)
    if int_id and not _HEX_ID.fullmatch(m[3]) or not -2**63 <= ts < 2**63:
        raise BadCursor(CURSOR_REFUSED)
    return ts, int(m[3], 16) if int_id else m[3]


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
            "unrealized_pnl": pos.unrealized(), "last_price": pos.last_price, "fills": pos.fills}


def ping() -> None:
    """Raise if the database cannot answer a query on the fills table."""
    FillRow.select(FillRow.fill_id).limit(1).execute()


def _position(row: tuple) -> Position:
    symbol, qty, cost, realized, fees, other, fills, last_price = row

    def money(text, column):
        return amount(text, "positions", column, symbol)
    pos = Position(symbol, qty=money(qty, "qty"), cost=money(cost, "cost"), realized=money(realized, "realized"),
                   fees=money(fees, "fees"), last_price=None if last_price is None else money(last_price, "last_price"),
                   fills=fills)
    try:
        other_fees = json.loads(other or "{}")
    except ValueError:
        other_fees = None
    if not isinstance(other_fees, dict):
        raise NotAnAmount("positions", "other_fees", symbol)
    pos.other_fees = {k: money(v, "other_fees") for k, v in other_fees.items()}
    return pos


def positions(symbol: str | None = None) -> list[Position]:
    """Every symbol's position as the broker keeps it from all its fills (table `positions`,
    one row per symbol), sorted by symbol."""
    p = database.param
    sql = ('SELECT "symbol", "qty", "cost", "realized", "fees", "other_fees", "fills", "last_price" FROM "positions"'
           + (f' WHERE "symbol" = {p}' if symbol else "") + ' ORDER BY "symbol"')
    return [_position(r) for r in database.execute_sql(sql, [symbol.upper()] if symbol else []).fetchall()]


def latest_equity() -> dict | None:
    """The newest equity snapshot as {ts, equity, cash, note}, or None."""
    row = database.execute_sql('SELECT "ts", "equity", "cash", "note", "id" FROM "equity" '
                               'ORDER BY "ts" DESC, "id" DESC LIMIT 1').fetchone()
    return _snapshot(row)


def _snapshot(row: tuple | None) -> dict | None:
    """An equity row (ts, equity, cash, note, id) as {ts, equity, cash, note}; NotAnAmount when damaged."""
    if row is None:
        return None
    ts, eq, cash, note, rid = row
    return {"ts": ts, "equity": amount(eq, "equity", "equity", rid), "cash": amount(cash, "equity", "cash", rid),
            "note": note}


def order_counts() -> dict[str, int]:
    """Orders per status (table `order_counts`, kept by the broker); every status present, zero when none."""
    counts = {s.value: 0 for s in OrderStatus}
    for status, n in database.execute_sql('SELECT "status", "n" FROM "order_counts"').fetchall():
        counts[status] = n
    return counts


def fill_count() -> int:
    """Fills stored: the sum of the positions' fill counts (not COUNT(*) over every fill)."""
    return int(database.execute_sql('SELECT COALESCE(SUM("fills"), 0) FROM "positions"').fetchone()[0])


def summary() -> dict[str, Any]:
    """Fills count, orders by status, latest equity and positions, from one read snapshot."""
    with database.atomic():
        return {"fills": fill_count(), "orders": order_counts(), "equity": latest_equity(),
                "positions": positions()}


def risk_state() -> dict[str, Any]:
    """The newest trading-state change risk stored (a `risk_events` row of kind STATE) as
    {state, code, reason, by, ts}; {"state": "ACTIVE", code/reason/by "", ts None} when none.
    One query, newest first by `ts` (risk writes "reason [by who]" in `text`)."""
    row = database.execute_sql('SELECT "ts", "code", "text", "state" FROM "risk_events" WHERE "kind" = \'STATE\' '
                               'ORDER BY "ts" DESC, "id" DESC LIMIT 1').fetchone()
    if row is None:
        return {"state": TradingState.ACTIVE.value, "code": "", "reason": "", "by": "", "ts": None}
    ts, code, text, state = row
    reason, by = text, ""
    head, sep, tail = text.rpartition(" [by ")
    if sep and tail.endswith("]"):
        reason, by = head, tail[:-1]
    return {"state": state, "code": code, "reason": reason, "by": by, "ts": ts}


TRADE_COLUMNS = ("fill_id", "order_id", "client_order_id", "symbol", "side", "price", "qty", "fee", "fee_asset",
                 "liquidity", "exch_ts", "ts", "mid_at_fill", "decision_mid", "arrival_mid", "slippage_decision",
                 "slippage_arrival", "queue_wait_ns")
ORDER_COLUMNS = ("order_id", "client_order_id", "strategy", "symbol", "side", "kind", "tif", "qty", "price", "status",
                 "filled_qty", "avg_price", "reason", "created_ts", "updated_ts", "arrival_ts", "decision_mid",
                 "arrival_mid")
MONEY_COLUMNS = frozenset(("price", "qty", "fee", "mid_at_fill", "decision_mid", "arrival_mid", "slippage_decision",
                            "slippage_arrival", "filled_qty", "avg_price"))


def money_text(text: str | None) -> str | None:
    """A money column's stored text (DecimalText: exact, fixed-point) as `render_decimal` shows
    it, by string operations: no Decimal on a page's thousand values. (Done in SQL with rtrim and
    CASE it measured 3× slower than here.)"""
    if text is None or "." not in text:
        return "0" if text == "-0" else text
    text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "", "-") else text


def _page(kind: str, table: str, columns: tuple[str, ...], ts_col: str, id_col: str,
          filters: list[tuple[str, object]], start: int | None, end: int | None, cursor: str | None,
          limit: int) -> tuple[list[dict], str | None]:
    """Rows of `table` newest first by (ts_col, id_col), keyset-paginated; `filters` are
    (column, value) equalities. Raw SQL over the ts index: peewee's builder and its Decimal
    conversions cost more than the query (the text is rendered as stored, see money_text)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    p = database.param
    where, params = [], []
    for col, value in filters:
        where.append(f'"{col}" = {p}')
        params.append(value)
    if start is not None:
        where.append(f'"{ts_col}" >= {p}')
        params.append(start)
    if end is not None:
        where.append(f'"{ts_col}" < {p}')
        params.append(end)
    if cursor:
        ts, row_id = decode_cursor(kind, cursor)
        where.append(f'"{ts_col}" <= {p} AND ("{ts_col}" < {p} OR "{id_col}" < {p})')
        params += [ts, ts, row_id]
    sql = (f'SELECT {", ".join(chr(34) + c + chr(34) for c in columns)} FROM "{table}"'
           + (" WHERE " + " AND ".join(where) if where else "")
           + f' ORDER BY "{ts_col}" DESC, "{id_col}" DESC LIMIT {p}')
    params.append(limit + 1)
    fetched = database.execute_sql(sql, params).fetchall()
    # column-wise: a comprehension per money column, with money_text's work only for text ending
    # in "0" (what format(d, "f") leaves behind); a loop over each cell measured 5× slower
    cells = list(zip(*fetched[:limit])) or [()] * len(columns)
    keys = cells[columns.index(id_col)] if fetched else ()
    for i, c in enumerate(columns):
        if c in MONEY_COLUMNS:
            # a damaged value (NaN, 1e999, abc) is never served as money: NotAnAmount (503)
            check_amounts(cells[i], table, c, keys)
            cells[i] = [v if v is None or v[-1:] != "0" else money_text(v) for v in cells[i]]
    rows = [dict(zip(columns, r)) for r in zip(*cells)]
    more = len(fetched) > limit
    return rows, encode_cursor(kind, rows[-1][ts_col], rows[-1][id_col]) if more else None


def trades_page(symbol: str | None = None, side: str | None = None, start: int | None = None,
                end: int | None = None, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> tuple[list[dict], str | None]:
    """One page of fills, newest first, with the fill-quality fields; filters: symbol, side, ts in
    [start, end). Returns (rows, the next page's cursor or None), money as decimal strings. Keyset
    on (ts, fill_id) over the ts index: any page costs the same. Raises BadCursor, ValueError for
    a limit out of range."""
    filters = [(c, v) for c, v in (("symbol", symbol.upper() if symbol else None), ("side", side)) if v]
    return _page("trades", "fills", TRADE_COLUMNS, "ts", "fill_id", filters, start, end, cursor, limit)


def orders_page(symbol: str | None = None, side: str | None = None, status: str | None = None,
                start: int | None = None, end: int | None = None, limit: int = DEFAULT_LIMIT,
                cursor: str | None = None) -> tuple[list[dict], str | None]:
    """One page of orders, newest first by created_ts (keyset on (created_ts, order_id)); filters:
    symbol, side, status, created_ts in [start, end). Raises BadCursor."""
    filters = [(c, v) for c, v in (("symbol", symbol.upper() if symbol else None), ("side", side),
                                   ("status", status)) if v]
    return _page("orders", "orders", ORDER_COLUMNS, "created_ts", "order_id", filters, start, end, cursor, limit)


def signals_page(symbol: str | None = None, start: int | None = None, end: int | None = None,
                 limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> tuple[list[dict], str | None]:
    """One page of stored strategy signals, newest first (keyset on (ts, id)); `features` as an
    object. Raises BadCursor."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    query = SignalRow.select()
    if symbol:
        query = query.where(SignalRow.symbol == symbol.upper())
    if start is not None:
        query = query.where(SignalRow.ts >= start)
    if end is not None:
        query = query.where(SignalRow.ts < end)
    if cursor:
        ts, row_id = decode_cursor("signals", cursor, int_id=True)
        query = query.where((SignalRow.ts <= ts) & ((SignalRow.ts < ts) | (SignalRow.id < row_id)))
    rows = list(query.order_by(SignalRow.ts.desc(), SignalRow.id.desc()).limit(limit + 1).dicts())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor("signals", rows[-1]["ts"], rows[-1]["id"]) if more else None
    for row in rows:
        row.pop("id")
        try:
            features = json.loads(row["features"] or "{}")
        except ValueError:
            features = None
        row["features"] = features if isinstance(features, dict) else {}
        for key in ("confidence", "score"):  # JSON has no NaN or infinity
            if not math.isfinite(row[key]):
                row[key] = 0.0
    return rows, next_cursor


def equity_at(ts: int) -> dict | None:
    """The newest equity snapshot taken before `ts`, or None."""
    row = database.execute_sql(f'SELECT "ts", "equity", "cash", "note", "id" FROM "equity" WHERE "ts" < '
                               f'{database.param} ORDER BY "ts" DESC, "id" DESC LIMIT 1', [ts]).fetchone()
    return _snapshot(row)


def pnl(now_ns: int) -> dict[str, Any]:
    """Realized (before fees), unrealized (open quantity at the last fill price), quote fees,
    fees in other assets, net; the latest equity; today's (UTC) realized P&L and fees from
    `pnl_days`, and the equity change since the last snapshot before the day began."""
    with database.atomic():
        found = positions()
        day = now_ns // DAY_NS
        today = [(amount(r, "pnl_days", "realized", f"{day}/{sym}"), amount(f, "pnl_days", "fees", f"{day}/{sym}"), n)
                 for r, f, n, sym in database.execute_sql(
                     f'SELECT "realized", "fees", "fills", "symbol" FROM "pnl_days" WHERE "day" = {database.param}',
                     [day]).fetchall()]
        latest, start = latest_equity(), equity_at(day * DAY_NS)
    realized = sum((p.realized for p in found), ZERO)
    fees = sum((p.fees for p in found), ZERO)
    unrealized = sum((p.unrealized() for p in found), ZERO)
    other: dict[str, Decimal] = {}
    for p in found:
        for asset, value in p.other_fees.items():
            other[asset] = other.get(asset, ZERO) + value
    t_realized = sum((r for r, _, _ in today), ZERO)
    t_fees = sum((f for _, f, _ in today), ZERO)
    return {"realized": realized, "unrealized": unrealized, "fees": fees, "other_fees": other,
            "net_realized": realized - fees, "net": realized - fees + unrealized, "equity": latest,
            "today": {"day": datetime.fromtimestamp(day * 86_400, timezone.utc).date().isoformat(),
                      "realized": t_realized, "fees": t_fees, "net_realized": t_realized - t_fees,
                      "fills": sum(n for _, _, n in today),
                      "equity_start": None if start is None else start["equity"],
                      "equity_change": None if start is None or latest is None else latest["equity"] - start["equity"]},
            "symbols": len(found)}


INTERVALS_S = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14_400, "1d": 86_400}
MAX_POINTS = 500


def equity_series(start: int, end: int, interval: str = "auto") -> dict[str, Any]:
    """Equity resampled over [start, end) (`start` taken as 0 when before the epoch): the last
    snapshot of each `interval` bucket (buckets aligned to the epoch), at most MAX_POINTS+1 points
    ("auto" picks the smallest interval that fits; an asked interval that would make more than
    20 × MAX_POINTS points is widened the same way: `interval_s` says what was used,
    `interval_widened_from` the asked one, and `note` why); none for end ≤ start."""
    start = max(start, 0)
    span_s = max(end - start, 0) / 1e9
    asked = None if interval == "auto" else INTERVALS_S[interval]
    step = asked
    if step is None or span_s / step > MAX_POINTS * 20:  # too many for the range asked: coarser, said so
        step = next((v for v in INTERVALS_S.values() if span_s / v <= MAX_POINTS), None)
        if step is None:
            step = math.ceil(span_s / MAX_POINTS / 86_400) * 86_400
    widened = asked if asked is not None and step != asked else None
    note = None if widened is None else (
        f"interval {interval} would make {math.ceil(span_s / asked):,} points over this range (at most "
        f"{MAX_POINTS * 20:,} are served at an asked interval): widened to {step} s, at most {MAX_POINTS} points")
    bucket_ns = step * 1_000_000_000
    # SQLite takes the bare columns from the row holding MAX(ts): each bucket's last snapshot
    # (SQLite's rule; PostgreSQL has no such rule: DISTINCT ON, the newest by (ts, id) of each bucket)
    p = database.param
    if _server():
        sql = (f'SELECT DISTINCT ON ("ts" / {p}) "ts", "equity", "cash", "id" FROM "equity" WHERE "ts" >= {p} '
               f'AND "ts" < {p} ORDER BY "ts" / {p}, "ts" DESC, "id" DESC')
        rows = database.execute_sql(sql, (bucket_ns, start, end, bucket_ns)).fetchall()
    else:
        sql = (f'SELECT MAX("ts"), "equity", "cash", "id" FROM "equity" WHERE "ts" >= {p} AND "ts" < {p} '
               f'GROUP BY "ts" / {p} ORDER BY 1')
        rows = database.execute_sql(sql, (start, end, bucket_ns)).fetchall()
    return {"interval_s": step, "requested_interval_s": asked, "interval_widened_from": widened, "note": note,
            "from": start, "to": end,
            "points": [{"ts": ts, "equity": amount(eq, "equity", "equity", rid),
                        "cash": amount(cash, "equity", "cash", rid)} for ts, eq, cash, rid in rows]}


def risk_events(limit: int = 50) -> list[dict]:
    """The newest risk events (denials and state changes), newest first."""
    query = (RiskEvent.select(RiskEvent.ts, RiskEvent.kind, RiskEvent.code, RiskEvent.text,
                              RiskEvent.client_order_id, RiskEvent.symbol, RiskEvent.state)
             .order_by(RiskEvent.ts.desc(), RiskEvent.id.desc()).limit(limit))
    return list(query.dicts())


def denials_by_reason(since: int) -> dict[str, int]:
    """Denials since `since` (ns) counted by code (the (kind, ts) index bounds the scan)."""
    query = (RiskEvent.select(RiskEvent.code, pw.fn.COUNT(RiskEvent.id))
             .where((RiskEvent.kind == "DENIED") & (RiskEvent.ts >= since)).group_by(RiskEvent.code))
    return {code: n for code, n in query.tuples()}


def _ratio(a, b) -> float | None:
    return float(a) / float(b) if b else None


# /stats' fields the window [from, to) applies to, and those that are over every fill whatever
# the window (the answer's `window` says so). A round trip's closing and its P&L depend on the
# position when the window opens, which only a fold of every earlier fill gives (qf report does
# that: seconds on 1M fills); the broker keeps the trips' tallies for all time (`positions`).
STATS_WINDOWED = ("fills", "maker_share", "maker_notional_share", "notional", "fees", "slippage", "equity")
STATS_ALL_TIME = ("round_trips", "wins", "losses", "win_rate", "profit_factor", "gross_win", "gross_loss")
_FILL_STATS = ('SELECT "fill_id", "symbol", "price", "qty", "fee", "fee_asset", "liquidity", "slippage_arrival" '
               'FROM "fills" WHERE "ts" >= {p} AND "ts" < {p}')


def _window_fills(start: int, end: int) -> dict[str, Any]:
    """The fill figures of the fills with ts in [start, end), read over the (ts, fill_id) index:
    O(fills in the window), exact (Decimal)."""
    fills = maker = slip_n = 0
    notional = maker_notional = slip_sum = slip_cost = ZERO
    fees: dict[str, Decimal] = {}
    quotes: dict[str, str] = {}
    if end > start:
        for batch in _batches(_FILL_STATS.format(p=database.param), (start, end)):
            for fill_id, symbol, price, qty, fee, fee_asset, liquidity, slip in batch:
                q = amount(qty, "fills", "qty", fill_id)
                value = amount(price, "fills", "price", fill_id) * q
                f = amount(fee, "fills", "fee", fill_id)
                fills += 1
                notional += value
                if liquidity == "MAKER":
                    maker += 1
                    maker_notional += value
                if slip is not None:
                    sl = amount(slip, "fills", "slippage_arrival", fill_id)
                    slip_n += 1
                    slip_sum += sl
                    slip_cost += sl * q
                if f:
                    quote = quotes.get(symbol)
                    if quote is None:
                        quote = quotes[symbol] = Position(symbol).quote
                    asset = quote if not fee_asset or fee_asset == quote or not quote else fee_asset
                    fees[asset] = fees.get(asset, ZERO) + f
    return {"fills": fills, "maker": maker, "notional": notional, "maker_notional": maker_notional,
            "fees": fees, "slip_n": slip_n, "slip_sum": slip_sum, "slip_cost": slip_cost}


def _covers(table: str, lo: int, hi: int) -> bool:
    """Whether [lo, hi) holds every row of `table` by ts (an empty table: yes)."""
    # two subqueries: SQLite answers a lone MIN or MAX from the index's end, both at once by a scan
    first, last = database.execute_sql(f'SELECT (SELECT MIN("ts") FROM "{table}"), '
                                       f'(SELECT MAX("ts") FROM "{table}")').fetchone()
    return first is None or (lo <= first and last < hi)


def _all_time_fills(found: list[Position], rows: list[tuple]) -> dict[str, Any]:
    """The same figures as `_window_fills` over every fill, from the `positions` rows."""
    def total(i: int, column: str) -> Decimal:
        return sum((amount(r[i], "positions", column, r[0]) for r in rows), ZERO)
    fees: dict[str, Decimal] = {}
    for pos in found:
        for asset, value in pos.fees_by_asset().items():
            fees[asset] = fees.get(asset, ZERO) + value
    return {"fills": sum(r[1] for r in rows), "maker": sum(r[6] for r in rows), "notional": total(7, "notional"),
            "maker_notional": total(8, "maker_notional"), "fees": fees, "slip_n": sum(r[9] for r in rows),
            "slip_sum": total(10, "slip_sum"), "slip_cost": total(11, "slip_cost")}


def stats(start: int | None = None, end: int | None = None) -> dict[str, Any]:
    """Fill figures (count, maker share, notional, fees by asset, slippage) and the equity curve's
    (Sharpe from hourly closes, annualised by √8760; max drawdown) over [start, end) — without
    either, over everything, from the positions' tallies and the all-time curve; with one, over
    the fills and snapshots in the window, each read over its ts index. Round trips (win rate,
    profit factor) are always all time: `window` lists which fields the window applies to."""
    cols = (PositionRow.symbol, PositionRow.fills, PositionRow.trips, PositionRow.wins, PositionRow.gross_win,
            PositionRow.gross_loss, PositionRow.maker_fills, PositionRow.notional, PositionRow.maker_notional,
            PositionRow.slip_n, PositionRow.slip_sum, PositionRow.slip_cost)
    windowed = start is not None or end is not None
    lo, hi = start if start is not None else 0, end if end is not None else 2**63 - 1
    with database.atomic():
        rows = list(PositionRow.select(*cols).tuples())
        # a window that holds every fill (or every snapshot) is answered from the all-time figures:
        # the same numbers, without reading each row (MIN/MAX: two index lookups)
        every_fill = not windowed or _covers("fills", lo, hi)
        f = _all_time_fills(positions(), rows) if every_fill else _window_fills(lo, hi)
        if hi <= lo:
            curve = _curve_figures([], None, None)
        else:
            curve = _equity_curve(None, None) if not windowed or _covers("equity", lo, hi) else _equity_curve(lo, hi)
    trips = sum(r[2] for r in rows)
    wins = sum(r[3] for r in rows)
    gross_win = sum((amount(r[4], "positions", "gross_win", r[0]) for r in rows), ZERO)
    gross_loss = sum((amount(r[5], "positions", "gross_loss", r[0]) for r in rows), ZERO)
    losses = trips - wins  # a trip of exactly zero counts as a trip, not a win
    notional, slip_n, slip_cost = f["notional"], f["slip_n"], f["slip_cost"]
    return {"fills": f["fills"], "round_trips": trips, "wins": wins, "losses": losses,
            "win_rate": _ratio(wins, trips), "profit_factor": _ratio(gross_win, -gross_loss),
            "gross_win": gross_win, "gross_loss": gross_loss, "maker_share": _ratio(f["maker"], f["fills"]),
            "maker_notional_share": _ratio(f["maker_notional"], notional), "notional": notional,
            "fees": dict(sorted(f["fees"].items())),
            "slippage": {"fills": slip_n, "mean_per_unit": (f["slip_sum"] / slip_n) if slip_n else None,
                         "cost": slip_cost, "cost_bps": _ratio(slip_cost * 10_000, notional)},
            "equity": curve,
            "window": {"from": start, "to": end, "applies_to": list(STATS_WINDOWED),
                       "all_time": list(STATS_ALL_TIME)}}


HOUR_NS = 3600 * 1_000_000_000


def _hour(ts: int) -> int:
    """`ts` // HOUR_NS as SQL's integer division makes it: truncated toward zero."""
    return ts // HOUR_NS if ts >= 0 else -(-ts // HOUR_NS)


def _equity_curve(start: int | None, end: int | None) -> dict[str, Any]:
    """Sharpe (hourly closes: each hour's newest snapshot by (ts, id)) and max drawdown over the
    snapshots in [start, end): in SQL over the ts index for a range, from `_ALL_TIME` (advanced
    by the rows added since its last answer) for all of them."""
    if start is None and end is None:
        return _ALL_TIME.figures()
    lo, hi = start if start is not None else 0, end if end is not None else 2**63 - 1
    p = database.param
    closes = _closes(database.execute_sql(
        'SELECT "equity", "id" FROM (SELECT "ts", "equity", "id", ROW_NUMBER() OVER (PARTITION BY "ts" / '
        f'{p} ORDER BY "ts" DESC, "id" DESC) AS "n" FROM "equity" WHERE "ts" >= {p} AND "ts" < {p}) AS "h" '
        'WHERE "n" = 1 ORDER BY "ts"', (HOUR_NS, lo, hi)).fetchall())
    real = _real()
    dd = database.execute_sql(
        f'SELECT MAX("peak" - "eq"), MAX(("peak" - "eq") / "peak") FROM (SELECT CAST("equity" AS {real}) AS "eq", '
        f'MAX(CAST("equity" AS {real})) OVER (ORDER BY "ts", "id" ROWS UNBOUNDED PRECEDING) AS "peak" '
        f'FROM "equity" WHERE "ts" >= {p} AND "ts" < {p}) AS "d" WHERE "peak" > 0', (lo, hi)).fetchone()
    return _curve_figures(closes, dd[0] if dd else None, dd[1] if dd else None)


def _closes(rows) -> list[float]:
    """The hourly closes' equity texts ((text, id) pairs) as floats; NotAnAmount for a damaged one."""
    rows = list(rows)
    check_amounts([r[0] for r in rows], "equity", "equity", [r[1] for r in rows])
    return [float(r[0]) for r in rows]


def _curve_figures(closes: list[float], dd: float | None, dd_ratio: float | None) -> dict[str, Any]:
    returns = [b / a - 1 for a, b in zip(closes, closes[1:]) if a > 0]
    sharpe = None
    if len(returns) >= 2:
        mean = sum(returns) / len(returns)
        sd = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
        sharpe = mean / sd * math.sqrt(24 * 365) if sd > 0 else None
    return {"hourly_closes": len(closes), "sharpe": sharpe,
            "max_drawdown": dd if dd is not None else 0.0,
            "max_drawdown_pct": dd_ratio * 100 if dd_ratio is not None else 0.0}


_ROWS = 'SELECT "id", "ts", "equity", CAST("equity" AS {real}) FROM "equity"'


def _server() -> bool:
    """Whether the bound database is a server (PostgreSQL) rather than SQLite: where their SQL differs."""
    return not isinstance(database.obj, pw.SqliteDatabase)


def _real() -> str:
    """The SQL type of an 8-byte float: SQLite's REAL; PostgreSQL's REAL has 4 bytes."""
    return "DOUBLE PRECISION" if _server() else "REAL"


class AllTimeEquity:
    """`_equity_curve` over every snapshot, advanced by the rows added since its last answer:
    the SQL over a month of snapshots (~900k rows) took 1.2 s an answer; this reads the new rows
    only. The same figures as the SQL, to the bit (the same CAST for the drawdown, the same
    float() of the text for the closes; tests/services/control/test_stats_memo.py).

    The broker only appends snapshots, one writer, in id order. What was folded in is checked on
    every answer: the first and the last row folded in (by (ts, id)) and the last written (the
    largest id) must still be there, unchanged, the smallest id still the smallest; and no new
    row may sort before the last one by (ts, id) (a clock stepped back). Otherwise (another
    file, the oldest rows pruned, those rows rewritten) it starts again from every row; a row
    rewritten in the middle (which nothing does) is not looked for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: str | None = None  # the database's file name or URL: another one starts again
        self._reset()

    def _reset(self) -> None:
        self.first: tuple | None = None  # (id, ts, equity text) of the first row folded in by (ts, id)
        self.last: tuple | None = None  # ... and of the last
        self.last_id, self.min_id = 0, None  # the largest and the smallest id folded in
        self.newest: tuple | None = None  # (id, ts, equity text) of the largest id: the last written
        self.closes: list[list] = []  # [hour, equity text, id] per hour: its newest row's
        self.peak = self.dd = self.dd_ratio = None

    def _still_valid(self) -> bool:
        if self.first is None:
            return True
        p = database.param
        kept = {r[0]: tuple(r) for r in database.execute_sql(
            f'SELECT "id", "ts", "equity" FROM "equity" WHERE "id" IN ((SELECT MIN("id") FROM "equity"), {p}, {p}, {p})',
            (self.first[0], self.last[0], self.newest[0])).fetchall()}
        return kept.get(self.first[0]) == self.first and kept.get(self.last[0]) == self.last \
            and kept.get(self.newest[0]) == self.newest and min(kept) == self.min_id

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return self._figures()

    def _figures(self) -> dict[str, Any]:
        p = database.param
        target = getattr(database.obj, "database", None)
        if target != self._target or not self._still_valid():
            self._target = target
            self._reset()
        # a late row: new (its id after every id folded in) yet before the last by ts (by (ts, id)
        # it cannot be: its id is larger). `+"ts"`: over the new ids, not the ts index's old rows
        if self.last is not None and database.execute_sql(
                f'SELECT 1 FROM "equity" WHERE "id" > {p} AND +"ts" < {p} LIMIT 1',
                (self.last_id, self.last[1])).fetchone():
            self._reset()
        lts, lid = (self.last[1], self.last[0]) if self.last is not None else (-2**63, -1)
        batches = _batches(  # in (ts, id) order over the ts index, from after the last
            f'{_ROWS.format(real=_real())} WHERE "ts" >= {p} AND NOT ("ts" = {p} AND "id" <= {p}) ORDER BY "ts", "id"',
            (lts, lts, lid))
        closes, peak, dd, ratio = self.closes, self.peak, self.dd, self.dd_ratio
        row = None
        for batch in batches:  # streamed: a month of rows is ~200 MB as tuples
            for row in batch:
                rid, ts, text, eq = row
                hour = _hour(ts)
                if closes and closes[-1][0] == hour:
                    closes[-1][1:] = text, rid  # in (ts, id) order: the hour's newest so far
                else:
                    closes.append([hour, text, rid])
                if rid > self.last_id:
                    self.last_id, self.newest = rid, (rid, ts, text)
                if self.min_id is None or rid < self.min_id:
                    self.min_id = rid
                if self.first is None:
                    self.first = (rid, ts, text)
                if eq is None:
                    continue
                peak = eq if peak is None or eq > peak else peak
                if peak > 0:
                    drop = peak - eq
                    dd = drop if dd is None or drop > dd else dd
                    r = drop / peak
                    ratio = r if ratio is None or r > ratio else ratio
        if row is not None:
            self.last = (row[0], row[1], row[2])
        self.peak, self.dd, self.dd_ratio = peak, dd, ratio
        return _curve_figures(_closes((c[1], c[2]) for c in closes), dd, ratio)


_ALL_TIME = AllTimeEquity()
STREAM_BATCH = 10_000


def _batches(sql: str, params: tuple, size: int = STREAM_BATCH) -> Iterable[list[tuple]]:
    """`sql`'s rows in lists of at most `size`, streamed. SQLite steps through its result as it is
    read; psycopg2's ordinary cursor would first hold the whole result in memory (every equity
    row of a year, for the first all-time /stats), so on PostgreSQL the rows come through a
    server-side cursor, WITH HOLD: peewee's connections autocommit, and psycopg2 opens a plain
    named cursor only inside a transaction of its own."""
    db = database.obj
    if not isinstance(db, pw.PostgresqlDatabase):
        cursor = database.execute_sql(sql, params)
        while batch := cursor.fetchmany(size):
            yield batch
        return
    cursor = db.connection().cursor(name="qf_stream", withhold=True)
    try:
        cursor.itersize = size
        cursor.execute(sql, params)
        while batch := cursor.fetchmany(size):
            yield batch
    finally:
        cursor.close()


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
