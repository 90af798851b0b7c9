"""`qf parity`: a paper session beside the backtest of the capture it traded — the orders both runs
made, the orders only one made, how their fills differ and, where the databases say, why.

Who calls what: services/cli.py registers `add_parser`; `main(args)` reads PAPER.db read-only
(`open_paper`, `read_session`, `read_run`), backtests the capture with the paper session's settings
through `services.backtest.cli.run` into a temporary (or `--out`) database, reads that back
(`read_run`), and hands both runs to the pure core `compare(paper, backtest, ticks, tolerance_ns)`,
which pairs the orders and names the differences (services/backtest/pairing.py: the pure core and its
matching rules); `render` prints its report for a person.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from contextlib import closing

from services.backtest.cli import BadInput, check_captures, damage, open_db, read_config_file
from services.backtest.cli import report as report_error
from shared import config as qfconfig
from shared.errors import ConfigError
from services.backtest.pairing import FillView, Item, Run, _clock, _dec, compare
from shared.money import ZERO



def open_paper(path: str) -> sqlite3.Connection:
    """PAPER.db opened read-only. Raises BadInput (one line naming the file) for a missing file, a
    file that is not SQLite, or a database without the `orders` table."""
    if "://" in path:
        # the URL last, masked (shared.config.mask_secrets): its password never reaches the terminal
        raise BadInput("--db names a database server; qf parity reads a SQLite file (copy the session's tables "
                       f"to one): {qfconfig.mask_secrets(path)}")
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: not a file")
    try:
        con = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=5)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise BadInput(f"{path}: not a QuantumFlow database ({exc})") from None
    if not {"orders", "fills"} <= tables:
        con.close()
        raise BadInput(f"{path}: not a QuantumFlow database (no orders and fills tables)")
    con.row_factory = sqlite3.Row
    return con


def _tables(con: sqlite3.Connection) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def read_session(con: sqlite3.Connection) -> tuple[int, dict[str, str]] | None:
    """The newest (last inserted) broker `sessions` row: (ts, settings), or None when the database
    has none (a session older than the table). Raises BadInput for settings that are not a JSON object."""
    if "sessions" not in _tables(con):
        return None
    row = con.execute("SELECT ts, settings FROM sessions WHERE service = 'broker' ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    try:
        settings = json.loads(row["settings"])
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise BadInput("the newest sessions row's settings are not a JSON object")
    return row["ts"], {str(k): str(v) for k, v in settings.items()}


def read_run(con: sqlite3.Connection, span: tuple[int | None, int | None] | None = None) -> Run:
    """Every order (with its fills) and every risk denial of a database. `span` (ns) if given,
    else the database's own: its first and last session, equity, order rows."""
    tables = _tables(con)
    fills: dict[str, list[FillView]] = {}
    for r in con.execute("SELECT * FROM fills ORDER BY ts, exch_ts, fill_id"):
        fills.setdefault(r["order_id"], []).append(FillView(
            _dec(r["price"]), _dec(r["qty"]), _dec(r["fee"]) or ZERO, r["fee_asset"], r["liquidity"],
            int(r["exch_ts"]), int(r["ts"])))
    items: list[Item] = []
    for r in con.execute("SELECT * FROM orders ORDER BY created_ts, order_id"):
        keys = r.keys()
        items.append(Item("order", r["client_order_id"], r["symbol"], int(r["created_ts"]), order_id=r["order_id"],
                          side=r["side"], qty=_dec(r["qty"]), status=r["status"], reason=r["reason"] or "",
                          arrival_ts=r["arrival_ts"] if "arrival_ts" in keys else None,
                          filled_qty=_dec(r["filled_qty"]), avg_price=_dec(r["avg_price"]),
                          decision_mid=_dec(r["decision_mid"]) if "decision_mid" in keys else None,
                          arrival_mid=_dec(r["arrival_mid"]) if "arrival_mid" in keys else None,
                          fills=tuple(fills.get(r["order_id"], ()))))
    if "risk_events" in tables:
        by_coid = {i.client_order_id: i for i in items}
        seen: set[str] = set()
        for r in con.execute("SELECT ts, code, text, client_order_id, symbol FROM risk_events WHERE kind = 'DENIED' "
                             "ORDER BY ts, id"):
            coid = r["client_order_id"]
            order = by_coid.get(coid)
            if order is not None:  # risk gave up on an order the broker took: a note on that order
                order.denial = order.denial or r["code"]
            elif coid not in seen:  # a retry denied again is the same order
                seen.add(coid)
                items.append(Item("denied", coid, r["symbol"], int(r["ts"]), reason=r["code"], text=r["text"] or ""))
    items.sort(key=lambda i: (i.ts, i.client_order_id))
    if span is None:
        stamps = [i.ts for i in items]
        for sql, table in (("SELECT min(ts), max(ts) FROM sessions", "sessions"),
                           ("SELECT min(ts), max(ts) FROM equity", "equity"),
                           ("SELECT min(updated_ts), max(updated_ts) FROM orders", "orders")):
            if table in tables:
                stamps += [t for t in con.execute(sql).fetchone() if t is not None]
        stamps = [t for t in stamps if t > 0]  # a lock-step broker's clock reads 0 before the first book
        span = (min(stamps), max(stamps)) if stamps else (None, None)
    return Run(items, span[0], span[1])


