"""Configuration from `QF_*` environment variables; every default lives here."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping

from shared.errors import ConfigError

PREFIX = "QF_"


# -- parsers: str -> value, raising ValueError with a human sentence ---------------

def _str(raw: str) -> str:
    return raw


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not lo <= value <= hi:  # also rejects nan
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return parse


def _decimal(lo: Decimal, hi: Decimal) -> Callable[[str], Decimal]:
    def parse(raw: str) -> Decimal:
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
        if not value.is_finite() or not lo <= value <= hi:
            raise ValueError(f"must be a decimal between {lo} and {hi}")
        return value
    return parse


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true/false")


def _symbols(raw: str) -> tuple[str, ...]:
    syms = tuple(s.strip().upper() for s in raw.split(",") if s.strip())
    if not syms:
        raise ValueError("needs at least one symbol, e.g. btcusdt")
    for s in syms:
        if not s.isalnum():
            raise ValueError(f"{s!r} is not a symbol like btcusdt")
    return syms


def _endpoint(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ endpoint: tcp://host:port, ipc://path or inproc://name")
    return value


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().rstrip("/")
        if not value.startswith(tuple(s + "://" for s in schemes)):
            raise ValueError(f"must be a {'/'.join(schemes)} URL")
        return value
    return parse


def _level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


@dataclass(frozen=True, slots=True)
class Feed:
    """Where market data comes from: live Binance, or a recorded capture file."""
    kind: str  # "live" | "replay"
    path: str = ""

    def __str__(self) -> str:
        return "live" if self.kind == "live" else f"replay:{self.path}"


def parse_feed(raw: str) -> Feed:
    """`live` or `replay:<capture path>`; the capture must exist. Raises ValueError."""
    value = raw.strip()
    if value == "live":
        return Feed("live")
    if value.startswith("replay:") and value[7:]:
        path = value[7:]
        if not Path(path).is_file():
            raise ValueError(f"capture file {path!r} does not exist")
        return Feed("replay", str(Path(path).resolve()))
    raise ValueError("must be 'live' or 'replay:<capture.jsonl.gz>'")


def setting(env: str, default: str, parse: Callable[[str], Any], help: str, secret: bool = False):
    """A config field: its variable, its default (as the text a user would write) and parser."""
    return field(metadata={"env": env, "default": default, "parse": parse, "help": help, "secret": secret})


# -- sections --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusConfig:
    md_pub: str = setting("QF_MD_PUB", "tcp://127.0.0.1:5555", _endpoint, "marketdata PUB (book.*, trade.*)")
    risk_rep: str = setting("QF_RISK_REP", "tcp://127.0.0.1:5556", _endpoint, "risk ROUTER for orders and control")
    broker_rep: str = setting("QF_BROKER_REP", "tcp://127.0.0.1:5557", _endpoint, "broker ROUTER, reached by risk only")
    broker_pub: str = setting("QF_BROKER_PUB", "tcp://127.0.0.1:5558", _endpoint, "broker PUB (fill.*, order.*)")
    risk_pub: str = setting("QF_RISK_PUB", "tcp://127.0.0.1:5559", _endpoint, "risk PUB (risk.state)")
    hwm: int = setting("QF_ZMQ_HWM", "100000", _int(1000, 10_000_000),
                       "PUB/SUB high-water mark (the ZeroMQ default of 1000 drops bursts)")
    heartbeat_ms: int = setting("QF_HEARTBEAT_MS", "1000", _int(50, 60_000), "heartbeat period of every service")


@dataclass(frozen=True, slots=True)
class CommonConfig:
    db: str = setting("QF_DB", "./data/quantumflow.db", _str, "SQLite file (or a peewee database URL)")
    log_level: str = setting("QF_LOG_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING or ERROR")
    run_dir: str = setting("QF_RUN_DIR", "/tmp/quantumflow", _str, "where services touch their liveness files")


@dataclass(frozen=True, slots=True)
class MarketDataConfig:
    symbols: tuple = setting("QF_SYMBOLS", "btcusdt", _symbols, "comma-separated Binance symbols")
    feed: Feed = setting("QF_FEED", "live", parse_feed, "'live' or 'replay:<capture.jsonl.gz>'")
    replay_speed: float = setting("QF_REPLAY_SPEED", "1", _float(0.0, 1e6),
                                  "replay speed, 1 = as recorded, 0 = as fast as possible")
    replay_loop: bool = setting("QF_REPLAY_LOOP", "false", _bool, "start the capture again when it ends")
    binance_ws: str = setting("QF_BINANCE_WS", "wss://stream.binance.com:9443", _url("ws", "wss"),
                              "Binance WebSocket base")
    binance_rest: str = setting("QF_BINANCE_REST", "https://api.binance.com", _url("http", "https"),
                                "Binance REST base (depth snapshots)")
    book_depth: int = setting("QF_BOOK_DEPTH", "10", _int(1, 100), "levels per side published in book.*")
    snapshot_limit: int = setting("QF_SNAPSHOT_LIMIT", "1000", _int(5, 5000), "REST depth snapshot limit")
    watchdog_s: float = setting("QF_MD_WATCHDOG_S", "10", _float(0.5, 600), "reconnect after this much silence")
    backoff_max_s: float = setting("QF_MD_BACKOFF_MAX_S", "30", _float(0.1, 3600), "reconnect backoff cap")


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    name: str = setting("QF_STRATEGY_NAME", "imbalance", _str, "strategy id on orders")
    imbalance: float = setting("QF_STRATEGY_IMBALANCE", "0.6", _float(0.0, 1.0),
                               "top-of-book imbalance that triggers an entry (|x| ≥ this)")
    qty: Decimal = setting("QF_STRATEGY_QTY", "0.001", _decimal(Decimal("1e-8"), Decimal("1e6")),
                           "base quantity per order")
    cooldown_ms: int = setting("QF_STRATEGY_COOLDOWN_MS", "250", _int(0, 3_600_000), "minimum time between orders")
    timeout_ms: int = setting("QF_STRATEGY_TIMEOUT_MS", "1000", _int(10, 60_000), "wait for risk's answer")
    retries: int = setting("QF_STRATEGY_RETRIES", "3", _int(1, 20), "attempts per order (same client_order_id)")


@dataclass(frozen=True, slots=True)
class RiskConfig:
    max_position: Decimal = setting("QF_RISK_MAX_POSITION", "0.01", _decimal(Decimal(0), Decimal("1e9")),
                                    "max absolute base position per symbol")
    broker_timeout_ms: int = setting("QF_RISK_BROKER_TIMEOUT_MS", "500", _int(10, 60_000),
                                     "broker silence → REJECTED BROKER_UNAVAILABLE")
    stale_book_ms: int = setting("QF_RISK_STALE_BOOK_MS", "5000", _int(10, 3_600_000),
                                 "no book for this long → REJECTED STALE_BOOK")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    taker_fee: Decimal = setting("QF_BROKER_TAKER_FEE", "0.001", _decimal(Decimal(0), Decimal("0.1")), "taker fee rate")
    maker_fee: Decimal = setting("QF_BROKER_MAKER_FEE", "0.001", _decimal(Decimal(0), Decimal("0.1")), "maker fee rate")
    start_cash: Decimal = setting("QF_START_CASH", "10000", _decimal(Decimal(0), Decimal("1e12")),
                                  "paper cash in the quote asset")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    bind: str = setting("QF_API_BIND", "127.0.0.1:8000", _str, "host:port gunicorn listens on")
    workers: int = setting("QF_API_WORKERS", "2", _int(1, 64), "gunicorn workers")
    token: str = setting("QF_API_TOKEN", "", _str, "bearer token for control endpoints (empty: disabled)",
                         secret=True)


SECTIONS = {"bus": BusConfig, "common": CommonConfig, "md": MarketDataConfig,
            "strategy": StrategyConfig, "risk": RiskConfig, "broker": BrokerConfig, "api": ApiConfig}


@dataclass(frozen=True, slots=True)
class Config:
    bus: BusConfig
    common: CommonConfig
    md: MarketDataConfig
    strategy: StrategyConfig
    risk: RiskConfig
    broker: BrokerConfig
    api: ApiConfig

    def effective(self) -> dict[str, str]:
        """Every setting as `QF_NAME -> text`, secrets masked; for the start-up log."""
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                value = getattr(section, f.name)
                if isinstance(value, tuple):
                    value = ",".join(value).lower()
                text = str(value)
                out[f.metadata["env"]] = "***" if f.metadata["secret"] and text else text
        return out


def all_settings() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting, in declaration order."""
    return [(f.metadata["env"], f.metadata["default"], f.metadata["help"])
            for cls in SECTIONS.values() for f in fields(cls)]


def load(environ: Mapping[str, str] | None = None) -> Config:
    """Build the config from `environ` (default `os.environ`).

    Raises ConfigError naming every unknown `QF_` variable (with the closest
    known name) and every bad value."""
    env = os.environ if environ is None else environ
    known = {name for name, _, _ in all_settings()}
    problems = []
    for key in sorted(k for k in env if k.startswith(PREFIX) and k not in known):
        hint = difflib.get_close_matches(key, known, n=1)
        problems.append(f"unknown setting {key}" + (f" (did you mean {hint[0]}?)" if hint else ""))
    sections = {}
    for name, cls in SECTIONS.items():
        values = {}
        for f in fields(cls):
            var = f.metadata["env"]
            raw = env.get(var, f.metadata["default"])
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                problems.append(f"{var}={raw!r}: {exc}")
        if len(values) == len(fields(cls)):
            sections[name] = cls(**values)
    if problems:
        raise ConfigError("bad configuration: " + "; ".join(problems))
    return Config(**sections)
