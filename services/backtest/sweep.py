"""`qf backtest --sweep KEY=V1,V2,…`: every combination of the swept settings backtested over the
same capture in parallel processes, ranked by net P&L, printed and written as CSV.

Who calls what: `services/backtest/cli.py` hands `main(args)` a run with `--sweep`. The settings
are checked here before anything runs (each value by its own setting's parser, then every
combination's whole config, risk's limits included); each combination is one `cli.run` — the
single backtest, nothing else — in a worker process, over the base config (environment,
`--config`, the command's options) with that combination's values on top, with the same seed
for all (a sweep compares settings, not luck), each into its own database.

Processes: a `ProcessPoolExecutor` on the forkserver context (spawn where there is none, or where
TMPDIR is too long for its unix socket): the parent holds threads (the pool's manager, tqdm's
monitor), which a forked child would inherit mid-lock. Workers ignore SIGINT — Ctrl-C reaches the
whole process group, and only the parent decides: it sets the stop event (each worker's progress
callback, every `cli.PROGRESS_EVERY` records, raises on it), cancels what has not started, waits
`STOP_GRACE_S` for the workers to leave and terminates any that did not (as Python 3.14's
`terminate_workers()` does).

Exit status (besides cli's 2 for bad input): 0 every run done; 3 some runs ended at a gap in
update ids nothing repaired, or ran over a capture with bad messages or receive times going back
(cli.damage; and none failed otherwise); 4 some run failed (an exception in
the worker, bad input found only while running, a worker process lost); 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from decimal import Decimal

from shared import config as qfconfig
from shared.errors import ConfigError

MAX_RUNS = 1000  # combinations in one sweep: past this it is a search, not a sweep
EXIT_GAP, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 3, 4, 130
STOP_GRACE_S = 5.0  # after Ctrl-C: how long workers get to leave their run before they are terminated
PLAIN_PROGRESS_S = 5.0  # without a terminal: a progress line this often
DEFAULT_CSV = "sweep.csv"  # in the current directory

# (key in a row, table header): the figures of each run, after the rank, run number and swept values
FIGURES = (("round_trips", "trades"), ("fills", "fills"), ("net_pnl", "net P&L"), ("fees", "fees"),
           ("max_drawdown", "max DD"), ("max_drawdown_frac", "max DD %"), ("sharpe", "Sharpe"),
           ("win_rate", "win"), ("maker_share", "maker"), ("slippage_decision_bps", "slip dec bps"),
           ("slippage_arrival_bps", "slip arr bps"), ("orders", "orders"), ("denied", "denied"))


@dataclass(frozen=True, slots=True)
class Axis:
    """One swept setting: its `QF_` name and its values, as given, each accepted by its parser."""
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Task:
    """One run as a worker receives it: the whole environment to load, the captures, its database."""
    run: int
    env: dict
    specs: tuple
    db: str


@dataclass(slots=True)
class Outcome:
    """One run's result: `summary` (the single backtest's, None when it failed before the end) and
    `error` (None when it ran clean); `failure` is "gap" (an unrepaired gap: the figures stand, the
    run is ranked last) or "error"."""
    run: int
    settings: dict
    summary: dict | None = None
    error: str | None = None
    failure: str | None = None
    pid: int | None = None
    db: str | None = None


# -- the settings to sweep --------------------------------------------------------------------

def _settings() -> dict[str, tuple]:
    """`QF_NAME -> (parser, secret)` for every setting of shared/config.py."""
    return {f.metadata["env"]: (f.metadata["parse"], f.metadata["secret"])
            for cls in qfconfig.SECTIONS.values() for f in fields(cls)}


def parse_axes(items: list[str]) -> list[Axis]:
    """`["QF_STRATEGY_QTY=0.001,0.002", "strategy_imbalance=0.5,0.7"]` → Axis per item, names
    canonical (upper case, `QF_` added when missing). Raises BadInput (one line naming the key and
    the value at fault) for a malformed item, an unknown or secret setting, a key given twice, no
    values, a value its setting's parser refuses or given twice, more than MAX_RUNS combinations."""
    from services.backtest.cli import BadInput

    known = _settings()
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().upper()
        if not sep or not key:
            raise BadInput(f"--sweep {item!r}: expected KEY=V1,V2,… (a setting and its values)")
        name = key if key.startswith(qfconfig.PREFIX) else qfconfig.PREFIX + key
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            raise BadInput(f"--sweep {key}: unknown setting" + (f" (did you mean {hint[0]}?)" if hint else "")
                           + " — `qf config` lists them")
        parse, secret = known[name]
        if secret:
            raise BadInput(f"--sweep {name}: a secret setting, not swept")
        if any(a.name == name for a in axes):
            raise BadInput(f"--sweep {name} given twice: put all its values in one --sweep {name}=V1,V2,…")
        values = tuple(v.strip() for v in raw.split(","))
        if not raw.strip() or any(not v for v in values):
            raise BadInput(f"--sweep {name}: {'no values' if not raw.strip() else 'an empty value'} in "
                           f"{raw!r} (expected {name}=V1,V2,…)")
        seen: dict = {}  # parsed value -> the text it was given as: 0.5 and 0.50 are one run
        for v in values:
            try:
                parsed = parse(v)
            except ValueError as exc:
                raise BadInput(f"--sweep {name}={v}: {qfconfig.mask_secrets(str(exc))}") from None
            same = parsed if getattr(parsed, "__hash__", None) is not None else v
            if same in seen:
                first = seen[same]
                raise BadInput(f"--sweep {name}: {v} given twice" + (f" (as {first})" if first != v else ""))
            seen[same] = v
        axes.append(Axis(name, values))
    total = 1
    for a in axes:
        total *= len(a.values)
    if total > MAX_RUNS:
        sizes = " × ".join(str(len(a.values)) for a in axes)
        raise BadInput(f"--sweep: {total:,} combinations ({sizes}), more than {MAX_RUNS:,}: sweep fewer values")
    return axes


