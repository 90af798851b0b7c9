"""Configuration from `QF_*` environment variables; every default lives here."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping

from shared.errors import ConfigError

PREFIX = "QF_"


# -- masking: credentials never leave a process as text ------------------------------

# `scheme://user:password@host…`: the password is everything after the user's `:` up to the
# token's LAST `@` (a password may hold a raw `@`, `/` or `:`); a URL ends at whitespace.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):\S*@")
# `?password=…`, `&api_key=…`, `;token=…`: a parameter whose name ends in a secret word.
_SECRET_PARAM = re.compile(r"(?P<head>[?&;][A-Za-z0-9_.\-]*?(?:password|passwd|pwd|token|secret|key|signature)=)"
                           r"[^&;#\s\"]*", re.IGNORECASE)
MASK = "***"


def mask_secrets(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`: the userinfo
    password (`postgresql://qf:***@db/qf`) and the value of query parameters named
    password/token/secret/key (also `api_key`, `access_token`…). Takes a setting's value,
    a log line or an error message; returns it unchanged when it holds no credentials.
    Errs on the side of masking: a token with several `@` loses everything up to the last."""
    if "://" in text:
        text = _USERINFO.sub(lambda m: m["head"] + ":" + MASK + "@", text)
    if "=" in text:
        text = _SECRET_PARAM.sub(lambda m: m["head"] + MASK, text)
    return text


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


def _optional_endpoint(raw: str) -> str:
    return _endpoint(raw) if raw.strip() else ""


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


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


def _market_symbols(raw: str) -> tuple[str, ...]:
    """`btcusdt,usdm:btcusdt` → ("BTCUSDT", "USDM:BTCUSDT"); `usdm:` selects USD-M futures."""
    keys: list[str] = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        market, sep, name = item.partition(":")
        market, name = (market.lower(), name) if sep else ("spot", market)
        if market not in ("spot", "usdm"):
            raise ValueError(f"{item!r}: a symbol's market prefix is spot: or usdm:")
        key = _symbols(name)[0] if market == "spot" else "USDM:" + _symbols(name)[0]
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ValueError("needs at least one symbol, e.g. btcusdt")
    return tuple(keys)


def _feeds(raw: str) -> Feed:
    """`live`, or `replay:` + captures played side by side (`,`), each
    `[spot:|usdm:]PATH[+PATH…]` (`+`: segments played one after another)."""
    value = raw.strip()
    if not value.startswith("replay:") or value == "replay:":
        return parse_feed(value)
    items = []
    for item in value[7:].split(","):
        market, sep, rest = item.partition(":")
        prefix = ""
        if sep and market in ("spot", "usdm"):
            prefix, item = market + ":", rest
        items.append(prefix + "+".join(parse_feed("replay:" + p).path for p in item.split("+")))
    return Feed("replay", ",".join(items))


def _bind(raw: str) -> str:
    value = raw.strip()
    host, sep, port = value.rpartition(":")
    if value and (not sep or not host or not port.isdigit() or int(port) > 65535):
        raise ValueError("must be empty (off) or host:port, e.g. 127.0.0.1:9101 (port 0: any free port)")
    return value


def _capture_out(raw: str) -> str:
    value = raw.strip()
    if value and not value.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError("must be empty (off) or a path ending in .jsonl.gz or .jsonl")
    return value


def _symbol_limits(raw: str) -> str:
    """`btcusdt max_position=0.02 lot_size=0.00001; usdm:ethusdt max_notional=500` →
    the same, canonical (upper-case symbols, keys checked, decimals normalised)."""
    keys = ("max_position", "max_notional", "max_order_notional", "min_notional", "lot_size", "tick_size")
    out = []
    for entry in (e.strip() for e in raw.split(";")):
        if not entry:
            continue
        name, *pairs = entry.split()
        market, sep, sym = name.partition(":")
        if (sep and market.lower() != "usdm") or not (sym if sep else market).isalnum():
            raise ValueError(f"{name!r} is not a symbol like btcusdt or usdm:btcusdt")
        parts = [name.upper()]
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if key not in keys or not eq:
                raise ValueError(f"{pair!r}: expected key=value with a key of {', '.join(keys)}")
            amount = _decimal(Decimal(0), Decimal("1e12"))(value)
            if key in ("lot_size", "tick_size") and not amount:
                raise ValueError(f"{pair!r}: a step must be positive")
            parts.append(f"{key}={amount:f}")
        out.append(" ".join(parts))
    return "; ".join(out)


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
    lockstep: str = setting("QF_LOCKSTEP", "", _optional_endpoint,
                            "lock-step replay (`qf up --lockstep` sets it): the conductor's PULL endpoint; "
                            "empty: off")


