"""REST API under load: p99 and requests/s of the real `qf api` (gunicorn) over a database of 1M fills, by wrk.

Each endpoint gets its own wrk run (200 connections, 2 threads, QF_BENCH_API_S seconds) beside the
same run's floor, `GET /health/live`, which answers without touching the database: the goals
(p99 ≤ 100 ms, 0 errors) are read against what the API costs when it does no work at all.
The database is generated once (`make_db`) and cached under build/bench-api/; each run loads a
copy of it into which a writer commits a fill QF_BENCH_API_WRITES_PER_S times a second (20:
a busy strategy), as the broker would, so that pages kept by the API (services/api/pagecache.py)
are dropped as they would be live. `trades_distinct` asks for the newest page under a different
query string every time: what pages cost when none is ever served twice (not in api_p99_ms).""" 
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from bench.common import clean_environ, free_port
from bench.md_rss import rss_mib
from shared import config as qfconfig
from shared.db import EQUITY_COLS, FILL_COLS, ORDER_COLS, SIGNAL_COLS, close_db, init_db
from shared.money import quote_asset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, "build", "bench-api")
VERSION = 3  # part of the cache key: bump it when make_db writes other rows or shared/db.py's tables change
SECONDS = int(os.environ.get("QF_BENCH_API_S", "30"))
FILLS = int(os.environ.get("QF_BENCH_API_FILLS", "1000000"))
CONNECTIONS, THREADS = 200, 2
DEEP_PAGES = 50  # the deep page: this many pages of 100 from the newest fill
START_WAIT_S = 30
ENDPOINTS = (("floor", "/health/live"), ("status", "/api/v1/status"), ("positions", "/api/v1/positions"),
             ("pnl", "/api/v1/pnl"), ("trades", "/api/v1/trades?limit=100"), ("trades_deep", None))
WORK = ("status", "positions", "pnl", "trades", "trades_deep")  # what api_p99_ms / api_rps cover
DISTINCT = ("trades_distinct", "/api/v1/trades?limit=100")  # + a `to` no other request has
WRITES_PER_S = float(os.environ.get("QF_BENCH_API_WRITES_PER_S", "20"))

# -- the database -----------------------------------------------------------------------------

START_NS = 1_719_792_000 * 10**9  # 2024-07-01T00:00:00Z: fixed, so a seed always makes the same file
EQUITY_EVERY_NS = 10 * 10**9  # the broker's periodic snapshot (QF_BROKER_EQUITY_S)
START_CASH = 1_000_000
MAKER_RATE, TAKER_RATE = 2, 10  # fee rates in 1e-4: 0.0002 and 0.001
# Exact amounts are integers at a fixed scale: prices in 1e-2 (the tick), quantities in 1e-8,
# mids and slippage in 1e-3 (half a tick), fees and cash in 1e-14 (price × qty × rate).
P, Q, M, F = 2, 8, 3, 14
# symbol -> (start price, lot in 1e-8 units, lots per order from..to, volatility per √s)
SPECS = {"BTCUSDT": (60_000.0, 1_000, (10, 2_000), 1.1e-4),
         "ETHUSDT": (3_000.0, 10_000, (10, 500), 1.4e-4),
         "SOLUSDT": (150.0, 100_000, (10, 1_000), 1.9e-4)}
OTHER_SPEC = (100.0, 100_000, (10, 1_000), 1.5e-4)
DENY_CODES = (("RATE_LIMIT", 30), ("MAX_POSITION", 25), ("STALE_BOOK", 15), ("PRICE_BAND", 10),
              ("MAX_OPEN_ORDERS", 8), ("MIN_NOTIONAL", 5), ("LOSS_COOLDOWN", 4), ("SHABBAT", 3))
BATCH = 50_000


def _txt(units: int, scale: int, _pow=[10**i for i in range(16)]) -> str:
    """`units` × 10^-scale as the canonical decimal text the money columns hold ("100.5", "-0.0001", "0")."""
    whole, frac = divmod(-units if units < 0 else units, _pow[scale])
    sign = "-" if units < 0 else ""
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{str(frac).rjust(scale, '0').rstrip('0')}"


def _hex_id(rng: random.Random) -> str:
    """A uuid4-shaped hex id (as the broker's order ids)."""
    return f"{rng.getrandbits(128) & ~(0xF << 76) | (0x4 << 76):032x}"