def combinations(axes: list[Axis]) -> list[dict[str, str]]:
    """The cartesian product, the first axis varying slowest: one `{QF_NAME: value}` per run."""
    return [dict(zip((a.name for a in axes), values)) for values in itertools.product(*(a.values for a in axes))]


def check_combinations(base: dict[str, str], combos: list[dict[str, str]]) -> None:
    """Every run's whole config loads and risk accepts its limits (a soft breaker above the hard one,
    limits for a symbol not traded), before any runs. Raises BadInput naming the run's values."""
    from services.backtest.cli import BadInput
    from services.risk import limits as risk_limits

    for n, combo in enumerate(combos, 1):
        try:
            risk_limits.from_config(qfconfig.load({**base, **combo}))
        except ConfigError as exc:
            raise BadInput(f"--sweep run {n} ({_label(combo)}): {qfconfig.mask_secrets(str(exc))}") from None


def _label(combo: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in combo.items())


# -- the worker -------------------------------------------------------------------------------

_stop = None  # the pool's stop event (set by the parent on Ctrl-C), in each worker


class Stopped(Exception):
    """The parent asked the workers to stop (Ctrl-C): raised from the run's progress callback."""


def _init_worker(stop, verbose: bool) -> None:
    global _stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    _stop = stop
    if not verbose:
        logging.getLogger("qf").setLevel(logging.ERROR)


def _check_stop(_records: int, _now_ns: int) -> None:
    if _stop is not None and _stop.is_set():
        raise Stopped