@dataclass(frozen=True, slots=True)
class CommonConfig:
    db: str = setting("QF_DB", "./data/quantumflow.db", _str, "SQLite file (or a peewee database URL)")
    log_level: str = setting("QF_LOG_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING or ERROR")
    run_dir: str = setting("QF_RUN_DIR", "/tmp/quantumflow", _str, "where services touch their liveness files")


@dataclass(frozen=True, slots=True)
class MarketDataConfig:
    symbols: tuple = setting("QF_SYMBOLS", "btcusdt", _market_symbols,
                             "comma-separated Binance symbols; usdm:btcusdt = USD-M futures, "
                             "published as USDM:BTCUSDT")
    feed: Feed = setting("QF_FEED", "live", _feeds,
                         "'live' or 'replay:<capture.jsonl.gz>'; replay:a.gz,usdm:b.gz plays captures side by "
                         "side, a.gz+b.gz one after the other")
    replay_speed: float = setting("QF_REPLAY_SPEED", "1", _float(0.0, 1e6),
                                  "replay speed, 1 = as recorded, 0 = as fast as possible")
    replay_loop: bool = setting("QF_REPLAY_LOOP", "false", _bool, "start the capture again when it ends")
    binance_ws: str = setting("QF_BINANCE_WS", "wss://stream.binance.com:9443", _url("ws", "wss"),
                              "Binance WebSocket base")
    binance_rest: str = setting("QF_BINANCE_REST", "https://api.binance.com", _url("http", "https"),
                                "Binance REST base (depth snapshots)")
    binance_usdm_ws: str = setting("QF_BINANCE_USDM_WS", "wss://fstream.binance.com", _url("ws", "wss"),
                                   "Binance USD-M futures WebSocket base (usdm: symbols)")
    binance_usdm_rest: str = setting("QF_BINANCE_USDM_REST", "https://fapi.binance.com", _url("http", "https"),
                                     "Binance USD-M futures REST base (/fapi/v1/depth snapshots)")
    book_depth: int = setting("QF_BOOK_DEPTH", "10", _int(1, 100), "levels per side published in book.*")
    snapshot_limit: int = setting("QF_SNAPSHOT_LIMIT", "1000", _int(5, 5000),
                                  "REST depth snapshot limit (USD-M: at most 1000)")
    watchdog_s: float = setting("QF_MD_WATCHDOG_S", "10", _float(0.5, 600), "reconnect after this much silence")
    backoff_max_s: float = setting("QF_MD_BACKOFF_MAX_S", "30", _float(0.1, 3600), "reconnect backoff cap")
    sync_timeout_s: float = setting("QF_MD_SYNC_TIMEOUT_S", "10", _float(0.5, 600),
                                    "a symbol whose frames keep coming but no book this long is stalled: its "
                                    "buffer is dropped and a new snapshot fetched; twice this long, reconnect "
                                    "(snapshot retries of a symbol back off up to half of it)")
    book_ticker: bool = setting("QF_MD_BOOK_TICKER", "false", _bool,
                                "also subscribe to bookTicker and check the book's best levels against it")
    rotate_s: float = setting("QF_MD_ROTATE_S", "82800", _float(1.0, 86_000),
                              "connection age at which a replacement is opened (Binance cuts at 24 h); "
                              "the old one closes once the new one is synced")
    metrics_bind: str = setting("QF_MD_METRICS_BIND", "", _bind,
                                "host:port of marketdata's own Prometheus /metrics (empty: off)")
    record: str = setting("QF_MD_RECORD", "", _capture_out,
                          "also record what marketdata receives to this capture path (empty: off)")
    record_rotate_s: float = setting("QF_MD_RECORD_ROTATE_S", "3600", _float(1.0, 7 * 86400),
                                     "start a new capture file after this many seconds")
    record_rotate_mb: float = setting("QF_MD_RECORD_ROTATE_MB", "256", _float(0.001, 1e6),
                                      "start a new capture file after this many MB (compressed)")


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

    max_notional: Decimal = setting("QF_RISK_MAX_NOTIONAL", "1000", _decimal(Decimal(0), Decimal("1e12")),
                                    "max absolute position per symbol in the quote asset (at the mid)")
    max_order_notional: Decimal = setting("QF_RISK_MAX_ORDER_NOTIONAL", "500",
                                          _decimal(Decimal(0), Decimal("1e12")), "max notional of one order")
    min_notional: Decimal = setting("QF_RISK_MIN_NOTIONAL", "5", _decimal(Decimal(0), Decimal("1e12")),
                                    "min notional of one order (Binance spot: 5)")
    lot_size: Decimal = setting("QF_RISK_LOT_SIZE", "0.00001", _decimal(Decimal("1e-8"), Decimal("1e6")),
                                "quantity step (Binance BTCUSDT: 0.00001)")
    tick_size: Decimal = setting("QF_RISK_TICK_SIZE", "0.01", _decimal(Decimal("1e-8"), Decimal("1e6")),
                                 "LIMIT price step (Binance BTCUSDT: 0.01)")
    symbol_limits: str = setting("QF_RISK_SYMBOL_LIMITS", "", _symbol_limits,
                                 "per-symbol overrides: 'ethusdt lot_size=0.0001 max_position=0.3; btcusdt …' "
                                 "(keys: max_position, max_notional, max_order_notional, min_notional, "
                                 "lot_size, tick_size)")
    max_open_orders: int = setting("QF_RISK_MAX_OPEN_ORDERS", "10", _int(0, 100_000),
                                   "max resting (GTC LIMIT) orders in total")
    price_band_bps: Decimal = setting("QF_RISK_PRICE_BAND_BPS", "100", _decimal(Decimal(0), Decimal("10000")),
                                      "a LIMIT price must be within this many bps of the mid (0: no band)")
    fill_band_bps: Decimal = setting("QF_RISK_FILL_BAND_BPS", "1000", _decimal(Decimal(0), Decimal("100000")),
                                     "a broker fill further than this many bps from risk's mid is not credible: "
                                     "REJECTED BROKER_ERROR, not booked (0: no band)")
    orders_per_s: int = setting("QF_RISK_ORDERS_PER_S", "10", _int(1, 1_000_000),
                                "orders per second per strategy (token bucket)")
    orders_per_min: int = setting("QF_RISK_ORDERS_PER_MIN", "300", _int(1, 60_000_000),
                                  "orders per minute per strategy (token bucket)")
    loss_streak: int = setting("QF_RISK_LOSS_STREAK", "0", _int(0, 1000),
                               "losing round trips that pause entries (0: off)")
    loss_window_min: float = setting("QF_RISK_LOSS_WINDOW_MIN", "30", _float(0.01, 1440),
                                     "… counted within this many minutes")
    loss_pause_min: float = setting("QF_RISK_LOSS_PAUSE_MIN", "15", _float(0.01, 1440),
                                    "… pause entries for this many minutes")
    daily_loss: Decimal = setting("QF_RISK_DAILY_LOSS", "0.02", _decimal(Decimal(0), Decimal(1)),
                                  "loss since the UTC day's start equity, as a fraction, that HALTs (0: off)")
    daily_loss_soft: Decimal = setting("QF_RISK_DAILY_LOSS_SOFT", "0.01", _decimal(Decimal(0), Decimal(1)),
                                       "… that switches to REDUCING (0: off)")
    max_drawdown: Decimal = setting("QF_RISK_MAX_DRAWDOWN", "0.05", _decimal(Decimal(0), Decimal(1)),
                                    "drawdown from peak equity, as a fraction, that HALTs (0: off)")
    drawdown_soft: Decimal = setting("QF_RISK_DRAWDOWN_SOFT", "0.03", _decimal(Decimal(0), Decimal(1)),
                                     "… that switches to REDUCING (0: off)")
    day_reset: bool = setting("QF_RISK_DAY_RESET", "false", _bool,
                              "a new UTC day lifts a state set by the daily-loss breaker")
    adjust: bool = setting("QF_RISK_ADJUST", "true", _bool,
                           "cut an order over a position limit to what fits (ADJUSTED) instead of rejecting it")
    # Orders follow books: the strategy answers the book risk has just read too, so an order
    # arriving within the window finds risk awake (after 2 ms asleep a check costs 2-3x, the
    # round trip ~200 µs more). Costs a core's CPU while it lasts: ~5 % at 10 books/s per symbol
    # for 2 symbols; 0 on a machine with one shared core (fly.toml).
    spin_us: int = setting("QF_RISK_SPIN_US", "2500", _int(0, 100_000),
                           "busy-poll (yielding to other threads) this long after each message before "
                           "sleeping: the next order finds a warm core; costs a core's CPU while it lasts "
                           "(0: sleep at once)")
    control_timeout_ms: int = setting("QF_RISK_CONTROL_TIMEOUT_MS", "3000", _int(10, 60_000),
                                      "how long the API waits for risk's answer to a control request")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    taker_fee: Decimal = setting("QF_BROKER_TAKER_FEE", "0.001", _decimal(Decimal(0), Decimal("0.1")), "taker fee rate")
    maker_fee: Decimal = setting("QF_BROKER_MAKER_FEE", "0.001", _decimal(Decimal(0), Decimal("0.1")), "maker fee rate")
    start_cash: Decimal = setting("QF_START_CASH", "10000", _decimal(Decimal(0), Decimal("1e12")),
                                  "paper cash in the quote asset")

    # Latencies are capped at 200 ms: entry plus feed lag must stay under risk's broker timeout.
    latency_mode: str = setting("QF_BROKER_LATENCY_MODE", "feed", _one_of("feed", "constant", "lognormal"),
                                "order entry latency: 'feed' (the feed's measured exchange-to-receive lag, "
                                "else QF_BROKER_LATENCY_MS), 'constant', or 'lognormal' sampled")
    latency_ms: float = setting("QF_BROKER_LATENCY_MS", "10", _float(0.0, 200.0),
                                "entry latency in ms: the constant, the lognormal median, the fallback of 'feed'")
    latency_sigma: float = setting("QF_BROKER_LATENCY_SIGMA", "0.5", _float(0.0, 3.0),
                                   "shape (sigma of the log) of the lognormal entry latency")
    queue_model: str = setting("QF_BROKER_QUEUE_MODEL", "power", _one_of("power", "log", "risk_averse"),
                               "queue position of resting orders: probabilistic 'power' or 'log' "
                               "(hftbacktest's), or conservative 'risk_averse'")
    queue_power: float = setting("QF_BROKER_QUEUE_POWER", "2", _float(0.1, 10.0),
                                 "exponent n of the 'power' queue model")
    fee_asset: str = setting("QF_BROKER_FEE_ASSET", "quote", _one_of("quote", "received"),
                             "fees paid in the quote asset, or in the asset received (Binance without BNB)")
    equity_s: float = setting("QF_BROKER_EQUITY_S", "10", _float(0.1, 86400.0),
                              "equity snapshot period in seconds (also one per fill)")
    seed: int = setting("QF_BROKER_SEED", "0", _int(0, 2**63 - 1), "seed of the sampled latency")


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
        """Every setting as `QF_NAME -> text` for the start-up log: secret settings as `***`,
        credentials inside URL-like values (a password in QF_DB) masked by `mask_secrets`."""
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                value = getattr(section, f.name)
                if isinstance(value, tuple):
                    value = ",".join(value).lower()
                text = str(value)
                out[f.metadata["env"]] = (MASK if text else text) if f.metadata["secret"] else mask_secrets(text)
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
                shown = MASK if f.metadata["secret"] else mask_secrets(raw)  # an error names the setting, not its secret
                problems.append(f"{var}={shown!r}: {mask_secrets(str(exc))}")
        if len(values) == len(fields(cls)):
            sections[name] = cls(**values)
    if problems:
        raise ConfigError("bad configuration: " + "; ".join(problems))
    return Config(**sections)
