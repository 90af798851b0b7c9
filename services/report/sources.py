"""Where a report's data comes from: a database file, the deployed API, or the API's CSV export.

Each loader returns a `Loaded`: the fills as batches, oldest first (every fill before the range
end: the positions at the range start need the ones before it), the range's equity snapshots,
risk's state changes. The database is read in one read transaction (a snapshot the broker's
writes cannot tear), read-only (`mode=ro`: never created, never written), a column at a time
with `group_concat` per batch of rows: a million fills fetched as Python row tuples and turned
into columns took 3 s; as one text per column, 0.8 s.

Every failure a person can act on is a `SourceError` with one line naming the file or URL."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from email.message import Message
from typing import Iterable, Iterator
from urllib.parse import quote

import numpy as np

from services.report.core import NO_END, EquitySeries, StateChange
from services.report.trips import SEP, BadFill, FillBatch, make_batch
from shared.storage import busy

BATCH_ROWS = 200_000  # fills per batch read from a database: bounds the memory of one batch's columns
API_PAGE = 1000  # the API's largest page
API_TIMEOUT_S = 30.0  # per request: a page of 1000 fills answers in milliseconds
API_RISK_EVENTS = 500  # the most /api/v1/risk lists: the state changes among them
_MONEY = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_DIGITS = re.compile(r"[0-9]{1,19}")
CSV_REQUIRED = ("fill_id", "symbol", "side", "price", "qty", "fee", "fee_asset", "liquidity", "ts")


class SourceError(Exception):
    """Input the report cannot use, in one line naming the file or URL: a missing file, not a
    database, a malformed CSV, an API that refuses or cannot be reached. `status`: 2 for bad
    input, 1 for a source unavailable now (worth a retry). Handled by the CLI: stderr, exit status."""

    def __init__(self, text: str, status: int = 2) -> None:
        super().__init__(text)
        self.status = status


@dataclass(slots=True)
class Loaded:
    """What a loader read. `fills` may be a generator (a database is read batch by batch while
    the report folds them); `states_from`: risk's changes are known only from then (None: all);
    `has_states`: the source records risk's states at all (a CSV export does not)."""
    source: str  # for the report's byline: "database qf.db", "CSV export trades.csv", "API"
    fills: Iterable[FillBatch]
    equity: EquitySeries | None = None
    changes: list[StateChange] = field(default_factory=list)
    states_from: int | None = None
    has_states: bool = True


# -- a database file ------------------------------------------------------------------------

def load_db(path: str, start: int | None, end: int | None) -> Loaded:
    """The fills before `end`, the snapshots in [start, end) and risk's state changes of the
    SQLite file `path`, read-only. The fills come batch by batch while the caller folds them:
    close the generator (or exhaust it) to end the read transaction. Raises SourceError."""
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SourceError(f"{path} is a directory, not a database file")
    try:
        con = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, isolation_level=None,
                              check_same_thread=False)
    except sqlite3.Error as exc:
        raise SourceError(f"{path}: cannot open it read-only ({exc})") from None
    try:
        con.execute("PRAGMA busy_timeout = 5000")
        con.execute("BEGIN")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        con.close()
        if busy(exc):  # a writer holds it (an exclusive lock, a long write): worth a retry
            raise SourceError(f"{path}: the database is locked by another connection; try again ({exc})",
                              status=1) from None
        raise SourceError(f"{path} is not a SQLite database ({exc})") from None
    if "fills" not in tables:
        con.close()
        raise SourceError(f"{path} is not a QuantumFlow database: it has no fills table")
    hi = NO_END if end is None else end
    try:
        equity = _db_equity(con, path, start, hi) if "equity" in tables else None
        changes = [StateChange(ts, state) for ts, state in con.execute(
            "SELECT ts, state FROM risk_events WHERE kind = 'STATE' AND ts < ? ORDER BY ts, id", (hi,))] \
            if "risk_events" in tables else []
        last = con.execute("SELECT max(rowid) FROM fills").fetchone()[0] or 0
    except sqlite3.Error as exc:
        con.close()
        raise SourceError(f"{path}: cannot be read ({exc})", status=1 if busy(exc) else 2) from None
    return Loaded(f"database {os.path.basename(path)}", _db_fills(con, path, hi, last), equity, changes,
                  has_states="risk_events" in tables)