class _Writer:
    """Rows of each table, flushed by executemany in batches inside the caller's one transaction."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self.sql = {t: f'INSERT INTO "{t}" ("' + '", "'.join(cols) + '") VALUES (' + ", ".join("?" * len(cols)) + ")"
                    for t, cols in (("fills", FILL_COLS), ("orders", ORDER_COLS), ("equity", EQUITY_COLS),
                                    ("signals", SIGNAL_COLS),
                                    ("risk_events", ("ts", "kind", "code", "text", "client_order_id", "symbol",
                                                     "state")))}
        self.rows: dict[str, list] = {t: [] for t in self.sql}
        self.counts = dict.fromkeys(self.sql, 0)

    def add(self, table: str, row: tuple) -> None:
        rows = self.rows[table]
        rows.append(row)
        if len(rows) >= BATCH:
            self.flush(table)

    def flush(self, table: str | None = None) -> None:
        for t in [table] if table else list(self.rows):
            self.con.executemany(self.sql[t], self.rows[t])
            self.counts[t] += len(self.rows[t])
            self.rows[t] = []


def _trading(w: _Writer, rng: random.Random, fills: int, symbols: tuple[str, ...], days: float, prefix: str) -> int:
    """Orders, their fills and the equity curve, in time order, as the broker would have stored
    them (ids, statuses, reasons, mids, slippage, exact fees). Returns the orders written."""
    period = int(days * 86_400 * 10**9)
    specs = [SPECS.get(s, OTHER_SPEC) for s in symbols]
    weights = [0.5 ** i for i in range(len(symbols))]
    cum = [sum(weights[:i + 1]) / sum(weights) for i in range(len(weights))]
    px = [s[0] for s in specs]
    last_t = [START_NS] * len(symbols)
    pos = [0] * len(symbols)  # 1e-8 units
    mark = [round(p * 100) * 10 for p in px]  # mids in 1e-3
    limit = [50 * s[1] * sum(s[2]) // 2 for s in specs]  # mean reversion scale: ~50 orders
    quotes = [quote_asset(s) for s in symbols]
    cash = START_CASH * 10**F
    next_snap = START_NS + EQUITY_EVERY_NS
    done = orders = t = 0
    step = max(1, period // fills)

    def equity() -> int:
        return cash + sum(q * m for q, m in zip(pos, mark)) * 10**(F - Q - M)

    while done < fills:
        # after the previous order's last fill: the fills' rowid order (what the broker's commits
        # give, and what shared.aggregates folds them in) is their time order
        t = max(t + 1, START_NS + done * period // fills + rng.randrange(step))
        while next_snap <= t:  # the broker's periodic snapshot, between orders
            w.add("equity", (next_snap, _txt(equity(), F), _txt(cash, F), "periodic"))
            next_snap += EQUITY_EVERY_NS
        r = rng.random()
        k = next(i for i, c in enumerate(cum) if r <= c)
        symbol, (_, lot, (lo, hi), vol) = symbols[k], specs[k]
        px[k] *= math.exp(vol * math.sqrt(max(t - last_t[k], 1) / 1e9) * rng.gauss(0, 1))
        last_t[k] = t
        bid = max(1, round(px[k] * 100))
        ask = bid + (1 if rng.random() < 0.8 else rng.randint(2, 5))
        mid = (bid + ask) * 5  # 1e-3
        mark[k] = mid
        buy = rng.random() < 0.5 - 0.4 * max(-1.0, min(1.0, pos[k] / limit[k]))
        sign = 1 if buy else -1
        maker = rng.random() < 0.7
        qty = rng.randint(lo, hi) * lot
        created = t - rng.randint(300_000, 3_000_000)
        arrival = created + rng.randint(50_000, t - created)  # reached the exchange before it filled
        decision_mid = mid + 5 * rng.choice((-2, -1, 0, 0, 0, 1, 2))
        order_id = _hex_id(rng)
        orders += 1
        coid = f"{prefix}-{orders}"
        r = rng.random()
        n = 1 if r < 0.6 else 2 if r < 0.9 else 3
        n = min(n, fills - done)
        partial = maker and rng.random() < 0.07
        cuts = [0, *(p * lot for p in sorted(rng.sample(range(1, qty // lot), n - 1))), qty]  # ≥ 10 lots
        if partial:  # filled some, then cancelled: the rest never fills
            qty += rng.randint(1, hi) * lot
        price0 = (bid if buy else ask) if maker else (ask if buy else bid)
        notional = filled = 0
        ts = last = t
        for i in range(n):
            fq = cuts[i + 1] - cuts[i]
            price = price0 if maker or i == 0 else price0 + sign * rng.randint(0, i)
            rate = MAKER_RATE if maker else TAKER_RATE
            fee = price * fq * rate
            flow = price * fq * 10**(F - P - Q)
            cash += -flow - fee if buy else flow - fee
            pos[k] += sign * fq
            filled += fq
            notional += price * fq
            w.add("fills", (f"{order_id}-{i + 1}", order_id, coid, symbol, "BUY" if buy else "SELL", _txt(price, P),
                            _txt(fq, Q), _txt(fee, F), quotes[k], "MAKER" if maker else "TAKER",
                            (ts - rng.randint(1_000_000, 20_000_000)) // 1_000_000, ts, _txt(mid, M),
                            _txt(decision_mid, M), _txt(mid, M), _txt(sign * (price * 10 - decision_mid), M),
                            _txt(sign * (price * 10 - mid), M), ts - arrival if maker else 0))
            done += 1
            last = ts
            ts += rng.randint(1_000_000, 2_000_000_000) if maker else rng.randint(1_000, 50_000)
        updated = last + rng.randint(10**8, 10**9) if partial else last
        t = max(t, last)
        # the average fill price, rounded half-even to 1e-8 as Order.avg_price does
        avg, rem = divmod(notional * 10**(Q - P), filled)
        if rem * 2 > filled or (rem * 2 == filled and avg % 2):
            avg += 1
        status, reason = ("CANCELLED", "CANCELLED_BY_CLIENT") if partial else ("FILLED", "")
        w.add("orders", (order_id, coid, "ofi", symbol, "BUY" if buy else "SELL", "LIMIT" if maker else "MARKET",
                         "GTX" if maker else "GTC", _txt(qty, Q), _txt(price0, P) if maker else None, status,
                         _txt(filled, Q), _txt(avg, Q), reason, created, updated, arrival, _txt(decision_mid, M),
                         _txt(mid, M)))
        w.add("equity", (updated, _txt(equity(), F), _txt(cash, F), order_id))
        r = rng.random()
        if r < 0.15:  # a post-only order that never filled: cancelled by the strategy, or refused on arrival
            order_id = _hex_id(rng)
            orders += 1
            status, reason, updated = (("CANCELLED", "CANCELLED_BY_CLIENT", t + rng.randint(10**7, 5 * 10**9))
                                       if r < 0.12 else ("REJECTED", "WOULD_TAKE", t + 500_000))
            w.add("orders", (order_id, f"{prefix}-{orders}", "ofi", symbol, "BUY" if buy else "SELL", "LIMIT", "GTX",
                             _txt(qty, Q), _txt(price0 if maker else bid if buy else ask, P), status, "0", None,
                             reason, t + 1, updated, t + 500_000, _txt(mid, M), _txt(mid, M)))
    while next_snap <= t:
        w.add("equity", (next_snap, _txt(equity(), F), _txt(cash, F), "periodic"))
        next_snap += EQUITY_EVERY_NS
    return orders


def _risk_and_signals(w: _Writer, rng: random.Random, fills: int, symbols: tuple[str, ...], days: float,
                      prefix: str, orders: int) -> None:
    """A few thousand denials and trading-state changes, and some thousand signals, over the period."""
    period = int(days * 86_400 * 10**9)
    codes, cweights = zip(*DENY_CODES)
    events = []
    for i in range(max(20, fills // 300)):
        code = rng.choices(codes, cweights)[0]
        events.append((START_NS + rng.randrange(period), "DENIED", code, f"{code.lower().replace('_', ' ')}",
                       f"{prefix}-d{i}", rng.choice(symbols), "ACTIVE"))
    week = 7 * 86_400 * 10**9
    for start in range(START_NS + 4 * 86_400 * 10**9, START_NS + period, week):  # Fridays to Saturday nights
        events.append((start, "STATE", "SHABBAT", "Shabbat [by calendar]", "", "", "PAUSED_SHABBAT"))
        events.append((start + 25 * 3600 * 10**9, "STATE", "SHABBAT_END", "Shabbat over [by calendar]", "", "",
                       "ACTIVE"))
    for _ in range(max(2, round(days / 5))):
        at = START_NS + rng.randrange(period)
        events.append((at, "STATE", "MANUAL", "checking the feed [by api:ops]", "", "", "HALTED"))
        events.append((at + rng.randint(60, 3600) * 10**9, "STATE", "MANUAL", "resumed [by api:ops]", "", "", "ACTIVE"))
    for row in sorted(events):
        w.add("risk_events", row)
    sigs = []
    for _ in range(max(100, fills // 200)):
        side = rng.choice(("BUY", "SELL", "FLAT"))
        sent = side != "FLAT" and rng.random() < 0.6
        feats = {"ofi_1s": round(rng.gauss(0, 1), 4), "ofi_10s": round(rng.gauss(0, 1), 4),
                 "spread_bps": round(rng.uniform(0.01, 2), 4), "vol_1m": round(rng.uniform(1e-5, 5e-4), 8)}
        ts = START_NS + rng.randrange(period)
        sigs.append((ts, rng.choice(symbols), side, round(rng.random(), 4), round(rng.gauss(0, 1), 4),
                     json.dumps(feats, separators=(",", ":")), rng.randrange(10**9, 10**11), ts - 200_000,
                     f"{prefix}-{rng.randint(1, orders)}" if sent else "", "entry" if sent else ""))
    for row in sorted(sigs):
        w.add("signals", row)


def make_db(path: str, fills: int = 1_000_000, symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT"),
            seed: int = 1, days: float = 30) -> dict[str, int]:
    """Write a trading history of `fills` fills over `days` days into a new SQLite file `path`
    (tables from shared.db.init_db, WAL), then rebuild the broker's aggregates (positions,
    pnl_days) when shared.aggregates offers `rebuild`. Returns the rows written per table.
    Raises FileExistsError if `path` exists (never appends to another history)."""
    if os.path.exists(path):
        raise FileExistsError(path)
    rng = random.Random(seed)
    start = time.monotonic()
    init_db(path)
    close_db()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        # no journal while filling a new file (nothing to roll back to); WAL again at the end
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-1000000", "temp_store=MEMORY"):
            con.execute(f"PRAGMA {pragma}").fetchall()
        w = _Writer(con)
        prefix = f"ofi-{START_NS:x}"
        con.execute("BEGIN")
        orders = _trading(w, rng, fills, tuple(symbols), days, prefix)
        _risk_and_signals(w, rng, fills, tuple(symbols), days, prefix, orders)
        w.flush()
        con.execute("COMMIT")
        con.execute("PRAGMA journal_mode=WAL").fetchall()  # no ANALYZE: the broker's files have no statistics
    finally:
        con.close()
    counts = dict(w.counts)
    print(f"generated {os.path.basename(path)} in {time.monotonic() - start:.1f} s: "
          + ", ".join(f"{t} {n}" for t, n in counts.items()), flush=True)
    counts.update(rebuild_aggregates(path))
    return counts


def rebuild_aggregates(path: str) -> dict[str, int]:
    """Recompute `positions` and `pnl_days` from the fills with shared.aggregates.rebuild, if it
    exists yet (a note otherwise). Returns the rows they hold after."""
    try:
        from shared.aggregates import rebuild
    except ImportError as exc:
        print(f"shared.aggregates.rebuild is not importable ({exc}): positions/pnl_days left empty", flush=True)
        return {}
    db = init_db(path)
    try:
        start = time.monotonic()
        rebuild()
        print(f"aggregates rebuilt in {time.monotonic() - start:.1f} s", flush=True)
        return {t: db.execute_sql(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in ("positions", "pnl_days")}
    finally:
        close_db()


def cached_db(fills: int, symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT"), seed: int = 1,
              days: float = 30) -> str:
    """The path of the generated database for these parameters under build/bench-api/, made
    first if missing (into a temporary name, renamed when complete)."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, f"v{VERSION}-f{fills}-d{days:g}-s{seed}-{'_'.join(symbols)}.db")
    if os.path.exists(path):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            empty = con.execute('SELECT COUNT(*) FROM "positions"').fetchone()[0] == 0
        finally:
            con.close()
        if empty:  # generated before shared.aggregates existed
            rebuild_aggregates(path)
        print(f"using {os.path.relpath(path, ROOT)}", flush=True)
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(tmp + suffix):
            os.remove(tmp + suffix)
    make_db(tmp, fills, symbols, seed, days)
    os.replace(tmp, path)
    print(f"cached as {os.path.relpath(path, ROOT)}", flush=True)
    return path