# -- the pure core: pairing and the report ----------------------------------------------------------

def _what(i: dict) -> str:
    if i["kind"] == "denied":
        return f"{i['symbol']} denied by risk {i['code']}"
    why = f" {i['reason']}" if i["reason"] else ""
    note = f" (risk then answered {i['risk_denial']})" if i.get("risk_denial") else ""
    return f"{i['side']} {i['qty']} {i['symbol']} {i['status']}{why}{note}"


def _fills_text(f: dict) -> str:
    if not f["count"]:
        return "no fills"
    return (f"{f['qty']} @ {f['avg_price']} {f['liquidity']} ({f['count']} fill{'s' * (f['count'] > 1)}), "
            f"fee {f['fee']} {f['fee_asset']}")


def _lat(x) -> str:
    return "-" if x is None else f"{x:g}"


def _clock_text(clock: dict | None) -> str:
    if clock is None:
        return "not aligned (no pair of filled orders, and the runs' times do not overlap)"
    if not clock["pairs"]:
        return "one clock assumed (no pair of filled orders; the runs' times overlap)"
    off, slope = clock["offset_ns"], clock["slope"]
    pace = "" if abs(slope - 1) < 1e-3 else f", paper time running {slope:.4g} s per capture second"
    return (f"paper = capture {'+' if off >= 0 else '-'} {abs(off) / 1e9:.3f} s at the first pair{pace} "
            f"(from {clock['pairs']} filled pairs)")


def render(report: dict) -> str:
    """The report as text: a header of counts, then one line per pair (differences and causes
    indented below it), per paper-only and per backtest-only order, in capture time."""
    c, clock, first_diff = report["counts"], report["clock"], report["first_difference_ts"]
    first, last = report["capture_span"]
    lines = [
        f"parity       paper {report.get('paper_db', '?')} vs a backtest of {', '.join(report.get('capture', []))} "
        f"({_clock(first, True)} - {_clock(last)} UTC)",
        f"settings     {report.get('settings', {}).get('source', '?')}",
        "clocks       " + _clock_text(clock) + f"; pairing within {report['tolerance_ms']:g} ms",
        f"orders       paper {c['paper_orders']} (+{c['paper_denied']} denied by risk), backtest "
        f"{c['backtest_orders']} (+{c['backtest_denied']} denied by risk)",
        f"matched      {c['matched']} ({c['matched_by_fill']} by fill, {c['matched_by_time']} by time): "
        f"{c['alike']} alike, {c['differ']} differ",
        f"alone        paper only {c['paper_only']}, backtest only {c['backtest_only']}",
        f"first diff   {_clock(first_diff) + ' UTC (capture time)' if first_diff else 'none'}",
    ]
    for note in report.get("notes", []):
        lines.append(f"note         {note}")
    if report["pairs"]:
        lines.append("\npairs (capture time UTC, paper <-> backtest; latency = arrival - created, paper / backtest)")
    for pr in report["pairs"]:
        p, b = pr["paper"], pr["backtest"]
        head = f"  {_clock(b['ts'])} {p['client_order_id']} <-> {b['client_order_id']}"
        lat = f"latency {_lat(pr['latency_ms']['paper'])} / {_lat(pr['latency_ms']['backtest'])} ms"
        if not pr["differences"]:
            lines.append(f"{head}: alike, {_what(p)} {_fills_text(pr['fills']['paper'])}; {lat}")
            continue
        lines.append(f"{head}: differ in {', '.join(pr['differences'])}; {lat}")
        for run, i in (("paper", p), ("backtest", b)):
            fills = f" {_fills_text(pr['fills'][run])}" if i["kind"] == "order" else ""
            lines.append(f"      {run:<9} {_what(i)}{fills}")
        if pr["fills"]["price_diff_ticks"] not in (None, "0"):
            lines.append(f"      price     paper - backtest = {pr['fills']['price_diff_ticks']} ticks "
                         f"(paper's cost {pr['fills']['paper_cost_ticks']} ticks)")
        lines += [f"      cause     {x['text']}" for x in pr["causes"]]
    for title, run, entries in (("paper only", "paper", report["paper_only"]),
                                ("backtest only", "backtest", report["backtest_only"])):
        if entries:
            lines.append(f"\n{title} (capture time UTC)")
        other = "backtest" if run == "paper" else "paper"
        for a in entries:
            i = a[run]
            near = a.get("nearest")
            near = (f"; nearest {other} order {near['client_order_id']} {abs(near['delta_ms']) / 1e3:.3f} s "
                    f"{'later' if near['delta_ms'] > 0 else 'earlier'}") if near else ""
            fills = f" {_fills_text(a['fills'])}, latency {_lat(a['latency_ms'])} ms" if i["kind"] == "order" else ""
            lines.append(f"  {_clock(a['capture_ts'])} {i['client_order_id']}: {_what(i)}{fills}{near}")
            lines += [f"      cause     {x['text']}" for x in a["causes"]]
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------