# A rowid range is a SEARCH of the table's b-tree, which visits the rows in rowid order: the
# order group_concat joins them in. (A subquery with ORDER BY rowid gives the same order at
# 1.6× the cost: SQLite runs it as a co-routine.) Money comes as one text per column, parsed
# whole (services/report/amounts.py).
_FILLS_SQL = ("SELECT count(*), group_concat(ts), group_concat(symbol, ?), group_concat(side, ?), "
              "group_concat(price), group_concat(qty), group_concat(fee), group_concat(fee_asset, ?), "
              "group_concat(liquidity, ?), group_concat(coalesce(slippage_arrival, '0')), "
              "group_concat(slippage_arrival IS NOT NULL) FROM fills WHERE rowid > ? AND rowid <= ? AND ts < ?")


def _db_fills(con: sqlite3.Connection, path: str, end: int, last: int) -> Iterator[FillBatch]:
    """The fills in rowid order (the broker's commit order, in which shared/aggregates.py folds
    them too), BATCH_ROWS of rowid at a time; closes `con` at the end. Raises SourceError."""
    try:
        lo = 0
        while lo < last:
            hi = lo + BATCH_ROWS
            try:
                row = con.execute(_FILLS_SQL, (SEP,) * 4 + (lo, hi, end)).fetchone()
            except sqlite3.Error as exc:
                raise SourceError(f"{path}: cannot be read ({exc})") from None
            n = row[0]
            if n:
                try:
                    ts = np.array(row[1].split(","), dtype=np.int64)
                except ValueError:
                    raise SourceError(f"{path}: a fill's ts is not an integer (rowid {lo}..{hi})") from None
                measured = np.fromstring(row[10], dtype=np.int8, sep=",").astype(bool)
                try:
                    yield make_batch(ts, row[2].split(SEP), row[3].split(SEP), row[4], row[5], row[6],
                                     row[7].split(SEP), row[8].split(SEP), row[9], measured)
                except BadFill as exc:
                    rowid = con.execute("SELECT rowid FROM fills WHERE rowid > ? AND rowid <= ? AND ts < ? "
                                        "ORDER BY rowid LIMIT 1 OFFSET ?", (lo, hi, end, exc.index)).fetchone()
                    raise SourceError(f"{path}: the fill at rowid {rowid[0] if rowid else '?'}: {exc}") from None
            lo = hi
    finally:
        con.close()


def _db_equity(con: sqlite3.Connection, path: str, start: int | None, end: int) -> EquitySeries:
    """The snapshots in [start, end) by (ts, id), and the last one before `start`. Raises SourceError."""
    lo = -2**63 if start is None else start
    n, ts, text = con.execute(
        "SELECT count(*), group_concat(ts), group_concat(equity) FROM "
        "(SELECT ts, equity FROM equity WHERE ts >= ? AND ts < ? ORDER BY ts, id)", (lo, end)).fetchone()
    before = None
    if start is not None:
        row = con.execute("SELECT equity FROM equity WHERE ts < ? ORDER BY ts DESC, id DESC LIMIT 1",
                          (start,)).fetchone()
        before = None if row is None else str(row[0])
    if not n:
        return EquitySeries(np.zeros(0, dtype=np.int64), [], before)
    try:
        series = EquitySeries(np.array(ts.split(","), dtype=np.int64), text.split(","), before,
                              _floats(text, n))
        if before is not None:
            float(before)
    except ValueError:
        raise SourceError(f"{path}: the equity table holds a value that is not a number") from None
    if len(series.text) != n:
        raise SourceError(f"{path}: the equity table holds a value with a comma")
    return series


def _floats(text: str, count: int) -> np.ndarray:
    """`count` comma-joined numbers as float64. Raises ValueError for anything else."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns, and stops, at text it cannot parse
        try:
            values = np.fromstring(text, dtype=np.float64, sep=",")
        except DeprecationWarning:
            raise ValueError("not a number") from None
    if len(values) != count or not np.isfinite(values).all():
        raise ValueError("not a number")
    return values


# -- the API's CSV export -----------------------------------------------------------------

def load_csv(path: str, start: int | None, end: int | None, chunk: int = BATCH_ROWS) -> Loaded:
    """The fills of a `GET /api/v1/trades?format=csv` export (one page or several pages one after
    another, each with its header; newest first as the API gives them, or oldest first).
    Raises SourceError naming the line at fault."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory, not a CSV file") from None
    except UnicodeDecodeError:
        raise SourceError(f"{path} is not a CSV export of the API (not UTF-8 text)") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror})") from None
    rows = parse_csv(text, path)
    return Loaded(f"CSV export {os.path.basename(path)}", batches(order_rows(rows, path), chunk, end, path),
                  has_states=False)


