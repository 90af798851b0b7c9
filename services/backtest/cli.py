"""`qf backtest`: the shell around services/backtest/engine.py — arguments, inputs, the database, progress, the summary.

Exit status: 0 done; 1 the --db server cannot be reached now; 2 bad input (a missing or unreadable
file, not a capture, a symbol the capture never gives a book for, a bad setting, an existing --db
without --overwrite, a --db URL that names no usable database, receive times that go backwards
from the start); 3 the run finished but not over the capture as recorded: a gap in a symbol's
update ids was never repaired by a later snapshot (its trading ended at the gap), or the capture
held bad messages (a NaN, negative or oversized level, a bad trade: each named FILE:LINE, with
what a lost book skipped), or receive times that go backwards (the summary names each). With `--sweep` (services/backtest/sweep.py):
3 when some runs ended so, 4 when some run failed, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from shared import config as qfconfig
from shared.errors import ConfigError

EXIT_UNAVAILABLE, EXIT_BAD_INPUT, EXIT_UNREPAIRED_GAP = 1, 2, 3
PROGRESS_EVERY = 5_000  # records between progress updates
PLAIN_PROGRESS_S = 5.0  # without a terminal: one line this often
DEFAULT_DB = "backtest.db"
TOLERANCE_MS = 1000.0  # qf parity's default window for pairing (exch_ts, then aligned created_ts)


class BadInput(Exception):
    """A one-line reason the backtest cannot run, naming the file or setting at fault. Its text is
    masked (shared.config.mask_secrets) where it is printed: it may quote a database URL."""

    exit_status = EXIT_BAD_INPUT


class Unavailable(BadInput):
    """The database server of --db does not answer now (a later run may find it up): exit status 1."""

    exit_status = EXIT_UNAVAILABLE


def report(command: str, exc: BadInput) -> int:
    """Print `exc` as `qf COMMAND: …` in one line on stderr, credentials masked; returns the exit status."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(qfconfig.mask_secrets(f"qf {command}: {text}"), file=sys.stderr)
    return exc.exit_status


def add_parser(sub) -> None:
    p = sub.add_parser("backtest", help="run the strategy, risk and the paper exchange over captures, as fast "
                                        "as the CPU allows, and print the results",
                       description="Replays capture files through the same cores the services run (book "
                                   "sync, strategy, risk with every check and breaker, the fill model, the "
                                   "ledger) in one process, on the capture's recorded time; writes orders, "
                                   "fills, equity and risk events to a database with the live schema.")
    p.add_argument("--capture", nargs="+", required=True, metavar="FILE",
                   help="capture files (.jsonl or .jsonl.gz, as `qf record` writes them); files of one "
                        "market are played one after another in time order")
    p.add_argument("--symbols", help="comma-separated symbols to trade (default: QF_SYMBOLS)")
    p.add_argument("--db", help=f"SQLite file to write, or an empty PostgreSQL database's URL "
                                f"(default: {DEFAULT_DB})")
    p.add_argument("--overwrite", action="store_true", help="replace --db (with --sweep: --sweep-csv and "
                                                           "--sweep-dir's run-N.db) if it exists")
    lat = p.add_mutually_exclusive_group()
    lat.add_argument("--latency-ms", type=float, metavar="N",
                     help="constant entry latency in ms (sets QF_BROKER_LATENCY_MODE=constant)")
    lat.add_argument("--latency-mode", choices=("feed", "constant", "lognormal"),
                     help="QF_BROKER_LATENCY_MODE for this run")
    p.add_argument("--seed", type=int, help="seed of the sampled latency and the order ids (default: "
                                            "QF_BROKER_SEED)")
    p.add_argument("--config", metavar="FILE", help="a file of QF_NAME=value lines, over the environment")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--verbose", action="store_true", help="show the services' warnings and log lines on stderr "
                                                          "(default: errors only; the summary names gaps)")
    sw = p.add_argument_group("parameter sweep", "every combination of the --sweep values is one backtest of the "
                              "same captures with the same seed, over the settings above; in parallel processes; "
                              "the runs ranked by net P&L, printed (--json: one JSON array) and written as CSV")
    sw.add_argument("--sweep", action="append", metavar="KEY=V1,V2,…",
                    help="a setting (QF_STRATEGY_QTY, or strategy_qty) and its values; repeatable (at most "
                         "1,000 combinations)")
    sw.add_argument("--jobs", type=int, metavar="N", help="worker processes (default: one per core)")
    sw.add_argument("--sweep-dir", metavar="DIR", help="keep each run's database as DIR/run-N.db (default: a "
                                                       "temporary directory, removed)")
    sw.add_argument("--sweep-csv", metavar="FILE",
                    help="where to write the ranked table (default: sweep.csv)")
    p.set_defaults(func=main)


