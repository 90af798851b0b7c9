"""`qf status|positions|trades|halt|resume|flatten`: the control layer (services/control) on a terminal.

The queries read the database read-only (QF_DB), the actions go to risk (QF_RISK_REP), exactly as
the REST API's do. Tables for a person; `--json` prints what the API would answer.

Exit status: 0 done; 1 the database or risk could not answer (one line naming which and why);
2 bad input (a bad argument or QF_* setting).
"""
from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import unicodedata
from datetime import datetime, timezone
from decimal import Decimal

from shared.runtime import kind_of

EXIT_UNAVAILABLE, EXIT_BAD_INPUT = 1, 2
_SYMBOL = re.compile(r"[A-Za-z0-9]{1,20}")  # the REST API's rule (services/api/schemas.py Symbol)


def _symbol(value: str) -> str:
    """`--symbol`: 1 to 20 letters or digits, any case (argparse: exit 2 with the reason)."""
    if not _SYMBOL.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a symbol: 1 to 20 letters or digits, e.g. btcusdt")
    return value.upper()


def add_parser(sub) -> None:
    s = sub.add_parser("status", help="trading state, pause, equity, orders and positions (from the database)",
                       description="What the running stack has stored: risk's last trading-state change, the "
                                   "Shabbat/Yom Tov pause now or next, the latest equity, orders by status and "
                                   "the positions. Reads QF_DB read-only; the same answer as GET /api/v1/status.")
    s.add_argument("--json", action="store_true", help="print the API's JSON")
    s.set_defaults(func=cmd_status)
    p = sub.add_parser("positions", help="average-cost positions from the fills",
                       description="Every symbol's position from its fills (the ledger risk keeps), read-only.")
    p.add_argument("--symbol", type=_symbol, help="one symbol, e.g. btcusdt")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_positions)
    t = sub.add_parser("trades", help="the latest fills, newest first",
                       description="Fills from the database, newest first, read-only.")
    t.add_argument("--symbol", type=_symbol, help="one symbol, e.g. btcusdt")
    t.add_argument("--limit", type=int, default=20, help="how many (1..1000, default 20)")
    t.add_argument("--json", action="store_true", help="print the API's JSON")
    t.set_defaults(func=cmd_trades)
    for name, text in (("halt", "stop all trading: risk denies every new order (only cancels pass)"),
                       ("resume", "trade again (ACTIVE), after a HALT or a FLATTEN"),
                       ("flatten", "cancel working orders and close every position through the normal path, "
                                   "then REDUCING")):
        a = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. Sent to risk on "
                           "QF_RISK_REP, which answers with the state in force.")
        a.add_argument("--reason", required=True, help="why (stored with the state change)")
        a.add_argument("--by", help="who (default: qf:<your user name>)")
        a.add_argument("--json", action="store_true", help="print risk's answer as JSON")
        a.set_defaults(func=cmd_action, action=name)


def _control(watch: bool = False):
    """The control layer on QF_* settings; `watch`: with a bus watcher (services/control/watch.py)
    for heartbeats and feeds (the caller closes `ctl.watch`)."""
    import logging

    from services.control import Control
    from services.control.watch import BusWatch
    from shared.config import load
    # what goes wrong is said in one line by _run; the readers' own warnings would repeat it
    logging.getLogger("qf").setLevel(logging.ERROR)
    cfg = load()
    return Control(cfg, watch=BusWatch(cfg) if watch else None)


def _local(iso: str, tz: str) -> str:
    """An ISO-8601 time as the place's local time a person reads: `Fri 11 Dec 15:55 IST`."""
    from zoneinfo import ZoneInfo
    return datetime.fromisoformat(iso).astimezone(ZoneInfo(tz)).strftime("%a %d %b %Y %H:%M %Z")


def _fail(text: str, code: int) -> int:
    print(f"qf: {text}", file=sys.stderr)
    return code


def _run(fn):
    """Run `fn()`; the errors a person can act on become one line and an exit status."""
    from services.control import RiskRefused, RiskUnreachable
    import sqlite3

    import peewee as pw

    from services.control.dbreader import DatabaseUnavailable
    from shared.errors import ConfigError
    from shared.storage import problem
    try:
        return fn()
    except ConfigError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except ValueError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except DatabaseUnavailable as exc:
        return _fail(f"the database cannot be read: {exc.message}", EXIT_UNAVAILABLE)
    except (pw.DatabaseError, sqlite3.Error) as exc:  # a query failed: a lock held too long, a damaged page
        return _fail(f"the database cannot be queried: {problem(exc)}", EXIT_UNAVAILABLE)
    except RiskUnreachable as exc:
        return _fail(f"risk is not answering: {exc} (is the stack running? QF_RISK_REP)", EXIT_UNAVAILABLE)
    except RiskRefused as exc:
        return _fail(f"risk refused: {exc.message}", EXIT_UNAVAILABLE)