def run_one(task: Task) -> dict:
    """One run, in a worker: `cli.run` into `task.db`. Returns {"summary", "gaps" (unrepaired, as
    text), "error", "pid"}; never raises for a run that fails (its error is the answer)."""
    from services.backtest import cli
    from shared.db import close_db

    out = {"summary": None, "gaps": [], "damage": [], "error": None, "pid": os.getpid()}
    try:
        cfg = qfconfig.load(task.env)
        cli.open_db(task.db, overwrite=True)
        summary, unrepaired = cli.run(cfg, task.specs, task.db, cfg.broker.seed, _check_stop)
        out["summary"] = summary
        out["gaps"] = [f"{g.symbol} after update id {g.after}" for g in unrepaired]
        out["damage"] = cli.damage(summary)  # bad messages, receive times going back
    except Stopped:
        out["error"] = "stopped"
    except cli.BadInput as exc:
        out["error"] = str(exc)
    except Exception as exc:  # the run's failure is its row; the sweep goes on
        where = traceback.extract_tb(exc.__traceback__)[-1]
        out["error"] = f"{type(exc).__name__}: {exc} ({os.path.basename(where.filename)}:{where.lineno})"
        if logging.getLogger("qf").isEnabledFor(logging.WARNING):  # --verbose: the whole story
            traceback.print_exc(file=sys.stderr)
    finally:
        close_db()
    return out


# -- the pool ---------------------------------------------------------------------------------

def cpu_count() -> int:
    """Cores this process may run on."""
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if counter is not None:
        return counter() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# The forkserver listens on a unix socket under the temporary directory (pymp-*/listener-*, ~40
# bytes more); a socket path is at most 107 bytes on Linux, so a long TMPDIR cannot have one
UNIX_PATH_MAX, FORKSERVER_SUFFIX = 107, 40


def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods and len(os.fsencode(tempfile.gettempdir())) + FORKSERVER_SUFFIX <= UNIX_PATH_MAX:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "services.backtest.cli", "services.backtest.engine"])
        return ctx
    return multiprocessing.get_context("spawn")


class SweepProgress:
    """Completed runs: a tqdm bar on a terminal (stderr), a plain line every PLAIN_PROGRESS_S
    otherwise, nothing when quiet (--json)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.done, self.failed = total, quiet, 0, 0
        self.bar = None
        self.last = time.monotonic()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=" run", desc="sweep", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, outcome: Outcome) -> None:
        self.done += 1
        self.failed += outcome.error is not None
        if self.bar is not None:
            self.bar.update(1)
            if outcome.summary is not None:
                self.bar.set_postfix_str(f"run {outcome.run}: net {outcome.summary['net_pnl']}", refresh=False)
        elif not self.quiet:
            mono = time.monotonic()
            if mono - self.last >= PLAIN_PROGRESS_S or self.done == self.total:
                self.last = mono
                failed = f", {self.failed} failed" if self.failed else ""
                print(f"sweep: {self.done}/{self.total} runs done{failed}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_all(tasks: list[Task], combos: list[dict], jobs: int, verbose: bool, progress) -> list[Outcome]:
    """Every task on `jobs` worker processes; returns the outcomes in run order. KeyboardInterrupt
    (Ctrl-C) stops the pool — no run continues, no process is left — and propagates."""
    ctx = _context()
    stop = ctx.Event()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(stop, verbose))
    outcomes: dict[int, Outcome] = {}
    try:
        # Ctrl-C held while the workers are born: a spawned one (no forkserver) would otherwise
        # take it while still importing, before _init_worker ignores it, and print a traceback.
        # They inherit the held signal; the parent gets its own at the end of the block.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pending = {pool.submit(run_one, task): task for task in tasks}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                outcome = Outcome(task.run, combos[task.run - 1], db=task.db)
                try:
                    answer = fut.result()
                except Exception as exc:  # the worker process itself was lost (BrokenProcessPool)
                    outcome.error, outcome.failure = f"{type(exc).__name__}: {exc}", "error"
                else:
                    outcome.summary, outcome.pid = answer["summary"], answer["pid"]
                    if answer["error"] is not None:
                        outcome.error, outcome.failure = answer["error"], "error"
                    elif answer["gaps"] or answer.get("damage"):
                        outcome.error = "; ".join(
                            (["gap never repaired: " + "; ".join(answer["gaps"])] if answer["gaps"] else [])
                            + answer.get("damage", []))
                        outcome.failure = "gap"
                outcomes[task.run] = outcome
                progress(outcome)
    except BaseException:
        _stop_pool(pool, stop)
        raise
    pool.shutdown(wait=True)
    return [outcomes[t.run] for t in tasks]


def _stop_pool(pool: ProcessPoolExecutor, stop) -> None:
    """Ctrl-C: nothing new starts, the running runs stop at their next progress call, and a worker
    that has not left after STOP_GRACE_S is terminated. A second Ctrl-C meanwhile is ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop.set()
        # the processes before shutdown() forgets them (what 3.14's terminate_workers() reads too)
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_GRACE_S)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        pool.shutdown(wait=True)
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the results ------------------------------------------------------------------------------