def add_parity_parser(sub) -> None:
    """`qf parity` (services/backtest/parity.py, imported when it runs: the parser must stay cheap)."""
    p = sub.add_parser("parity", help="backtest a capture with a paper session's settings and list how the two "
                                      "runs' orders and fills differ",
                       description="Reads PAPER.db (a paper session's database, read-only), backtests the "
                                   "capture(s) it traded with the session's settings (its broker's sessions row; "
                                   "--config overrides), pairs the two runs' orders (by their fills' exchange "
                                   "time, then by time) and lists every order of both: paired (fills compared, "
                                   "price differences in ticks) or only in one, with the cause where known. "
                                   "Exit status 0 when the report was made (differences are findings), 2 for "
                                   "bad input.")
    p.add_argument("--db", required=True, metavar="PAPER.db", help="the paper session's SQLite database (QF_DB)")
    p.add_argument("--capture", nargs="+", required=True, metavar="FILE",
                   help="the capture(s) of the market data the session traded (as `qf backtest --capture`)")
    p.add_argument("--config", metavar="FILE", help="QF_NAME=value lines over the session's settings")
    p.add_argument("--symbols", help="comma-separated symbols to backtest (default: the session's QF_SYMBOLS)")
    p.add_argument("--tolerance-ms", type=float, default=TOLERANCE_MS,
                   help=f"pairing window in ms (default {TOLERANCE_MS:g})")
    p.add_argument("--out", metavar="FILE", help="keep the backtest's database here (default: a temporary one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("--verbose", action="store_true", help="show the backtest's warnings on stderr")
    p.set_defaults(func=_parity_main)


def _parity_main(args: argparse.Namespace) -> int:
    from services.backtest.parity import main as parity_main
    return parity_main(args)


def read_config_file(path: str) -> dict[str, str]:
    """`QF_NAME=value` lines (blank lines and `#` comments skipped; `export ` allowed). Raises BadInput."""
    out = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("export "):
                    line = line[7:].lstrip()
                name, sep, value = line.partition("=")
                if not sep or not name.strip():
                    raise BadInput(f"{path}:{n}: expected QF_NAME=value, got {line[:60]!r}")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                out[name.strip()] = value
    except OSError as exc:
        raise BadInput(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"cannot read config {path}: not UTF-8 text (a byte {exc.object[exc.start]:#04x})") from None
    return out


def config_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment the run's config is loaded from: os.environ, --config's lines, the options.
    Raises BadInput."""
    env = dict(os.environ)
    if args.config:
        env.update(read_config_file(args.config))
    if args.symbols:
        env["QF_SYMBOLS"] = args.symbols
    if args.latency_ms is not None:
        env["QF_BROKER_LATENCY_MODE"], env["QF_BROKER_LATENCY_MS"] = "constant", repr(args.latency_ms)
    elif args.latency_mode:
        env["QF_BROKER_LATENCY_MODE"] = args.latency_mode
    if args.seed is not None:
        env["QF_BROKER_SEED"] = str(args.seed)
    return env


def load_config(args: argparse.Namespace) -> qfconfig.Config:
    env = config_env(args)
    try:
        return qfconfig.load(env)
    except ConfigError as exc:
        raise BadInput(qfconfig.mask_secrets(str(exc))) from None


def check_captures(paths: list[str]):
    """Each file exists, is readable, starts with a capture record and its receive times go
    forwards (services.marketdata.capture.check_capture); returns the replay specs (files grouped
    by market, each group in the order of its first record's time). Raises BadInput."""
    from services.marketdata.capture import CaptureError, check_capture, iter_capture
    from services.marketdata.feeds import CaptureSpec, detect_market

    firsts: dict = {}
    for path in paths:
        try:
            check_capture(path)
            first = next(iter(iter_capture(path)))
        except CaptureError as exc:
            raise BadInput(str(exc)) from None
        except OSError as exc:
            raise BadInput(f"{path}: {exc.strerror or exc}") from None
        firsts[path] = (detect_market(path), first["t"])
    groups: dict = {}
    for path, (market, t) in firsts.items():
        groups.setdefault(market, []).append((t, path))
    return [CaptureSpec(tuple(p for _, p in sorted(group)), market) for market, group in groups.items()]


def open_db(path: str, overwrite: bool):
    """Create the run's database `path` (a SQLite file, replaced when `overwrite`; or an empty
    PostgreSQL database's URL). Raises BadInput, or Unavailable for a server that does not answer."""
    import peewee

    from shared.db import init_db, where
    if "://" in path:
        try:
            qfconfig.check_db(path)
        except ValueError as exc:
            raise BadInput(f"--db: {exc}: {path}") from None  # the URL last: masking eats up to a delimiter
        try:
            return init_db(path)
        except ConfigError as exc:
            raise BadInput(str(exc)) from None
        except peewee.ImproperlyConfigured as exc:  # a driver not installed
            raise BadInput(f"--db {where(path)}: {exc}") from None
        except peewee.DatabaseError as exc:  # refused logins are StorageErrors (ConfigError) above
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise Unavailable(f"cannot reach the database {where(path)}: {first[:200]}") from None
    if os.path.exists(path):
        if not overwrite:
            raise BadInput(f"{path} exists: remove it, pass --overwrite, or choose another --db")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise BadInput(f"cannot replace {path}: {exc.strerror or exc}") from None
    try:
        return init_db(path)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None


class Progress:
    """A tqdm bar on a terminal (stderr), plain lines every PLAIN_PROGRESS_S otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.bar = None
        self.last = time.monotonic()
        self.start = self.last
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(unit=" msg", unit_scale=True, desc="backtest", file=sys.stderr, dynamic_ncols=True)
        self.done = 0

    def __call__(self, records: int, now_ns: int) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now_ns / 1e9))
        if self.bar is not None:
            self.bar.update(records - self.done)
            self.bar.set_postfix_str(f"capture time {stamp} UTC", refresh=False)
        elif not self.quiet:
            mono = time.monotonic()
            if mono - self.last >= PLAIN_PROGRESS_S:
                self.last = mono
                rate = records / (mono - self.start)
                print(f"backtest: {records:,} messages, capture time {stamp} UTC, {rate:,.0f} msg/s",
                      file=sys.stderr, flush=True)
        self.done = records

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: qfconfig.Config, specs, db_path: str | None, seed: int, progress=None) -> tuple[dict, list]:
    """Run the backtest of `specs` and write `db_path` (None: no database); returns (summary, unrepaired gaps).
    Raises BadInput for a capture that breaks or a symbol without a book."""
    from services.backtest.engine import Backtest
    from services.marketdata.feeds import ReplayFeed
    from services.marketdata.router import BookRouter
    from shared import journal

    symbols = tuple(cfg.md.symbols)
    pending: list = []

    def sink(statements: list) -> None:
        pending.extend(statements)
        if db_path is not None and len(pending) >= 5_000:
            journal.write(pending)
            pending.clear()

    router = BookRouter(symbols, cfg.md.book_depth)
    feed = ReplayFeed(specs, symbols, 0, stamp="recorded")
    router.where = feed.where  # a bad message is named by the file and line it was read from
    try:
        bt = Backtest(cfg, symbols, seed, sink, router)
    except ConfigError as exc:  # a setting only a service can judge (risk's limits, a symbol's assets)
        raise BadInput(qfconfig.mask_secrets(str(exc))) from None
    started = time.perf_counter()
    bt.run(feed.records(), progress, PROGRESS_EVERY)
    seconds = time.perf_counter() - started
    for capture in feed.captures:
        if capture.failed:
            raise BadInput(capture.error or f"{'+'.join(capture.spec.paths)}: unreadable")
    if db_path is not None:
        if pending:
            journal.write(pending)
        bt.outbox.flush(bt.engine, bt.clock.now)
    never = [s for s in symbols if router.last_uid.get(s, 0) == 0]
    if never:
        files = ", ".join(p for spec in specs for p in spec.paths)
        raise BadInput(f"{files}: no book for {', '.join(never)} (no snapshot or no depth events of it in the "
                       f"capture)")
    summary = bt.summary(seconds)
    summary["time_backwards"], summary["time_backwards_first"] = feed.backwards, feed.first_backwards
    return summary, bt.unrepaired()


def damage(summary: dict) -> list[str]:
    """One line for each way the capture was not clean (bad messages, receive times going back):
    the run's figures are not those of the capture as recorded. Empty for a clean capture."""
    out = []
    n = summary.get("bad_events", 0)
    if n:
        listed = summary["bad_event_list"]
        lost = [b for b in listed if b["book_lost"]]
        text = f"{n:,} bad message{'s' * (n != 1)} in the capture (first: {_bad_line(listed[0])})" if listed \
            else f"{n:,} bad messages in the capture"
        if lost:
            text += "; " + "; ".join(
                f"{b['symbol']} had no book for {b['skipped_messages']:,} messages ({b['skipped_s']:,.1f} s) after "
                f"{b['where'] or 'it'}, " + (f"resynced at update id {b['repaired_at_update_id']}" if b["repaired"]
                                             else "never resynced") for b in lost)
        out.append(text)
    back = summary.get("time_backwards", 0)
    if back:
        out.append(f"receive times go backwards {back:,} time{'s' * (back != 1)} "
                   f"(first: {summary['time_backwards_first']})")
    return out


def _bad_line(b: dict) -> str:
    return f"{b['where'] + ': ' if b['where'] else ''}{b['detail']}"


def render(summary: dict) -> str:
    """The summary for a person: one figure a line."""
    def fmt(v, suffix=""):
        return "n/a" if v is None else f"{v}{suffix}"
    first, last = summary.get("first_ts"), summary.get("last_ts")
    span = (last - first) / 1e9 if first and last else 0.0
    lines = [
        f"capture      {summary['events']:,} messages over {span:,.1f} s of recorded time "
        f"({summary['events_per_s'] or 0:,} msg/s here)",
        f"orders       {summary['orders']:,} sent by the strategy, {summary['denied']:,} denied by risk, "
        f"{summary['broker_orders']:,} reached the exchange, {summary['open_orders']} still open",
        f"fills        {summary['fills']:,} (maker share {fmt(_pct(summary['maker_share']))})",
        f"turnover     {summary['turnover']}",
        f"P&L          gross {summary['gross_pnl']}, fees {summary['fees']}, net {summary['net_pnl']} "
        f"(equity {summary['start_cash']} -> {summary['end_equity']})",
        f"drawdown     max {summary['max_drawdown']} ({fmt(_pct(float(summary['max_drawdown_frac'])))} of the peak)",
        f"Sharpe       {fmt(_num(summary['sharpe']))} ({summary['sharpe_period']})",
        f"win rate     {fmt(_pct(summary['win_rate']))} of {summary['round_trips']} round trips",
        f"slippage     {fmt(summary['slippage_decision'])} ({fmt(summary['slippage_decision_bps'], ' bps')}) vs "
        f"decision mid, {fmt(summary['slippage_arrival'])} ({fmt(summary['slippage_arrival_bps'], ' bps')}) vs "
        f"arrival mid (price units, + = cost, qty-weighted)",
        f"risk state   {summary['risk_state']}; positions {summary['positions'] or 'flat'}",
    ]
    if summary.get("strategy") == "ofi":
        st = summary["strategy_stats"]
        exits = ", ".join(f"{k[6:].replace('_', ' ')} {v}" for k, v in sorted(st.items())
                          if k.startswith("exits_") and v) or "none"
        rejected = ", ".join(f"{k} {v}" for k, v in summary["rejections"].items()) or "none"
        lines.append(f"strategy     ofi: entries {st.get('entries_limit', 0)} post-only, "
                     f"{st.get('entries_market', 0)} market; exits {exits}; {summary['cancels']} cancels; "
                     f"rejected {rejected}; {summary['signals']} signals stored")
    gaps = summary["gaps"]
    if not gaps:
        lines.append("gaps         none")
    for g in gaps:
        fate = (f"repaired by a snapshot (book again at update id {g['repaired_at_update_id']})" if g["repaired"]
                else "NEVER repaired: trading in it ended here")
        lines.append(f"gap          {g['symbol']}: after update id {g['after_update_id']} came "
                     f"{g['next_first_update_id']}; {fate}")
    n = summary.get("bad_events", 0)
    listed = summary.get("bad_event_list", [])
    lines.append(f"bad messages {n:,}" + (f", {summary['skipped_messages']:,} messages came while a bad one had "
                                          f"cost a book" if summary.get("skipped_messages") else "") if n
                 else "bad messages none")
    for b in listed[:10]:
        fate = ("" if not b["book_lost"] else
                f"; {b['symbol']} book lost: {b['skipped_messages']:,} messages ({b['skipped_s']:,.1f} s) skipped, "
                + (f"resynced at update id {b['repaired_at_update_id']}" if b["repaired"] else "NEVER resynced"))
        lines.append(f"bad message  {_bad_line(b)}{fate}")
    if n > len(listed[:10]):
        lines.append(f"bad message  … {n - len(listed[:10]):,} more" + (" (--json lists the first 100)"
                                                                         if n > 10 else ""))
    back = summary.get("time_backwards", 0)
    lines.append(f"time         receive times go backwards {back:,} time{'s' * (back != 1)} (first: "
                 f"{summary['time_backwards_first']})" if back else "time         receive times in order")
    return "\n".join(lines)


def _pct(x):
    """A share as a percentage: one decimal, more for a small non-zero share (0.044 %, not 0.0 %)."""
    if x is None:
        return None
    pct = x * 100
    return f"{pct:.1f} %" if pct == 0 or abs(pct) >= 1 else f"{pct:.2g} %"


def _num(x):
    return None if x is None else f"{x:.2f}"


def main(args: argparse.Namespace) -> int:
    import logging
    if not args.verbose:  # a capture's thousand ignored streams are not news in a backtest
        logging.getLogger("qf").setLevel(logging.ERROR)
    if args.sweep:
        from services.backtest.sweep import main as sweep_main
        return sweep_main(args)
    progress = None
    args.db = DEFAULT_DB if args.db is None else args.db
    try:
        if args.jobs is not None or args.sweep_dir is not None or args.sweep_csv is not None:
            raise BadInput("--jobs, --sweep-dir and --sweep-csv go with --sweep KEY=V1,V2,…")
        cfg = load_config(args)
        specs = check_captures(args.capture)
        open_db(args.db, args.overwrite)
        progress = Progress()
        summary, unrepaired = run(cfg, specs, args.db, cfg.broker.seed, progress)
    except BadInput as exc:
        if progress is not None:
            progress.close()
        return report("backtest", exc)
    finally:
        from shared.db import close_db
        close_db()
    progress.close()
    summary["db"] = args.db
    print(json.dumps(summary) if args.json else render(summary) + f"\ndatabase     {args.db}")
    problems = damage(summary)
    for text in problems:
        print(f"qf backtest: {text}", file=sys.stderr)
    if unrepaired:
        print(f"qf backtest: {len(unrepaired)} gap(s) never repaired: "
              + "; ".join(f"{g.symbol} after update id {g.after}" for g in unrepaired), file=sys.stderr)
    return EXIT_UNREPAIRED_GAP if unrepaired or problems else 0