def _dump(obj) -> None:
    from services.control.queries import jsonable
    print(json.dumps(jsonable(obj), indent=2, sort_keys=False))


def _num(value) -> str:
    from services.control.queries import render_decimal
    return render_decimal(value) if isinstance(value, Decimal) else "-" if value is None else str(value)


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _safe(text: str) -> str:
    """`text` with control characters (a newline, an ESC that would drive the terminal) escaped:
    `\\x1b`, never printed raw."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _width(text: str) -> int:
    """Columns `text` takes on a terminal: 2 for a wide character (CJK, most emoji), 0 for a
    combining mark, a zero-width joiner or a variation selector, else 1."""
    if text.isascii():
        return len(text)
    n = 0
    for ch in text:
        if unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        n += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return n


def _table(header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> None:
    """Columns two spaces apart, as wide as their widest cell on a terminal (`_width`); the
    columns numbered in `right` (numbers) right-aligned, header included, the rest left-aligned."""
    header = [_safe(h) for h in header]
    rows = [[_safe(c) for c in r] for r in rows]
    widths = [max(_width(h), *(_width(r[i]) for r in rows)) if rows else _width(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        cells = []
        for i, (cell, w) in enumerate(zip(line, widths)):
            pad = " " * (w - _width(cell))
            cells.append(pad + cell if i in right else cell + pad)
        print("  ".join(cells).rstrip())


def _places(value: Decimal) -> int:
    """Decimals `value` needs to be shown exactly ('0.00305' 5, '61664.0' 0, '1E+2' 0); no context, no rounding."""
    sign, digits, exp = value.as_tuple()
    if not isinstance(exp, int):  # NaN, infinity: the stored text is shown as it is
        return 0
    zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(0, -(exp + zeros)) if any(digits) else 0


def _fixed(value: Decimal, places: int) -> str:
    """`value` exactly, with `places` decimals (at least `_places(value)`: zeros are only ever appended)."""
    if not value.is_finite():
        return str(value)
    text = format(value, "f")
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    if len(frac) > places:
        raise ValueError(f"{text} needs more than {places} decimals")
    return whole + ("." + frac.ljust(places, "0") if places else "")


def _column(values: list, least: int = 0) -> list[str]:
    """A column of amounts (Decimals or their text; None: "-") with one number of decimals: the most
    any of them needs, at least `least`. Exact: no value is rounded."""
    amounts = [None if v is None else v if isinstance(v, Decimal) else Decimal(str(v)) for v in values]
    places = max([least, *(_places(a) for a in amounts if a is not None)])
    return ["-" if a is None else _fixed(a, places) for a in amounts]


# Decimals a fee shows at least, by asset (Binance shows stablecoin amounts to the cent); any other
# asset 8 (a satoshi). A fee that needs more shows them all, and so does the rest of its column.
FEE_PLACES = {"USDT": 2, "USDC": 2, "FDUSD": 2, "BUSD": 2, "TUSD": 2, "DAI": 2, "USD": 2, "EUR": 2, "TRY": 2,
              "BRL": 2}


def _fill_no(fill_id: str, order_id: str | None) -> str:
    """The fill's number within its order (`#2`), from the broker's `<order_id>-<n>` fill ids;
    any other id as its last 12 characters."""
    head, sep, n = (fill_id or "").rpartition("-")
    if sep and n.isdigit() and (order_id is None or head == order_id):
        return f"#{n}"
    return fill_id[-12:] if fill_id else "-"


def _beat(name: str, s: dict) -> str:
    """One service's heartbeat for the status text: `risk 0.4s`, `broker 7.2s STALE`, `strategy SILENT`."""
    if "instances" in s:  # one service as several processes (QF_SYMBOLS groups): each of them
        return ", ".join(_beat(n, v) for n, v in s["instances"].items())
    if s["age_s"] is None:
        return f"{name} not heard"
    return f"{name} {s['age_s']:.1f}s" + ("" if s["fresh"] else " STALE") + \
        ("" if s["status"] in ("ok", "no heartbeat") or kind_of(name) == "marketdata" else f" ({s['status']})")


