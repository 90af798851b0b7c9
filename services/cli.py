"""The `qf` command: run the stack or one service, and tools around captures."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from shared import config as qfconfig
from shared import log as qflog
from shared.errors import ConfigError, FatalError

SERVICE_HELP = {
    "marketdata": "Binance feed (or a replayed capture) → order books → book.*/trade.* on PUB",
    "strategy": "books → imbalance signals → orders to risk",
    "risk": "pre-trade gate between strategy and broker; positions and P&L",
    "broker": "paper fills against the latest book; orders and fills to SQLite",
    "api": "REST API and /metrics under gunicorn",
    "notifier": "fills, halts, alerts, restarts and a daily report to Telegram (off without QF_TELEGRAM_TOKEN)",
}


def _load_config() -> qfconfig.Config:
    try:
        return qfconfig.load()
    except ConfigError as exc:
        print(qfconfig.mask_secrets(f"qf: {exc}"), file=sys.stderr)
        raise SystemExit(2) from None


def run_service(name: str) -> int:
    """Run one service in the foreground until SIGTERM/SIGINT."""
    cfg = _load_config()
    log = qflog.setup(name, cfg.common.log_level)
    log.info("config", extra=cfg.effective())
    from shared.runtime import EarlyStop

    if name == "api":
        from services.api.service import run_api
        run_api(cfg)
        return 0
    if name == "marketdata":
        from services.marketdata.service import MarketDataService as cls
    elif name == "strategy" and getattr(cfg.strategy, "kind", "imbalance") == "ofi":
        from services.strategy.live import OfiService as cls
    elif name == "strategy":
        from services.strategy.service import StrategyService as cls
    elif name == "risk":
        from services.risk.service import RiskService as cls
    elif name == "notifier":
        from services.notifier.service import NotifierService as cls
    else:
        from services.broker.service import BrokerService as cls
    stopper = EarlyStop()  # a SIGTERM during the start (risk's rebuild) ends it cleanly too
    try:
        service = cls(cfg)
    except ConfigError as exc:  # a setting only the service itself can judge, or a file it cannot use
        # (StorageError: a read-only or missing directory, not a database, a damaged journal)
        print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
        return 2
    except FatalError as exc:  # e.g. a database that refuses writes at start: one line, and `qf up` retries
        log.error("fatal", extra={"error": str(exc)})
        print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
        return 1
    stopper.attach(service)
    try:
        service.run()
    except ConfigError as exc:  # what a service opens once it runs (marketdata's, strategy's run dir)
        print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
        return 2
    except FatalError as exc:
        log.error("fatal", extra={"error": str(exc)})
        from shared.lockstep import LockstepError
        if isinstance(exc, LockstepError):  # a stuck lock-step replay: a restart would not rejoin it
            print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
            return 2
        return 1
    finally:
        # Stopped. Ctrl-C reaches every process of the terminal's group, then `qf up` sends each
        # a SIGTERM: one arriving while the interpreter shuts down (its handlers reset) would
        # end a clean stop with -15 instead of 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.supervisor import child_env, run_up

    overrides = {}
    if args.feed:
        overrides["QF_FEED"] = args.feed
    if args.speed is not None:
        overrides["QF_REPLAY_SPEED"] = str(args.speed)
    env = child_env(**overrides)
    try:
        cfg = qfconfig.load(env)
        if args.lockstep:
            from services.supervisor import lockstep_env
            if cfg.md.feed.kind != "replay":
                raise ConfigError("--lockstep replays a capture: it needs --feed replay:FILE "
                                  f"(the feed is {cfg.md.feed})")
            if args.speed is not None:
                raise ConfigError("--lockstep runs as fast as the services can: --speed has no meaning with it")
            env.update(lockstep_env(cfg, env))
            cfg = qfconfig.load(env)
            if _holds_orders(cfg.common.db):  # the broker would refuse it too, after the others started
                raise ConfigError(f"--lockstep needs a database of its own: {cfg.common.db} already holds orders "
                                  "(set QF_DB to a new file)")
    except ConfigError as exc:
        print(qfconfig.mask_secrets(f"qf up: {exc}"), file=sys.stderr)
        return 2
    if "://" not in cfg.common.db:
        from shared.storage import ensure_dir
        try:
            ensure_dir(os.path.dirname(os.path.abspath(cfg.common.db)))
        except ConfigError as exc:
            print(qfconfig.mask_secrets(f"qf up: {exc}"), file=sys.stderr)
            return 2
    return run_up(cfg, env)


def _holds_orders(db: str) -> bool:
    """Whether the SQLite file `db` exists and has a row in `orders` (a URL or an unreadable
    file: False, the broker judges it)."""
    import sqlite3
    if "://" in db or not os.path.isfile(db):
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as con:
            return con.execute("SELECT 1 FROM orders LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False


def cmd_health(args: argparse.Namespace) -> int:
    import urllib.request  # here, not at the top: health checks run every few seconds

    cfg = _load_config()
    if args.service == "api":
        host, _, port = cfg.api.bind.rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0", "*") else host
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health/live", timeout=3) as resp:
                ok = resp.status == 200
        except OSError as exc:
            print(f"api unhealthy: {exc}", file=sys.stderr)
            return 1
    else:
        from shared.runtime import identity, is_alive
        ok = is_alive(cfg.common.run_dir, identity(args.service, cfg.common.instance))
    print(f"{args.service}: {'healthy' if ok else 'unhealthy'}")
    return 0 if ok else 1


def cmd_book(args: argparse.Namespace) -> int:
    import orjson

    from services.marketdata.capture import CaptureError, build_book
    from services.marketdata.sync import Market

    try:
        book = build_book(args.capture, args.symbol.upper(), Market(args.market) if args.market else None,
                          args.depth)
    except (CaptureError, OSError) as exc:
        print(f"qf book: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(book).decode() + "\n")
    return 0


def _run_marketdata(overrides: dict[str, str], name: str, **service_args) -> int:
    """Run the marketdata service with QF_ overrides (for `qf record` / `qf replay`)."""
    try:
        cfg = qfconfig.load({**os.environ, **overrides})
    except ConfigError as exc:
        print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
        return 2
    log = qflog.setup("marketdata", cfg.common.log_level)
    log.info("config", extra=cfg.effective())
    from services.marketdata.service import MarketDataService
    from shared.runtime import EarlyStop

    stopper = EarlyStop()
    try:
        service = MarketDataService(cfg, **service_args)
    except ConfigError as exc:  # e.g. a recording directory that cannot be written
        print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
        return 2
    stopper.attach(service)
    try:
        service.run()
    except ConfigError as exc:
        print(qfconfig.mask_secrets(f"qf {name}: {exc}"), file=sys.stderr)
        return 2
    except (FatalError, OSError) as exc:
        log.error("fatal", extra={"error": str(exc)})
        return 1
    error = service.replay_error() if name == "replay" else ""
    if error:  # a capture that could not be read through is not a finished replay
        print(qfconfig.mask_secrets(f"qf {name}: capture unreadable: {error}"[:1000]), file=sys.stderr)
        return 1
    issues = service.replay_issues if name == "replay" else []
    for _, text in issues:  # a damaged capture's replay must not pass for a clean one
        print(qfconfig.mask_secrets(f"qf {name}: {text}"[:1000]), file=sys.stderr)
    if any(kind == "no_book" for kind, _ in issues):
        return 2  # as `qf backtest`: nothing of what was asked for is in the capture
    return 3 if issues else 0  # replayed to its end, but not as recorded clean (bad messages, time going back)


def cmd_record(args: argparse.Namespace) -> int:
    overrides = {"QF_SYMBOLS": args.symbols, "QF_FEED": "live", "QF_MD_RECORD": args.out}
    if args.rotate_s is not None:
        overrides["QF_MD_RECORD_ROTATE_S"] = str(args.rotate_s)
    if args.rotate_mb is not None:
        overrides["QF_MD_RECORD_ROTATE_MB"] = str(args.rotate_mb)
    return _run_marketdata(overrides, "record", publish=False)


def check_replay_captures(items: list[str]) -> str:
    """Why the --capture items of `qf replay` cannot be replayed (one line naming the file: missing,
    a directory, empty, not a capture, receive times going backwards), or "" when they can."""
    from services.marketdata.capture import CaptureError, check_capture
    from services.marketdata.feeds import parse_replay

    for item in items:
        try:
            specs = parse_replay(item)
        except ValueError as exc:
            return f"--capture {item}: {exc}"
        for spec in specs:
            for path in spec.paths:
                try:
                    check_capture(path)
                except CaptureError as exc:
                    return str(exc)
    return ""


def cmd_replay(args: argparse.Namespace) -> int:
    problem = check_replay_captures(args.capture)
    if problem:
        print(f"qf replay: {problem}", file=sys.stderr)
        return 2
    overrides = {"QF_FEED": "replay:" + ",".join(args.capture), "QF_REPLAY_SPEED": str(args.speed)}
    if args.loop:
        overrides["QF_REPLAY_LOOP"] = "true"
    if args.symbols:
        overrides["QF_SYMBOLS"] = args.symbols
    return _run_marketdata(overrides, "replay", exit_when_done=not args.loop)


def cmd_config(args: argparse.Namespace) -> int:  # noqa: ARG001 - uniform signature
    print("| variable | default | meaning |\n|---|---|---|")
    for env, default, help_ in qfconfig.all_settings():
        default = qfconfig.mask_secrets(default)
        print(f"| `{env}` | `{default}` | {help_} |" if default else f"| `{env}` | (empty) | {help_} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qf", description="QuantumFlow: a paper HFT pipeline for Binance. "
                                "Configuration comes from QF_* environment variables (`qf config` lists them).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="run every service as a supervised local process",
                        description="Start marketdata, strategy, risk, broker, api and notifier; restart any that dies; "
                                    "Ctrl-C or SIGTERM stops them all.")
    up.add_argument("--feed", help="'live' (default, from QF_FEED) or 'replay:<capture.jsonl.gz>'")
    up.add_argument("--speed", type=float, help="replay speed (1 = as recorded, 0 = as fast as possible)")
    up.add_argument("--lockstep", action="store_true",
                    help="with --feed replay:FILE: release each capture event only when every service has "
                         "finished with the previous one, on the capture's clock (the fills of `qf backtest`)")
    up.set_defaults(func=cmd_up)
    for name, text in SERVICE_HELP.items():
        sp = sub.add_parser(name, help=f"run the {name} service: {text}",
                            description=f"Run the {name} service in the foreground ({text}). "
                                        "This is the container entrypoint; configure it with QF_* variables.")
        sp.set_defaults(func=lambda a, n=name: run_service(n))
    h = sub.add_parser("health", help="exit 0 when a service is alive (container health checks)")
    h.add_argument("service", choices=sorted(SERVICE_HELP))
    h.set_defaults(func=cmd_health)
    b = sub.add_parser("book", help="rebuild a symbol's order book from a capture and print it as JSON")
    b.add_argument("--capture", required=True, help="capture file (.jsonl or .jsonl.gz)")
    b.add_argument("--symbol", required=True, help="symbol, e.g. btcusdt")
    b.add_argument("--depth", type=int, help="levels per side to print (default: all)")
    b.add_argument("--market", choices=["spot", "usdm"], help="default: detected from the events")
    b.set_defaults(func=cmd_book)
    r = sub.add_parser("record", help="record live Binance streams and snapshots to rotating capture files",
                       description="Connect to Binance like marketdata (QF_BINANCE_*), keep the books synced so "
                                   "every resync's snapshot is recorded, and write the capture format of "
                                   "docs/protocol.md to OUT-<UTC start>-<n>.jsonl.gz segments, flushed every 0.5 s. "
                                   "Publishes nothing, so it can run beside a stack. Ctrl-C stops it.")
    r.add_argument("--symbols", required=True, help="e.g. btcusdt,ethusdt (usdm:btcusdt for USD-M futures)")
    r.add_argument("--out", required=True, help="capture path, .jsonl.gz or .jsonl")
    r.add_argument("--rotate-s", type=float, help="new file after this many seconds (QF_MD_RECORD_ROTATE_S)")
    r.add_argument("--rotate-mb", type=float, help="new file after this many MB (QF_MD_RECORD_ROTATE_MB)")
    r.set_defaults(func=cmd_record)
    rp = sub.add_parser("replay", help="publish captures on QF_MD_PUB as if live",
                        description="Run marketdata on recorded captures: book.*/trade.*/status.* on QF_MD_PUB. "
                                    "Several --capture play side by side; a+b plays b after a. Exit status: 0 "
                                    "replayed clean; 1 a capture could not be read to its end; 2 no capture "
                                    "(missing, a directory, empty, receive times going backwards), a bad setting, "
                                    "or a symbol never had a book; 3 replayed to its end but with bad messages "
                                    "(each logged with FILE:LINE), receive times going back or a gap nothing "
                                    "repaired.")
    rp.add_argument("--capture", required=True, action="append",
                    help="[spot:|usdm:]FILE[+FILE...] (market detected when not given); repeatable")
    rp.add_argument("--speed", type=float, default=1.0, help="1 = as recorded (default), 0 = as fast as possible")
    rp.add_argument("--loop", action="store_true", help="start over at the end, until stopped")
    rp.add_argument("--symbols", help="symbols to publish (default QF_SYMBOLS), e.g. btcusdt,usdm:btcusdt")
    rp.set_defaults(func=cmd_replay)
    from services.backtest.cli import add_parser as add_backtest
    add_backtest(sub)
    from services.backtest.cli import add_parity_parser
    add_parity_parser(sub)
    from services.calendar.cli import add_parser as add_calendar
    add_calendar(sub)
    from services.report.cli import add_parser as add_report
    add_report(sub)
    from services.control.cli import add_parser as add_control
    add_control(sub)
    from services.notifier.commands import add_parser as add_telegram
    add_telegram(sub)
    from services.keys import add_parser as add_keys
    add_keys(sub)
    c = sub.add_parser("config", help="list every QF_* setting with its default")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qf trades | head -3`: the reader has what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit
        return 141  # as a shell reports a process SIGPIPE ended (128 + 13)


if __name__ == "__main__":
    sys.exit(main())
