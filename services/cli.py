"""The `qf` command: run the stack or one service, and tools around captures."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.request

from shared import config as qfconfig
from shared import log as qflog
from shared.errors import ConfigError, FatalError

SERVICE_HELP = {
    "marketdata": "Binance feed (or a replayed capture) → order books → book.*/trade.* on PUB",
    "strategy": "books → imbalance signals → orders to risk",
    "risk": "pre-trade gate between strategy and broker; positions and P&L",
    "broker": "paper fills against the latest book; orders and fills to SQLite",
    "api": "REST API and /metrics under gunicorn",
}


def _load_config() -> qfconfig.Config:
    try:
        return qfconfig.load()
    except ConfigError as exc:
        print(f"qf: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_service(name: str) -> int:
    """Run one service in the foreground until SIGTERM/SIGINT."""
    cfg = _load_config()
    log = qflog.setup(name, cfg.common.log_level)
    log.info("config", extra=cfg.effective())
    from shared.runtime import on_stop_signals

    if name == "api":
        from services.api.service import run_api
        run_api(cfg)
        return 0
    if name == "marketdata":
        from services.marketdata.service import MarketDataService as cls
    elif name == "strategy":
        from services.strategy.service import StrategyService as cls
    elif name == "risk":
        from services.risk.service import RiskService as cls
    else:
        from services.broker.service import BrokerService as cls
    service = cls(cfg)
    on_stop_signals(service.stop)
    try:
        service.run()
    except FatalError as exc:
        log.error("fatal", extra={"error": str(exc)})
        return 1
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
    except ConfigError as exc:
        print(f"qf up: {exc}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(cfg.common.db)), exist_ok=True) if "://" not in cfg.common.db else None
    return run_up(cfg, env)


def cmd_health(args: argparse.Namespace) -> int:
    cfg = _load_config()
    if args.service == "api":
        host, _, port = cfg.api.bind.rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0", "*") else host
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=3) as resp:
                ok = resp.status == 200
        except OSError as exc:
            print(f"api unhealthy: {exc}", file=sys.stderr)
            return 1
    else:
        from shared.runtime import is_alive
        ok = is_alive(cfg.common.run_dir, args.service)
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


def cmd_config(args: argparse.Namespace) -> int:  # noqa: ARG001 - uniform signature
    print("| variable | default | meaning |\n|---|---|---|")
    for env, default, help_ in qfconfig.all_settings():
        print(f"| `{env}` | `{default}` | {help_} |" if default else f"| `{env}` | (empty) | {help_} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qf", description="QuantumFlow: a paper HFT pipeline for Binance. "
                                "Configuration comes from QF_* environment variables (`qf config` lists them).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="run every service as a supervised local process",
                        description="Start marketdata, strategy, risk, broker and api; restart any that dies; "
                                    "Ctrl-C or SIGTERM stops them all.")
    up.add_argument("--feed", help="'live' (default, from QF_FEED) or 'replay:<capture.jsonl.gz>'")
    up.add_argument("--speed", type=float, help="replay speed (1 = as recorded, 0 = as fast as possible)")
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
    c = sub.add_parser("config", help="list every QF_* setting with its default")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