def rank(outcomes: list[Outcome]) -> list[Outcome]:
    """Clean runs by net P&L, best first (ties: run order), then the failed ones in run order."""
    clean = sorted((o for o in outcomes if o.error is None), key=lambda o: (-Decimal(o.summary["net_pnl"]), o.run))
    return clean + sorted((o for o in outcomes if o.error is not None), key=lambda o: o.run)


def rows(ranked: list[Outcome], keep_db: bool) -> list[dict]:
    """One JSON-ready row per run, ranked: rank, run, settings, the FIGURES (None where the run has
    none), error; worker_pid, db (when kept) and the run's whole summary."""
    out = []
    for n, o in enumerate(ranked, 1):
        s = o.summary or {}
        row = {"rank": n, "run": o.run, "settings": dict(o.settings)}
        row.update({key: s.get(key) for key, _ in FIGURES})
        row.update(error=o.error, worker_pid=o.pid, db=o.db if keep_db else None, summary=o.summary)
        out.append(row)
    return out


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key in ("win_rate", "maker_share"):
        return f"{value * 100:.1f} %"
    if key == "max_drawdown_frac":
        return f"{float(value) * 100:.3f} %"
    if key == "sharpe":
        return f"{value:.2f}"
    return str(value)


def render_table(table: list[dict], axes: list[Axis]) -> str:
    """The ranked rows for a person: one line per run, columns aligned, an error column when a run
    failed (money exact, as in the summary)."""
    names = [a.name for a in axes]
    headers = ["rank", "run", *(n.removeprefix(qfconfig.PREFIX) for n in names), *(h for _, h in FIGURES)]
    lines = [[str(r["rank"]), str(r["run"]), *(r["settings"][n] for n in names),
              *(_cell(k, r[k]) for k, _ in FIGURES)] for r in table]
    if any(r["error"] for r in table):
        headers.append("error")
        for line, r in zip(lines, table):
            line.append(r["error"] or "")
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    last = len(headers) - 1 if headers[-1] == "error" else None

    def fmt(cells: list[str]) -> str:
        return "  ".join(c if i == last else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()
    return "\n".join([fmt(headers)] + [fmt(line) for line in lines])


def csv_columns(axes: list[Axis], keep_db: bool) -> list[str]:
    return ["rank", "run", *(a.name for a in axes), *(k for k, _ in FIGURES), "error", *(["db"] if keep_db else [])]


def write_csv(path: str, table: list[dict], axes: list[Axis], keep_db: bool) -> None:
    """The ranked rows as CSV: a header of csv_columns, the swept settings under their QF_ names,
    money as exact decimal text, ratios as Python floats, empty where undefined. Raises OSError."""
    cols = csv_columns(axes, keep_db)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for r in table:
            flat = {**r, **r["settings"]}
            writer.writerow(["" if flat.get(c) is None else flat[c] for c in cols])


# -- the command ------------------------------------------------------------------------------

def _check_outputs(args: argparse.Namespace, runs: int) -> tuple[str, str | None]:
    """(the CSV path, the kept databases' directory or None), both usable before anything runs."""
    from services.backtest.cli import BadInput

    given = args.sweep_csv or DEFAULT_CSV
    path = os.path.abspath(given)
    if os.path.isdir(path):
        raise BadInput(f"--sweep-csv {given}: a directory")
    if os.path.exists(path) and not args.overwrite:
        raise BadInput(f"{given} exists: remove it, pass --overwrite, or choose another --sweep-csv")
    if not os.access(os.path.dirname(path), os.W_OK):
        raise BadInput(f"--sweep-csv {given}: cannot write in {os.path.dirname(path)}")
    if args.sweep_dir is None:
        return path, None
    keep = os.path.abspath(args.sweep_dir)
    try:
        os.makedirs(keep, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--sweep-dir {args.sweep_dir}: {exc.strerror or exc}") from None
    there = [f"run-{n}.db" for n in range(1, runs + 1) if os.path.exists(os.path.join(keep, f"run-{n}.db"))]
    if there and not args.overwrite:
        raise BadInput(f"{args.sweep_dir} holds {', '.join(there[:3])}{' …' if len(there) > 3 else ''}: pass "
                       f"--overwrite, or choose another --sweep-dir")
    if not os.access(keep, os.W_OK):
        raise BadInput(f"--sweep-dir {args.sweep_dir}: not writable")
    return path, keep


def main(args: argparse.Namespace) -> int:
    """`qf backtest --capture … --sweep KEY=V1,V2,… [--sweep …]`: see the module's docstring."""
    from services.backtest import cli
    from services.marketdata.feeds import CaptureSpec

    try:
        if args.db is not None:
            raise cli.BadInput("--db names one run's database; a sweep writes one per run (--sweep-dir DIR keeps "
                               "them as DIR/run-N.db)")
        if args.jobs is not None and args.jobs < 1:
            raise cli.BadInput(f"--jobs {args.jobs}: at least 1")
        base = {k: v for k, v in cli.config_env(args).items() if k.startswith(qfconfig.PREFIX)}
        cli.load_config(args)  # the base config alone, for its own message
        axes = parse_axes(args.sweep)
        combos = combinations(axes)
        check_combinations(base, combos)
        specs = tuple(CaptureSpec(tuple(os.path.abspath(p) for p in s.paths), s.market)
                      for s in cli.check_captures(args.capture))
        csv_path, keep = _check_outputs(args, len(combos))
    except cli.BadInput as exc:
        return cli.report("backtest", exc)
    jobs = min(args.jobs or cpu_count(), len(combos))
    where = keep or tempfile.mkdtemp(prefix="qf-sweep-")
    tasks = [Task(n, {**base, **combo}, specs, os.path.join(where, f"run-{n}.db")) for n, combo in enumerate(combos, 1)]
    if not args.json:
        print(f"sweep: {len(tasks)} runs on {jobs} process{'es' if jobs > 1 else ''}"
              + (f", databases in {keep}" if keep else ""), file=sys.stderr, flush=True)
    progress = SweepProgress(len(tasks), quiet=args.json)
    try:
        outcomes = run_all(tasks, combos, jobs, args.verbose, progress)
    except KeyboardInterrupt:
        progress.close()
        print(f"qf backtest: sweep stopped (Ctrl-C) after {progress.done} of {len(tasks)} runs; no table written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
        if keep is None:
            shutil.rmtree(where, ignore_errors=True)
    table = rows(rank(outcomes), keep is not None)
    if args.json:
        print(json.dumps(table))
    else:
        print(render_table(table, axes))
    try:
        write_csv(csv_path, table, axes, keep is not None)
    except OSError as exc:
        print(f"qf backtest: cannot write {csv_path}: {exc.strerror or exc}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    print(f"csv          {csv_path}", file=sys.stderr if args.json else sys.stdout)
    failed = [o for o in outcomes if o.failure == "error"]
    gaps = [o for o in outcomes if o.failure == "gap"]
    if failed or gaps:
        print(f"qf backtest: {len(failed) + len(gaps)} of {len(outcomes)} runs failed: "
              + "; ".join(f"run {o.run} ({_label(o.settings)}): {o.error}" for o in failed + gaps), file=sys.stderr)
    return EXIT_RUN_FAILED if failed else EXIT_GAP if gaps else 0