def cmd_status(args: argparse.Namespace) -> int:
    def run() -> int:
        ctl = _control(watch=True)
        try:
            ctl.bus(wait=True)  # one heartbeat period at most: each service heard, or said not to be
            st = ctl.status()
        finally:
            ctl.watch.close()
        if args.json:
            _dump(st)
            return 0
        rs, pause = st["risk_state"], st["pause"]
        since = f" since {_when(rs['ts'])}" if rs["ts"] else ""
        why = f" ({rs['code']}: {rs['reason']})" if rs["code"] else ""
        live = f" (risk now: {st['trading_state']})" if st["trading_state"] != rs["state"] else ""
        print(f"trading   {rs['state']}{why}{since}{live}")
        if any(s["age_s"] is not None for s in st["services"].values()):
            print("services  " + ", ".join(_beat(name, s) for name, s in st["services"].items()))
            print("feeds     " + (", ".join(f"{sym} {f['state']}" for sym, f in st["feeds"].items()) or "-"))
        else:
            print(f"services  none heard within {ctl.watch.grace_s:.1f} s (is the stack running? "
                  f"the heartbeats come on QF_MD_PUB, QF_BROKER_PUB, QF_RISK_PUB, QF_STRATEGY_PUB)")
        if pause["enabled"]:
            cur, nxt, tz = pause["current"], pause["next"], ctl.pause.calendar.where.tz
            if cur:
                print(f"pause     {cur['name']}: paused until {_local(cur['end'], tz)}")
            if nxt:
                print(f"next      {nxt['name']}: {_local(nxt['start'], tz)} to {_local(nxt['end'], tz)}; "
                      f"flattening from {_local(pause['flatten_from'], tz)[-9:]}")
        else:
            print("pause     off (QF_SHABBAT_PAUSE=false)")
        eq = st["equity"]
        print(f"equity    {_num(eq['equity']) if eq else '-'}" + (f" at {_when(eq['ts'])}" if eq else ""))
        orders = ", ".join(f"{k.lower()} {n}" for k, n in st["orders"].items() if n) or "none"
        print(f"fills     {st['fills']}; orders: {orders}")
        held = {s: q for s, q in st["positions"].items() if q}
        print("positions " + (", ".join(f"{s} {_num(q)}" for s, q in sorted(held.items())) or "flat"))
        return 0
    return _run(run)


def cmd_positions(args: argparse.Namespace) -> int:
    def run() -> int:
        found = _control().positions(args.symbol)
        if args.json:
            _dump({"positions": found})
            return 0
        if not found:
            print(f"no fills of {args.symbol}: no position" if args.symbol else "no fills yet: no positions")
            return 0
        _table(["symbol", "qty", "avg entry", "realized", "net realized", "last price", "fills"],
               [[p.symbol, _num(p.qty), _num(p.avg_price), _num(p.realized), _num(p.net_realized),
                 _num(p.last_price), str(p.fills)] for p in found])
        return 0
    return _run(run)


def cmd_trades(args: argparse.Namespace) -> int:
    from services.control.queries import MAX_LIMIT
    if not 1 <= args.limit <= MAX_LIMIT:
        return _fail(f"--limit must be between 1 and {MAX_LIMIT}, not {args.limit}", EXIT_BAD_INPUT)

    def run() -> int:
        rows, cursor = _control().trades_page(symbol=args.symbol, limit=args.limit)
        if args.json:  # the REST API's answer, to the letter
            _dump({"trades": rows, "count": len(rows), "next_cursor": cursor})
            return 0
        if not rows:
            print(f"no fills of {args.symbol}" if args.symbol else "no fills yet")
            return 0
        # numbers right-aligned, each column with the decimals the page needs (exact: zeros appended,
        # never a digit dropped); `fill` tells partial fills of one order apart
        qty, price = _column([r["qty"] for r in rows]), _column([r["price"] for r in rows])
        fee = _column([r["fee"] for r in rows], max(FEE_PLACES.get(r["fee_asset"], 8) for r in rows))
        _table(["time (UTC)", "symbol", "side", "qty", "price", "fee", "asset", "liquidity", "order", "fill"],
               [[_when(r["ts"]), r["symbol"], r["side"], q, p, f, r["fee_asset"] or "-", r["liquidity"] or "-",
                 r["client_order_id"], _fill_no(r["fill_id"], r["order_id"])]
                for r, q, p, f in zip(rows, qty, price, fee)], right=frozenset((3, 4, 5, 9)))
        return 0
    return _run(run)


def cmd_action(args: argparse.Namespace) -> int:
    def run() -> int:
        by = args.by or f"qf:{getpass.getuser()}"
        answer = _control().act(args.action, by, args.reason)
        if args.json:
            _dump(answer)
            return 0
        detail = answer.get("detail") or {}
        changed = "" if detail.get("changed", True) else " (unchanged)"
        print(f"risk: {answer['state']}{changed} — {answer['reason']}")
        for r in detail.get("flatten") or []:
            print(f"  {r.get('action', '').lower():6} {r.get('client_order_id', '')}: "
                  f"{r.get('verdict', '') or r.get('status', '')} {r.get('status', '') if r.get('verdict') else ''}"
                  .rstrip())
        held = {s: q for s, q in (answer.get("positions") or {}).items() if Decimal(q)}
        print("positions " + (", ".join(f"{s} {q}" for s, q in sorted(held.items())) or "flat"))
        return 0
    return _run(run)