def parse_csv(text: str, where: str) -> list[tuple]:
    """The rows of CSV text in the API's trade columns as tuples (line, fill_id, ts, symbol, side,
    price, qty, fee, fee_asset, liquidity, slippage_arrival), checked. A repeated header line (a
    next page appended) is skipped. Raises SourceError naming `where` and the line."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SourceError(f"{where} line 1: not CSV ({exc})") from None
    if header is None:
        raise SourceError(f"{where} is empty: a CSV export starts with its header line")
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise SourceError(f"{where} line 1: not the API's trades CSV (no column {', '.join(missing)})")
    col = {name: header.index(name) for name in header}
    at = [col[c] for c in ("fill_id", "ts", "symbol", "side", "price", "qty", "fee", "fee_asset", "liquidity")]
    slip = col.get("slippage_arrival")
    width = len(header)
    out = []
    try:
        for row in reader:
            line = reader.line_num
            if row == header or not row:
                continue
            if len(row) != width:
                raise SourceError(f"{where} line {line}: {len(row)} fields, the header has {width}")
            fill_id, ts, symbol, side, price, qty, fee, fee_asset, liquidity = (row[i] for i in at)
            s = row[slip] if slip is not None else ""
            if not fill_id:
                raise SourceError(f"{where} line {line}: no fill_id")
            if not _DIGITS.fullmatch(ts):
                raise SourceError(f"{where} line {line}: ts {ts[:30]!r} is not ns since the epoch")
            if side not in ("BUY", "SELL"):
                raise SourceError(f"{where} line {line}: side {side[:20]!r} is neither BUY nor SELL")
            if liquidity not in ("MAKER", "TAKER"):
                raise SourceError(f"{where} line {line}: liquidity {liquidity[:20]!r} is neither MAKER nor TAKER")
            for name, value in (("price", price), ("qty", qty), ("fee", fee), ("slippage_arrival", s or "0")):
                if not _MONEY.fullmatch(value):
                    raise SourceError(f"{where} line {line}: {name} {value[:30]!r} is not a decimal")
            if not symbol:
                raise SourceError(f"{where} line {line}: no symbol")
            out.append((line, fill_id, int(ts), symbol, side, price, qty, fee, fee_asset, liquidity, s))
    except csv.Error as exc:
        raise SourceError(f"{where} line {reader.line_num}: not CSV ({exc})") from None
    return out


def order_rows(rows: list[tuple], where: str) -> list[tuple]:
    """`rows` oldest first: the API's newest-first order reversed (so fills of one time come in
    fill_id order, as the API's pages order them), an oldest-first file kept, anything else
    sorted by time. Raises SourceError for a fill_id given twice."""
    seen: dict[str, int] = {}
    for r in rows:
        first = seen.setdefault(r[1], r[0])
        if first != r[0]:
            raise SourceError(f"{where} line {r[0]}: fill {r[1][:60]!r} again (first on line {first})")
    ts = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
    if len(ts) < 2 or (np.diff(ts) <= 0).all():
        return rows[::-1]
    if (np.diff(ts) >= 0).all():
        return rows
    return [rows[i] for i in np.argsort(ts, kind="stable").tolist()]


def batches(rows: list[tuple], size: int, end: int | None, where: str) -> Iterator[FillBatch]:
    """Checked rows (oldest first) as FillBatches of `size`, those at or after `end` left out.
    Raises SourceError naming the line of a fill the ledger cannot book."""
    if end is not None:
        rows = [r for r in rows if r[2] < end]
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        line, _, ts, symbol, side, price, qty, fee, fee_asset, liquidity, slip = zip(*part)
        try:
            yield make_batch(ts, symbol, side, ",".join(price), ",".join(qty), ",".join(fee), fee_asset, liquidity,
                             ",".join(s or "0" for s in slip), [bool(s) for s in slip])
        except BadFill as exc:
            raise SourceError(f"{where} line {line[exc.index]}: {exc}") from None


# -- the API ----------------------------------------------------------------------------------

def load_api(base: str, token: str | None, start: int | None, end: int | None) -> Loaded:
    """Every fill before `end` from `GET /api/v1/trades?format=csv` (page after page by its
    X-Next-Cursor), the equity curve of the range from `/api/v1/equity` (its finest buckets:
    1 min, coarser on a long range) and the state changes among risk's newest events
    (`/api/v1/risk`, at most API_RISK_EVENTS). Raises SourceError (status 1: unreachable, 5xx)."""
    base = base.rstrip("/")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", base):
        raise SourceError(f"--api {base[:80]!r}: expected an http:// or https:// URL")
    headers = {"Accept": "text/csv"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    rows: list[tuple] = []
    cursor = None
    page = 0
    seen: set[str] = set()
    while True:
        params = {"format": "csv", "limit": str(API_PAGE)}
        if end is not None:
            params["to"] = str(end)
        if cursor:
            params["cursor"] = cursor
        body, answer_headers = _get(base, "/api/v1/trades", params, headers)
        page += 1
        rows += parse_csv(body.decode("utf-8", "replace"), f"{base}/api/v1/trades page {page}")
        cursor = answer_headers.get("X-Next-Cursor")
        if not cursor:
            break
        if cursor in seen:  # a next page it gave before: following it would never end
            raise SourceError(f"{base}/api/v1/trades: page {page} points back to an earlier page")
        seen.add(cursor)
    rows = order_rows(rows, f"{base}/api/v1/trades")
    json_headers = {**headers, "Accept": "application/json"}
    equity = None
    lo = start if start is not None else (rows[0][2] if rows else None)
    hi = end
    if hi is None and rows:  # up to the newest snapshot, which may come after the last fill
        latest = _json(base, "/api/v1/pnl", {}, json_headers).get("equity")
        try:
            hi = max(rows[-1][2], int(latest["ts"]) if latest else 0) + 1
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{base}/api/v1/pnl: not the API's P&L answer") from None
    if lo is not None and hi is not None and hi > lo:
        points = _json(base, "/api/v1/equity", {"from": str(lo), "to": str(hi), "interval": "1m"},
                       json_headers).get("points", [])
        try:
            equity = EquitySeries(np.array([int(p["ts"]) for p in points], dtype=np.int64),
                                  [_money(p["equity"]) for p in points])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{base}/api/v1/equity: not the API's equity answer") from None
    events = _json(base, "/api/v1/risk", {"limit": str(API_RISK_EVENTS)}, json_headers).get("events", [])
    try:
        changes = sorted((StateChange(int(e["ts"]), str(e["state"])) for e in events if e.get("kind") == "STATE"),
                         key=lambda c: c.ts)
        states_from = min(int(e["ts"]) for e in events) if len(events) >= API_RISK_EVENTS else None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SourceError(f"{base}/api/v1/risk: not the API's risk answer") from None
    # the byline says "the API", not its URL: a deployment may keep its address out of a public README
    return Loaded("API", batches(rows, BATCH_ROWS, end, f"{base}/api/v1/trades"), equity, changes, states_from)


def _money(value) -> str:
    if not isinstance(value, str) or not _MONEY.fullmatch(value):
        raise ValueError("not a decimal string")
    return value


def _get(base: str, path: str, params: dict, headers: dict) -> tuple[bytes, Message]:
    """GET base+path?params: (body, headers). Raises SourceError: 401/403 (the token), another
    4xx (status 2), 5xx and an unreachable host (status 1), each in one line."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    shown = f"{base}{path}"
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=API_TIMEOUT_S) as resp:
            return resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        detail = _error_text(exc)
        if exc.code in (401, 403):
            hint = "give --token (or QF_API_TOKEN)" if "Authorization" not in headers else "check --token"
            raise SourceError(f"{shown}: {exc.code} {detail} ({hint})") from None
        raise SourceError(f"{shown}: the API answered {exc.code} {detail}", 1 if exc.code >= 500 else 2) from None
    except urllib.error.URLError as exc:
        raise SourceError(f"{shown}: cannot reach the API ({getattr(exc, 'reason', exc)})", 1) from None
    except (OSError, ValueError) as exc:  # a timeout, a reset, a bad URL
        raise SourceError(f"{shown}: cannot reach the API ({exc})", 1) from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The API's JSON error (`code: message`), or the reason phrase."""
    try:
        err = json.loads(exc.read(4096) or b"{}").get("error", {})
        return f"{err['code']}: {str(err['message'])[:200]}"
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return str(exc.reason)[:200]


def _json(base: str, path: str, params: dict, headers: dict) -> dict:
    body, _ = _get(base, path, params, headers)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise SourceError(f"{base}{path}: the answer is not a JSON object (is {base} the QuantumFlow API?)")
    return answer