# -- the load ---------------------------------------------------------------------------------

# wrk's summary as one JSON line (latency in µs from wrk; ms here). errors.status counts answers ≥ 400.
WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  local s = summary.duration / 1e6
  io.write(string.format('{"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_ms":%.3f,"p90_ms":%.3f,' ..
    '"p99_ms":%.3f,"max_ms":%.3f,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, s, summary.requests / s, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# Each request of `trades_distinct` adds `to=9<thread><counter>` (ns, after every fill: clamped to
# 2262): the same newest page, under a query string no other request used.
WRK_DISTINCT_LUA = """
local threads = 0
setup = function(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "&to=9" .. tid .. string.format("%017d", counter))
end
""" + WRK_LUA


class LiveWriter(threading.Thread):
    """Commits one new fill (newer than every other) `per_s` times a second into the SQLite file
    at `path`, in WAL mode, like the broker; counts its commits."""

    def __init__(self, path: str, per_s: float) -> None:
        super().__init__(name="bench-live-writer", daemon=True)
        self.path, self.period = path, 1 / per_s
        self.stopping = threading.Event()
        self.commits = 0
        self.error: str | None = None

    def run(self) -> None:
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            last = con.execute('SELECT * FROM "fills" ORDER BY "ts" DESC, "fill_id" DESC LIMIT 1').fetchone()
            row = dict(zip(FILL_COLS, last))
            sql = f'INSERT INTO "fills" ({", ".join(FILL_COLS)}) VALUES ({", ".join("?" * len(FILL_COLS))})'
            ts, deadline = row["ts"], time.monotonic()
            while not self.stopping.wait(max(0.0, deadline - time.monotonic())):  # the pace, not a sync
                deadline += self.period
                ts += 1_000_000
                row.update(fill_id=f"bench-live-{self.commits}", ts=ts, exch_ts=ts // 1_000_000)
                con.execute(sql, [row[c] for c in FILL_COLS])
                self.commits += 1
        except sqlite3.Error as exc:
            self.error = str(exc)
        finally:
            con.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


def default_workers() -> int:
    """QF_API_WORKERS's default (shared/config.py ApiConfig)."""
    return qfconfig.load({}).api.workers


def _get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one GET; an HTTP error answer is returned, not raised (OSError if none)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _check(url: str) -> tuple[dict | None, str]:
    """The JSON object `url` answers with 200, or (None, why not)."""
    try:
        status, body = _get(url)
    except OSError as exc:
        return None, f"no answer: {exc}"
    if status != 200:
        return None, f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
    try:
        return json.loads(body), ""
    except ValueError:
        return None, f"HTTP 200 but not JSON: {body[:200].decode('utf-8', 'replace')}"


def deep_page(base: str, pages: int = DEEP_PAGES) -> tuple[str | None, str]:
    """The trades path `pages` pages of 100 deep, following next_cursor from the first page
    (the last cursor given when the fills run out first), or (None, why not)."""
    path, cursor = "/api/v1/trades?limit=100", None
    for n in range(pages):
        answer, why = _check(base + (path if cursor is None else f"{path}&cursor={urllib.parse.quote(cursor)}"))
        if answer is None:
            return None, f"page {n + 1}: {why}"
        if "next_cursor" not in answer:
            return None, f"page {n + 1} has no next_cursor (cursor pagination missing?)"
        if answer["next_cursor"] is None:
            break
        cursor = answer["next_cursor"]
    if cursor is None:
        return None, "the first page has next_cursor null (too few fills)"
    return f"{path}&cursor={urllib.parse.quote(cursor)}", ""


def wrk(url: str, seconds: int, script: str) -> dict:
    """One wrk run against `url`: its done() line as a dict. Raises RuntimeError if wrk fails."""
    # a timeout as long as the run: a slow answer is measured, not dropped as a timeout
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", f"--timeout={max(seconds, 10)}s",
           "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-300:]}")
    return json.loads(lines[-1])


def _tree_rss_mib(pid: int) -> float:
    """RSS of `pid` and its children (gunicorn's master and workers), MiB."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total = 0.0
    for p in pids:
        try:
            total += rss_mib(p)
        except OSError:
            pass
    return total


def _start_api(db: str, tmp: str, workers: int) -> tuple[subprocess.Popen, str, str]:
    """`qf api` over `db` on a free port, answering: (process, base URL, log path)."""
    port = free_port()
    env = clean_environ()
    env.update({"QF_DB": db, "QF_API_BIND": f"127.0.0.1:{port}", "QF_SHABBAT_PAUSE": "false",
                "QF_API_WORKERS": str(workers), "QF_RUN_DIR": os.path.join(tmp, "run"), "QF_LOG_LEVEL": "WARNING"})
    qf = os.path.join(os.path.dirname(sys.executable), "qf")
    cmd = [qf, "api"] if os.path.exists(qf) else [sys.executable, "-m", "services.cli", "api"]
    log_path = os.path.join(tmp, "api.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_WAIT_S
    while True:
        try:
            _get(base + "/health/live", timeout=2)  # any HTTP answer: gunicorn and a worker are up
            return proc, base, log_path
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"the API did not start: {f.read()[-500:]}")
        time.sleep(0.1)  # polling interval of a bounded wait


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM gunicorn's master (it stops its workers); SIGKILL its session if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
    except ProcessLookupError:
        pass
    proc.wait(10)


def _figures(runs: dict[str, dict], failed: dict[str, str]) -> dict:
    out: dict = {}
    for name, r in runs.items():
        errors = sum(r["errors"].values())
        out.update({f"api_{name}_p50_ms": round(r["p50_ms"], 2), f"api_{name}_p99_ms": round(r["p99_ms"], 2),
                    f"api_{name}_rps": round(r["rps"], 1), f"api_{name}_errors": errors})
        if errors:
            out[f"api_{name}_error_kinds"] = ",".join(f"{k}={v}" for k, v in r["errors"].items() if v)
    for name, why in failed.items():
        out[f"api_{name}_failed"] = why
    work = [runs[n] for n in WORK if n in runs]
    if work:
        out["api_p99_ms"] = round(max(r["p99_ms"] for r in work), 2)
        out["api_rps"] = round(sum(r["rps"] for r in work) / len(work), 1)
    out["api_errors"] = sum(sum(r["errors"].values()) for r in runs.values())
    if "floor" in runs:
        out["api_floor_p99_ms"] = round(runs["floor"]["p99_ms"], 2)
        if work and runs["floor"]["p99_ms"] > 0:
            out["api_p99_vs_floor"] = round(out["api_p99_ms"] / runs["floor"]["p99_ms"], 1)
    if failed:
        out["api_failed_endpoints"] = ",".join(failed)
    return out


def run() -> dict:
    """Generate (or reuse) the database, start the API, load each endpoint with wrk; the figures."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (make sysdeps installs it)")
    cached = cached_db(FILLS)
    tmp = tempfile.mkdtemp(prefix="qf-bench-api-")
    db = os.path.join(tmp, "qf.db")
    shutil.copyfile(cached, db)  # the live writer's fills stay out of the cached file
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        fills = con.execute('SELECT COUNT(*) FROM "fills"').fetchone()[0]
    finally:
        con.close()
    workers = default_workers()
    script, distinct = os.path.join(tmp, "done.lua"), os.path.join(tmp, "distinct.lua")
    for path, text in ((script, WRK_LUA), (distinct, WRK_DISTINCT_LUA)):
        with open(path, "w") as f:
            f.write(text)
    runs: dict[str, dict] = {}
    failed: dict[str, str] = {}
    proc = None
    writer = LiveWriter(db, WRITES_PER_S) if WRITES_PER_S > 0 else None
    started = time.monotonic()
    try:
        proc, base, _ = _start_api(db, tmp, workers)
        if writer is not None:
            writer.start()
        for name, path in (*ENDPOINTS, DISTINCT):
            if path is None:
                path, why = deep_page(base)
                if path is None:
                    failed[name] = why
                    continue
            answer, why = _check(base + path)
            if answer is None:
                failed[name] = why
                continue
            print(f"wrk {name} {path[:70]} ({SECONDS} s)", flush=True)
            runs[name] = wrk(base + path, SECONDS, distinct if name == DISTINCT[0] else script)
        rss = _tree_rss_mib(proc.pid)
    finally:
        if writer is not None:
            writer.stop()
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    live = {"api_live_writes_per_s": round(writer.commits / (time.monotonic() - started), 1) if writer else 0.0}
    if writer is not None and writer.error:
        live["api_live_writer_failed"] = writer.error
    return {**_figures(runs, failed), **live, "api_fills": fills, "api_workers": workers,
            "api_rss_mb": round(rss, 1), "api_seconds": SECONDS}