def load_settings(con: sqlite3.Connection, db: str, args: argparse.Namespace) -> tuple[qfconfig.Config, dict]:
    """The Config of the newest broker session in PAPER.db (unknown names dropped, noted), with
    --config and --symbols over it; the environment when the database records no session.
    Returns (config, {"source", "dropped"}). Raises BadInput."""
    session = read_session(con)
    info: dict = {"dropped": []}
    if session is None:
        env = dict(os.environ)
        info["source"] = f"the environment ({db} records no session: its broker predates the sessions table)"
    else:
        ts, settings = session
        known = {name for name, _, _ in qfconfig.all_settings()}
        info["dropped"] = sorted(k for k in settings if k not in known)
        env = {k: v for k, v in settings.items() if k in known}
        info["source"] = f"{db}'s broker session of {_clock(ts, True)} UTC"
        info["session_ts"] = ts
    if args.config:
        env.update(read_config_file(args.config))
        info["source"] += f", {args.config} over it"
    if args.symbols:
        env["QF_SYMBOLS"] = args.symbols
    try:
        return qfconfig.load(env), info
    except ConfigError as exc:
        raise BadInput(qfconfig.mask_secrets(str(exc))) from None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def main(args: argparse.Namespace) -> int:
    import logging

    from services.backtest.cli import Progress, run
    from services.risk.limits import from_config
    from shared.db import close_db

    if not args.verbose:
        logging.getLogger("qf").setLevel(logging.ERROR)
    tmp = progress = None
    try:
        if not 0 < args.tolerance_ms <= 3_600_000:
            raise BadInput(f"--tolerance-ms {args.tolerance_ms:g}: must be in (0, 3600000]")
        paper_con = open_paper(args.db)
        try:
            cfg, info = load_settings(paper_con, args.db, args)
            paper = read_run(paper_con)
        except sqlite3.Error as exc:
            raise BadInput(f"{args.db}: not a QuantumFlow database ({exc})") from None
        finally:
            paper_con.close()
        try:
            limits = from_config(cfg)
        except ConfigError as exc:
            raise BadInput(qfconfig.mask_secrets(str(exc))) from None
        specs = check_captures(args.capture)
        if args.out:
            if "://" in args.out:
                raise BadInput(f"--out {qfconfig.mask_secrets(args.out)}: qf parity writes a SQLite file")
            if _same_file(args.out, args.db):
                raise BadInput(f"{args.out} is the paper database: choose another --out")
            if os.path.exists(args.out) and not args.overwrite:
                raise BadInput(f"{args.out} exists: remove it, pass --overwrite, or choose another --out")
            out = args.out
            open_db(out, args.overwrite)
        else:
            tmp = tempfile.mkdtemp(prefix="qf-parity-")
            out = os.path.join(tmp, "backtest.db")
            open_db(out, False)
        progress = Progress()
        summary, unrepaired = run(cfg, specs, out, cfg.broker.seed, progress)
        close_db()
        with closing(sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(out))}?mode=ro", uri=True)) as bt:
            bt.row_factory = sqlite3.Row
            backtest = read_run(bt, (summary.get("first_ts"), summary.get("last_ts")))
        backtest.gaps = [g.as_dict() for g in unrepaired]
    except BadInput as exc:
        return report_error("parity", exc)
    finally:
        if progress is not None:
            progress.close()
        close_db()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # a free-running replay's timers run on the wall clock; a lock-step one runs on the capture's
    lockstep = bool(getattr(cfg.bus, "lockstep", ""))
    speed = cfg.md.replay_speed if cfg.md.feed.kind == "replay" and not lockstep else None
    report = compare(paper, backtest, {s: r.tick_size for s, r in limits.rules.items()},
                     int(args.tolerance_ms * 1e6), cfg.risk.tick_size, speed)
    notes = []
    if speed is not None and speed != 1:
        notes.append(f"the paper session replayed its capture at speed {speed:g} (QF_REPLAY_SPEED): timers in "
                     f"wall-clock time cover other stretches of capture time than in the backtest")
    if info["dropped"]:
        notes.append(f"settings this version does not know were left out: {', '.join(info['dropped'])}")
    for text in damage(summary):
        notes.append(f"the backtest's capture is damaged: {text}")
    for g in backtest.gaps:
        notes.append(f"the backtest's {g['symbol']} book broke at a gap never repaired after update id "
                     f"{g['after_update_id']} ({_clock(g['ts'])} UTC): its trading ended there")
    report = {"paper_db": args.db, "capture": list(args.capture), "backtest_db": args.out or None,
              "settings": info, "notes": notes, **report, "backtest": summary}
    print(json.dumps(report) if args.json else render(report))
    return 0
