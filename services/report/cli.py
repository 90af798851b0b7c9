"""`qf report`: the shell around the report's core — arguments, the source, the files, the README.

Exit status: 0 written; 1 a source unavailable now (the API unreachable or failing, 5xx), or a
file that cannot be written; 2 bad input (a missing or unusable file, a malformed CSV, a fill
the ledger cannot book, an API that refuses the token, a README without its markers, a bad
argument). Each failure is one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation

EXIT_UNAVAILABLE, EXIT_BAD_INPUT = 1, 2
SUMMARY = "summary.md"


class BadArgument(ValueError):
    """An argument that cannot be used, said in one line (exit status 2)."""


class WriteError(OSError):
    """An output file that cannot be written, said in one line (exit status 1)."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="draw the equity, drawdown, P&L per trip and P&L by hour charts and a summary table",
        description="Read the fills, equity snapshots and risk's state changes from a database (live or "
                    "`qf backtest`'s), the deployed API or its CSV export, and write four PNG charts (equity "
                    "with the starting balance and risk's halts and pauses shaded, drawdown below the peak, "
                    "P&L per round trip, P&L by weekday and UTC hour) and summary.md (net P&L, fees, win rate, "
                    "profit factor, Sharpe, Sortino, max drawdown and its duration, slippage, maker share) to "
                    "--out. With --readme, also rewrite the block between <!-- report:start --> and "
                    "<!-- report:end --> of that file. The same data gives the same bytes.",
        epilog="Exit status: 0 written; 1 the source is unavailable now or a file cannot be written; 2 bad input.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", metavar="FILE", help="a QuantumFlow SQLite database, opened read-only")
    src.add_argument("--api", metavar="URL", help="the API's base URL, e.g. https://quantumflow.fly.dev: trades from "
                                                  "/api/v1/trades?format=csv, equity, risk events")
    src.add_argument("--csv", metavar="FILE", help="an export of GET /api/v1/trades?format=csv (pages may follow "
                                                   "one another, each with its header)")
    p.add_argument("--token", help="bearer token sent to --api (default: $QF_API_TOKEN)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help=f"directory for the PNGs and {SUMMARY} (made if missing)")
    p.add_argument("--readme", metavar="FILE", help="rewrite the report block of this Markdown file; the image "
                                                    "links are relative to it")
    p.add_argument("--from", dest="start", metavar="TIME",
                   help="from this time on: ns since the epoch, an RFC 3339 time (2026-01-05T08:00:00Z) or a UTC "
                        "date (2026-01-05); default: the first fill or snapshot")
    p.add_argument("--to", dest="end", metavar="TIME", help="up to this time, excluded (same forms); default: the last")
    p.add_argument("--start-cash", metavar="AMOUNT",
                   help="with --csv: the starting balance (an export has no equity snapshots, so the curve is the "
                        "net P&L from 0 and Sharpe and drawdown %% are n/a without it)")
    p.set_defaults(func=main)


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_time(text: str | None, name: str) -> int | None:
    """ns since the epoch from digits (ns), an RFC 3339 time with its offset, or a date (00:00 UTC).
    Raises BadArgument."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit() and len(text) <= 19:
        return int(text)
    try:
        if _DATE.fullmatch(text):
            t = datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
        else:
            t = datetime.fromisoformat(text)
            if t.tzinfo is None:
                raise BadArgument(f"{name} {text!r}: give its UTC offset (…Z or …+00:00)")
    except ValueError:
        raise BadArgument(f"{name} {text[:40]!r}: expected ns since the epoch, an RFC 3339 time "
                          "(2026-01-05T08:00:00Z) or a date (2026-01-05)") from None
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def main(args: argparse.Namespace) -> int:
    from services.report.sources import SourceError
    from services.report.markdown import MarkerError
    try:
        return _run(args)
    except BadArgument as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except SourceError as exc:
        return _fail(str(exc), exc.status)
    except MarkerError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except WriteError as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)


def _fail(text: str, status: int) -> int:
    print(f"qf report: {text}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace) -> int:
    from services.report import charts, markdown, sources

    start, end = parse_time(args.start, "--from"), parse_time(args.end, "--to")
    if start is not None and end is not None and end <= start:
        raise BadArgument("--to must be after --from")
    start_cash = None
    if args.start_cash is not None:
        if not args.csv:
            raise BadArgument("--start-cash is for --csv (a database and the API have equity snapshots)")
        try:
            start_cash = Decimal(args.start_cash)
        except InvalidOperation:
            start_cash = None
        if start_cash is None or not start_cash.is_finite() or start_cash < 0:
            raise BadArgument(f"--start-cash {args.start_cash[:40]!r}: expected an amount ≥ 0, e.g. 10000")
    readme_text = None
    if args.readme:  # before the work: a README that cannot take the report stops it early
        readme_text = _read(args.readme)
        markdown.replace_block(readme_text, "", args.readme)
    if args.db:
        loaded = sources.load_db(args.db, start, end)
    elif args.csv:
        loaded = sources.load_csv(args.csv, start, end)
    else:
        loaded = sources.load_api(args.api, args.token or os.environ.get("QF_API_TOKEN") or None, start, end)
    report = make_report(loaded, start, end, start_cash)
    images = charts.draw_all(report)
    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot make the directory {out}: {exc.strerror or exc}") from None
    files = dict(images)
    files[SUMMARY] = markdown.block(report, loaded.source, "", loaded.has_states).encode()
    written = [name for name, data in files.items() if _write(os.path.join(out, name), data)]
    line = (f"{report.trips:,} round trips from {report.fills:,} fills, {charts.period(report)}; "
            f"{len(written)} of {len(files)} files in {out} changed")
    if args.readme:
        where = os.path.relpath(os.path.abspath(out), os.path.dirname(os.path.abspath(args.readme)))
        content = markdown.block(report, loaded.source, where.replace(os.sep, "/"), loaded.has_states)
        changed = _write(args.readme, markdown.replace_block(readme_text, content, args.readme).encode())
        line += f"; {args.readme} {'updated' if changed else 'unchanged'}"
    print(line)
    return 0


def make_report(loaded, start: int | None, end: int | None, start_cash: Decimal | None = None):
    """The Report of what a source loaded (sources.Loaded), for the range asked."""
    from services.report.core import Tally

    derive = loaded.equity is None or not len(loaded.equity.ts)
    tally = Tally(start, end, derive_curve=derive)
    for batch in loaded.fills:
        tally.add(batch)
    return tally.report(None if derive else loaded.equity, loaded.changes, loaded.states_from, start_cash)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise BadArgument(f"--readme {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadArgument(f"--readme {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def _write(path: str, data: bytes) -> bool:
    """Write `data` to `path` unless it already holds exactly that (whole: a temporary file
    renamed over it). Returns whether it changed. Raises WriteError."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except OSError:  # missing or unreadable: written below, or the write says why not
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    return True
