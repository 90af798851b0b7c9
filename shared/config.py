"""Configuration from `QF_*` environment variables; every default lives here."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

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


def _nonempty(what: str) -> Callable[[str], str]:
    """Any text but empty (or blanks): `what` says what it must be."""
    def parse(raw: str) -> str:
        if not raw.strip():
            raise ValueError(f"must not be empty: {what}")
        return raw
    return parse


# numbers are written in ASCII: int(), float() and Decimal() would also take other scripts' digits
# (`١٢`, `１０`) and `_` separators (`1_000`)
_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_ASCII_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _ascii_int(raw: str) -> int:
    text = raw.strip()
    if not _ASCII_INT.fullmatch(text):
        raise ValueError("not a whole number (ASCII digits, e.g. 10)")
    return int(text)


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _ascii_int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return parse


def _ascii_float(raw: str) -> float:
    text = raw.strip()
    if not _ASCII_NUMBER.fullmatch(text):
        raise ValueError("not a number (ASCII digits, e.g. 0.5)")
    return float(text)


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _ascii_float(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return parse


def _decimal(lo: Decimal, hi: Decimal) -> Callable[[str], Decimal]:
    def parse(raw: str) -> Decimal:
        if not _ASCII_NUMBER.fullmatch(raw.strip()):
            raise ValueError("not a decimal number (ASCII digits, e.g. 0.001)")
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
        if not (s.isascii() and s.isalnum()):
            raise ValueError(f"{s!r} is not a symbol like btcusdt (ASCII letters and digits)")
    return syms


def _port(text: str, lo: int = 1) -> int | None:
    """`text` as a port number in lo..65535 (ASCII digits), else None."""
    if not (text.isascii() and text.isdigit()):
        return None
    port = int(text)
    return port if lo <= port <= 65535 else None


def _endpoint(raw: str) -> str:
    """A ZeroMQ endpoint one process binds and the others connect to: tcp://HOST:PORT (HOST `*`
    binds every IPv4 address), ipc://PATH or inproc://NAME. A wildcard port (`tcp://host:*`) is
    not one: the connecting side could not know it."""
    value = raw.strip()
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ endpoint: tcp://host:port, ipc://path or inproc://name")
    scheme, _, rest = value.partition("://")
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or _port(port) is None:
            raise ValueError("must be tcp://host:port with a port between 1 and 65535, e.g. tcp://127.0.0.1:5555")
    elif not rest:
        raise ValueError(f"must be {scheme}://{'path' if scheme == 'ipc' else 'name'}, not empty")
    return value


def _endpoints(raw: str) -> str:
    """One endpoint, or several separated by commas (normalised to `a,b`): the publishers of one
    kind a subscriber connects to, when symbols are split over several processes."""
    items = [_endpoint(item) for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError("needs at least one ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555")
    if len(set(items)) != len(items):
        raise ValueError("lists an endpoint twice")
    return ",".join(items)


def endpoints(value: str) -> tuple[str, ...]:
    """The endpoints of a bus setting (QF_MD_PUB and QF_STRATEGY_PUB may list several)."""
    return tuple(value.split(","))


def _instance(raw: str) -> str:
    value = raw.strip().lower()
    if value and not (len(value) <= 32 and value.replace("-", "").isalnum() and value.isascii()):
        raise ValueError("must be empty (one process of its service) or a short name of letters, digits "
                         "and '-', e.g. 2")
    return value


def _optional_endpoint(raw: str) -> str:
    return _endpoint(raw) if raw.strip() else ""


def _curve_keys(raw: str) -> str:
    value = raw.strip()
    if value and not os.path.isdir(value):
        raise ValueError("must be empty (off) or the directory `qf keys DIR` made (public/, private/)")
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


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


def _market_symbols(raw: str) -> tuple[str, ...]:
    """`btcusdt,usdm:btcusdt` → ("BTCUSDT", "USDM:BTCUSDT"); `usdm:` selects USD-M futures. Groups
    separated by `;` (`symbol_groups`) count as one list here: every symbol of them."""
    keys: list[str] = []
    for item in (i.strip() for i in raw.replace(";", ",").split(",")):
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


def symbol_groups(raw: str) -> tuple[tuple[str, ...], ...]:
    """QF_SYMBOLS's groups: `btcusdt,ethusdt;solusdt` → (("BTCUSDT", "ETHUSDT"), ("SOLUSDT",)), one
    marketdata and one strategy process each under `qf up`. Raises ValueError for an empty group
    or a symbol in two."""
    if ";" not in raw:
        return (_market_symbols(raw),)
    groups = tuple(_market_symbols(g) if g.strip(" ,") else () for g in raw.split(";"))
    if any(not g for g in groups):
        raise ValueError("a ';'-separated group is empty")
    seen = [s for g in groups for s in g]
    if len(set(seen)) != len(seen):
        raise ValueError("a symbol is in two groups")
    return groups


def _grouped_symbols(raw: str) -> tuple[str, ...]:
    """QF_SYMBOLS: every symbol of its groups, the groups checked (`symbol_groups`)."""
    return tuple(s for g in symbol_groups(raw) for s in g)


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
    if value and (not sep or not host or _port(port, 0) is None):
        raise ValueError("must be empty (off) or host:port, e.g. 127.0.0.1:9101 (port 0: any free port)")
    return value


def _listen(raw: str) -> str:
    """host:port an HTTP server listens on (the port 1..65535: the others must find it)."""
    value = raw.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not host or _port(port) is None:
        raise ValueError("must be host:port with a port between 1 and 65535, e.g. 127.0.0.1:8000")
    return value


DB_SCHEMES = ("postgresql", "postgres", "sqlite")  # what shared/db.py opens with the drivers installed


def check_db(target: str) -> None:
    """Raises ValueError (a sentence that never quotes the URL: it may hold a password) when
    `target`, a QF_DB value or `qf backtest --db`, cannot name a database: empty, a URL of a
    scheme other than DB_SCHEMES, a URL whose host or port cannot be read, a PostgreSQL URL
    without a database name. A SQLite path is checked when it is opened."""
    if not target.strip():
        raise ValueError("must not be empty: a SQLite file, or a PostgreSQL URL (postgresql://…@HOST:PORT/NAME)")
    if "://" not in target:
        return
    scheme = target.split("://", 1)[0].lower()
    if scheme not in DB_SCHEMES:
        raise ValueError(f"{scheme[:20]}:// is not a supported database: a SQLite file, or a PostgreSQL URL "
                         "(postgresql://…@HOST:PORT/NAME)")
    try:
        parts = urlsplit(target.strip())
        port = parts.port
    except ValueError as exc:
        why = "Invalid IPv6 URL" if "IPv6" in str(exc) else "its port is not a number between 1 and 65535"
        raise ValueError(f"not a database URL that can be read ({why})") from None
    if port == 0:
        raise ValueError("not a database URL that can be read (its port is not a number between 1 and 65535)")
    if scheme != "sqlite" and not parts.path.strip("/"):
        raise ValueError("names no database (postgresql://…@HOST:PORT/NAME)")


def _db(raw: str) -> str:
    check_db(raw)
    return raw


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
        if (sep and market.lower() != "usdm") or not name.isascii() or not (sym if sep else market).isalnum():
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


_ASSET = re.compile(r"[A-Z0-9]{2,12}")
MAX_BALANCE = Decimal("1e12")  # as QF_START_CASH: with MAX_QTY/MAX_PRICE it bounds every balance sum's digits


def _balances(raw: str) -> str:
    """`usdt=10000, BTC=0.25` → `USDT=10000,BTC=0.25` (canonical: upper-case assets, plain
    decimals, in the order given); empty stays empty. Raises ValueError for an entry that is
    not ASSET=AMOUNT, an asset name not of 2-12 letters or digits, an amount that is not an
    exact decimal in [0, 1e12] with at most 18 decimals, or an asset listed twice."""
    out: dict[str, str] = {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        name, eq, amount = (part.strip() for part in entry.partition("="))
        asset = name.upper()
        if not eq or not _ASSET.fullmatch(asset):
            raise ValueError(f"{entry[:40]!r}: expected ASSET=AMOUNT with an asset of 2-12 letters or digits, "
                             "e.g. USDT=10000,BTC=0.25")
        if asset in out:
            raise ValueError(f"{asset} is listed twice")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise ValueError(f"{entry[:40]!r}: {amount[:40]!r} is not a decimal amount") from None
        if (not value.is_finite() or not Decimal(0) <= value <= MAX_BALANCE
                or value.normalize().as_tuple().exponent < -18):
            raise ValueError(f"{entry[:40]!r}: an amount must be a decimal between 0 and {MAX_BALANCE:f} "
                             "with at most 18 decimals")
        out[asset] = format(value.normalize(), "f") if value else "0"
    return ",".join(f"{asset}={amount}" for asset, amount in out.items())


def setting(env: str, default: str, parse: Callable[[str], Any], help: str, secret: bool = False):
    """A config field: its variable, its default (as the text a user would write) and parser."""
    # a secret is left out of the dataclass's repr too: a config printed whole must not show it
    return field(repr=not secret,
                 metadata={"env": env, "default": default, "parse": parse, "help": help, "secret": secret})


# -- sections --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusConfig:
    md_pub: str = setting("QF_MD_PUB", "tcp://127.0.0.1:5555", _endpoints,
                          "marketdata PUB (book.*, trade.*); subscribers may list several, comma-separated "
                          "(symbols split over marketdata processes); a marketdata process binds one")
    risk_rep: str = setting("QF_RISK_REP", "tcp://127.0.0.1:5556", _endpoint, "risk ROUTER for orders and control")
    broker_rep: str = setting("QF_BROKER_REP", "tcp://127.0.0.1:5557", _endpoint, "broker ROUTER, reached by risk only")
    broker_pub: str = setting("QF_BROKER_PUB", "tcp://127.0.0.1:5558", _endpoint, "broker PUB (fill.*, order.*)")
    risk_pub: str = setting("QF_RISK_PUB", "tcp://127.0.0.1:5559", _endpoint, "risk PUB (risk.state)")
    strategy_pub: str = setting("QF_STRATEGY_PUB", "tcp://127.0.0.1:5560", _endpoints,
                                "strategy PUB (signal.*, heartbeat.strategy); listeners may list several, "
                                "comma-separated; a strategy process binds one")
    hwm: int = setting("QF_ZMQ_HWM", "100000", _int(1000, 10_000_000),
                       "PUB/SUB high-water mark (the ZeroMQ default of 1000 drops bursts)")
    heartbeat_ms: int = setting("QF_HEARTBEAT_MS", "1000", _int(50, 60_000), "heartbeat period of every service")
    lockstep: str = setting("QF_LOCKSTEP", "", _optional_endpoint,
                            "lock-step replay (`qf up --lockstep` sets it): the conductor's PULL endpoint; "
                            "empty: off")
    curve_keys: str = setting("QF_CURVE_KEYS", "", _curve_keys,
                              "CURVE key directory (`qf keys DIR`): every tcp/ipc socket authenticates and encrypts, "
                              "and each server accepts only its clients' keys (shared/curve.py); empty: off")


@dataclass(frozen=True, slots=True)
class CommonConfig:
    db: str = setting("QF_DB", "./data/quantumflow.db", _db, "SQLite file (or a peewee database URL)")
    log_level: str = setting("QF_LOG_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING or ERROR")
    run_dir: str = setting("QF_RUN_DIR", "/tmp/quantumflow", _nonempty("a directory"),
                           "where services touch their liveness files")
    instance: str = setting("QF_INSTANCE", "", _instance,
                            "this process's name among several of its service (symbols split over marketdata "
                            "and strategy processes): its heartbeat, alerts and liveness file are "
                            "<service>.<instance>; empty: the only one")


@dataclass(frozen=True, slots=True)
class MarketDataConfig:
    symbols: tuple = setting("QF_SYMBOLS", "btcusdt", _grouped_symbols,
                             "comma-separated Binance symbols; usdm:btcusdt = USD-M futures, "
                             "published as USDM:BTCUSDT; groups separated by ';' (a,b;c) get a marketdata "
                             "and a strategy process each under `qf up`")
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


def _numbers(kind: type, lo: float, hi: float) -> Callable[[str], str]:
    """` 1000, 5000` → "1000,5000": one or more comma-separated numbers of `kind`, each in [lo, hi],
    as canonical text (`numbers()` reads it back)."""
    def parse(raw: str) -> str:
        items = [i.strip() for i in raw.split(",") if i.strip()]
        if not items:
            raise ValueError("needs at least one number, e.g. 1000,5000")
        values = tuple((_ascii_int if kind is int else _ascii_float)(i) for i in items)
        if not all(lo <= v <= hi for v in values):  # also rejects nan
            raise ValueError(f"each must be between {lo} and {hi}")
        return ",".join(f"{v:g}" if kind is float else str(v) for v in values)
    return parse


def numbers(text: str, kind: type = float) -> tuple:
    """A `_numbers` setting's canonical text as a tuple of `kind`."""
    return tuple(kind(i) for i in text.split(","))


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    kind: str = setting("QF_STRATEGY_KIND", "ofi", _one_of("ofi", "imbalance"),
                        "the strategy: 'ofi' (order-flow imbalance, post-only entries, exits; "
                        "services/strategy/ofi.py) or 'imbalance' (top-of-book imbalance, market orders)")
    name: str = setting("QF_STRATEGY_NAME", "", _str,
                        "strategy id on orders, and the start of its client_order_ids (empty: QF_STRATEGY_KIND)")
    imbalance: float = setting("QF_STRATEGY_IMBALANCE", "0.6", _float(0.0, 1.0),
                               "imbalance: top-of-book imbalance that triggers an entry (|x| ≥ this)")
    qty: Decimal = setting("QF_STRATEGY_QTY", "0.001", _decimal(Decimal("1e-8"), Decimal("1e6")),
                           "imbalance: base quantity per order")
    cooldown_ms: int = setting("QF_STRATEGY_COOLDOWN_MS", "250", _int(0, 3_600_000), "minimum time between orders")
    timeout_ms: int = setting("QF_STRATEGY_TIMEOUT_MS", "1000", _int(10, 60_000), "wait for risk's answer")
    retries: int = setting("QF_STRATEGY_RETRIES", "3", _int(1, 20), "attempts per order (same client_order_id)")
    # ofi: features (services/strategy/features.py)
    levels: int = setting("QF_STRATEGY_LEVELS", "5", _int(1, 50), "ofi: book levels of multi-level OFI and depth "
                                                                   "imbalance")
    windows_ms: str = setting("QF_STRATEGY_WINDOWS_MS", "1000,5000", _numbers(int, 1, 3_600_000),
                                "ofi: OFI and trade-flow windows in ms (the signal uses the first)")
    horizons_s: str = setting("QF_STRATEGY_HORIZONS_S", "1,5,10", _numbers(float, 0.001, 86_400.0),
                                "ofi: momentum horizons in s (recorded with each signal)")
    vol_tau_s: float = setting("QF_STRATEGY_VOL_TAU_S", "10", _float(0.01, 86_400.0),
                               "ofi: time constant in s of the volatility EWMAs")
    spread_tau_s: float = setting("QF_STRATEGY_SPREAD_TAU_S", "10", _float(0.01, 86_400.0),
                                  "ofi: time constant in s of the spread baseline (spread regime)")
    # ofi: the score, in [-1, 1] (weights of its bounded terms)
    w_ofi: float = setting("QF_STRATEGY_W_OFI", "0.3", _float(0.0, 100.0), "ofi: score weight of multi-level OFI")
    w_ofi_l1: float = setting("QF_STRATEGY_W_OFI_L1", "0.1", _float(0.0, 100.0), "ofi: score weight of best-level OFI")
    w_flow: float = setting("QF_STRATEGY_W_FLOW", "0.2", _float(0.0, 100.0), "ofi: score weight of trade flow")
    w_depth: float = setting("QF_STRATEGY_W_DEPTH", "0.2", _float(0.0, 100.0),
                             "ofi: score weight of top-N depth imbalance")
    w_micro: float = setting("QF_STRATEGY_W_MICRO", "0.2", _float(0.0, 100.0),
                             "ofi: score weight of the microprice's place in the spread")
    ofi_scale: float = setting("QF_STRATEGY_OFI_SCALE", "25", _float(1e-9, 1e12),
                               "ofi: multi-level OFI (in average level depths) counted as strong: tanh(ofi / this)")
    ofi_l1_scale: float = setting("QF_STRATEGY_OFI_L1_SCALE", "10", _float(1e-9, 1e12),
                                  "ofi: best-level OFI (base qty) counted as strong: tanh(ofi_l1 / this)")
    entry_score: float = setting("QF_STRATEGY_ENTRY_SCORE", "0.6", _float(0.0, 1.0),
                                 "ofi: a score at or above this is a BUY signal, at or below minus this a SELL "
                                 "(confidence: the score's size)")
    cancel_score: float = setting("QF_STRATEGY_CANCEL_SCORE", "0", _float(-1.0, 1.0),
                                  "ofi: a resting entry is cancelled when the score falls to this or below")
    max_spread_ratio: float = setting("QF_STRATEGY_MAX_SPREAD_RATIO", "3", _float(0.0, 1e9),
                                      "ofi: no signal while the spread is above this × its EWMA (spread regime)")
    vol_min_bps: float = setting("QF_STRATEGY_VOL_MIN_BPS", "0.2", _float(0.0, 1e6),
                                 "ofi: no signal while the 1-second volatility (bps) is below this")
    vol_max_bps: float = setting("QF_STRATEGY_VOL_MAX_BPS", "5", _float(0.0, 1e6),
                                 "ofi: no signal while the 1-second volatility (bps) is above this")
    # ofi: sizing and orders
    notional: Decimal = setting("QF_STRATEGY_NOTIONAL", "200", _decimal(Decimal("0.01"), Decimal("1e12")),
                                "ofi: entry notional (quote) at confidence 1, × confidence × the volatility target")
    target_vol_bps: float = setting("QF_STRATEGY_TARGET_VOL_BPS", "1", _float(1e-6, 1e6),
                                    "ofi: volatility target: size × min(1, this / 1-second volatility in bps)")
    market_confidence: float = setting("QF_STRATEGY_MARKET_CONFIDENCE", "0.9", _float(0.0, 2.0),
                                       "ofi: entries at this confidence or above are MARKET, below it post-only "
                                       "LIMITs at the best bid (above 1: never MARKET)")
    entry_ttl_ms: int = setting("QF_STRATEGY_ENTRY_TTL_MS", "3000", _int(1, 86_400_000),
                                "ofi: a resting entry older than this is cancelled")
    away_bps: float = setting("QF_STRATEGY_AWAY_BPS", "2", _float(0.0, 1e6),
                              "ofi: a resting entry is cancelled when the best bid is more than this from its price")
    take_profit_bps: float = setting("QF_STRATEGY_TAKE_PROFIT_BPS", "6", _float(0.0, 1e6),
                                     "ofi: exit when the mid is this far above the average entry price")
    stop_loss_bps: float = setting("QF_STRATEGY_STOP_LOSS_BPS", "4", _float(0.0, 1e6),
                                   "ofi: exit when the mid is this far below the average entry price")
    max_hold_ms: int = setting("QF_STRATEGY_MAX_HOLD_MS", "20000", _int(1, 86_400_000),
                               "ofi: time stop: exit a position held this long")
    reversal_confidence: float = setting("QF_STRATEGY_REVERSAL_CONFIDENCE", "0.8", _float(0.0, 2.0),
                                         "ofi: exit on a SELL signal of at least this confidence (above 1: never)")
    metrics_bind: str = setting("QF_STRATEGY_METRICS_BIND", "", _bind,
                                "host:port of the strategy's own Prometheus /metrics (empty: off)")

    def __post_init__(self) -> None:
        if not self.name:  # orders say which strategy sent them: "ofi-…" or "imbalance-…"
            object.__setattr__(self, "name", self.kind)


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
                                   "max resting (GTC or GTX LIMIT) orders in total")
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
    metrics_bind: str = setting("QF_RISK_METRICS_BIND", "", _bind,
                                "host:port of risk's own Prometheus /metrics (empty: off)")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    taker_fee: Decimal = setting("QF_BROKER_TAKER_FEE", "0.001", _decimal(Decimal(0), Decimal("0.1")), "taker fee rate")
    maker_fee: Decimal = setting("QF_BROKER_MAKER_FEE", "0.001", _decimal(Decimal(0), Decimal("0.1")), "maker fee rate")
    start_cash: Decimal = setting("QF_START_CASH", "10000", _decimal(Decimal(0), Decimal("1e12")),
                                  "paper cash in the quote asset")
    start_balances: str = setting("QF_START_BALANCES", "", _balances,
                                  "the spot account's start balances, ASSET=AMOUNT[,…] (e.g. USDT=10000,BTC=0.25); "
                                  "risk lets no order spend more than is free; the quote asset's amount is the "
                                  "start cash (P&L counts from the base holdings as they start); empty: "
                                  "QF_START_CASH in the quote asset")

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
    metrics_bind: str = setting("QF_BROKER_METRICS_BIND", "", _bind,
                                "host:port of the broker's own Prometheus /metrics (empty: off)")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    bind: str = setting("QF_API_BIND", "127.0.0.1:8000", _listen, "host:port gunicorn listens on")
    workers: int = setting("QF_API_WORKERS", "2", _int(1, 64), "gunicorn workers")
    token: str = setting("QF_API_TOKEN", "", _str, "bearer token for control endpoints (empty: disabled)",
                         secret=True)


def _shabbat_location(raw: str) -> str:
    """A named city or LAT,LON,TZ[,ELEVATION], checked by shared.shabbat.place()."""
    from shared.shabbat import place  # here: astral and pyluach load only with the section

    place(raw)
    return raw.strip()


def _shabbat_candles(raw: str) -> str:
    """Empty (the place's custom) or whole minutes 0..90, as canonical text."""
    return str(_int(0, 90)(raw)) if raw.strip() else ""


def _shabbat_tzeit(raw: str) -> str:
    """`8.5deg` (0 < degrees <= 18) or `42min` (1..120), as canonical text."""
    from shared.shabbat import parse_tzeit

    return str(parse_tzeit(raw))


@dataclass(frozen=True, slots=True)
class ShabbatConfig:
    """The Shabbat and Yom Tov pauses (shared/shabbat.py; `qf calendar` lists them)."""
    pause: bool = setting("QF_SHABBAT_PAUSE", "true", _bool,
                          "keep the Shabbat and Yom Tov pauses: risk stops trading from candle-lighting to "
                          "nightfall, flat, and resumes by itself (false: trade through them)")
    location: str = setting("QF_SHABBAT_LOCATION", "Jerusalem", _shabbat_location,
                            "where the pauses are kept: a city (Jerusalem, Tel Aviv, Haifa, New York, London, "
                            "Paris, São Paulo, Johannesburg, Melbourne, …) or LAT,LON,TZ[,ELEVATION]")
    yom_tov: bool = setting("QF_SHABBAT_YOM_TOV", "true", _bool,
                            "also pause for Yom Tov (one day in Israel, two abroad), merged with an adjacent "
                            "Shabbat")
    candles_min: str = setting("QF_SHABBAT_CANDLES_MIN", "", _shabbat_candles,
                               "a pause starts this many minutes before sunset (0..90; empty: the local custom, "
                               "18, Jerusalem 40, Haifa 30)")
    tzeit: str = setting("QF_SHABBAT_TZEIT", "8.5deg", _shabbat_tzeit,
                         "a pause ends at nightfall: the sun this far below the horizon ('8.5deg') or minutes "
                         "after sunset ('42min', '50min', '72min')")
    flatten_min: int = setting("QF_SHABBAT_FLATTEN_MIN", "15", _int(0, 240),
                               "minutes before a pause starts at which positions are flattened")


_BOT_TOKEN = re.compile(r"[0-9]{1,20}:[A-Za-z0-9_-]{20,100}")


def _bot_token(raw: str) -> str:
    """Empty (the notifier is off) or a Bot API token as @BotFather gives it, `123456:ABC…`.
    The error never quotes the value: it is a secret."""
    value = raw.strip()
    if value and not _BOT_TOKEN.fullmatch(value):
        raise ValueError("must be empty (off) or a bot token from @BotFather, digits:letters (123456789:AAF…)")
    return value


_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{16,256}")


def _webhook_secret(raw: str) -> str:
    """Empty (the webhook is off) or 16..256 of `A-Z a-z 0-9 _ -` (Telegram's `secret_token`
    allows 1..256; fewer than 16 is too easy to guess). The error never quotes the value."""
    value = raw.strip()
    if value and not _WEBHOOK_SECRET.fullmatch(value):
        raise ValueError("must be empty (off) or 16 to 256 characters of A-Z, a-z, 0-9, _ and -")
    return value


def _chat_ids(raw: str) -> tuple[str, ...]:
    """`123456, -1001234567890` → ("123456", "-1001234567890"): chat ids (a group's is negative)."""
    out: list[str] = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        try:
            value = _ascii_int(item)
        except ValueError:
            raise ValueError(f"{item[:40]!r} is not a chat id: whole numbers, e.g. 123456789,-1001234567890") from None
        if value == 0 or abs(value) >= 10**16:
            raise ValueError(f"{item[:40]!r} is not a chat id")
        if str(value) not in out:
            out.append(str(value))
    return tuple(out)


def _hhmm_utc(raw: str) -> str:
    """Empty (off) or `HH:MM` (UTC), as canonical text `21:00`."""
    value = raw.strip()
    if not value:
        return ""
    hh, sep, mm = value.partition(":")
    if not (sep and hh.isascii() and hh.isdigit() and mm.isascii() and mm.isdigit() and len(mm) == 2
            and int(hh) < 24 and int(mm) < 60):
        raise ValueError("must be empty (off) or HH:MM in UTC, e.g. 21:00")
    return f"{int(hh):02d}:{mm}"


@dataclass(frozen=True, slots=True)
class NotifierConfig:
    """The Telegram notifier (services/notifier/; README "Telegram")."""
    telegram_token: str = setting("QF_TELEGRAM_TOKEN", "", _bot_token,
                                  "Telegram bot token from @BotFather (empty: the notifier is off)", secret=True)
    telegram_chat_ids: tuple = setting("QF_TELEGRAM_CHAT_IDS", "", _chat_ids,
                                       "comma-separated chat ids the notifier writes to (a group's is negative)")
    telegram_api_url: str = setting("QF_TELEGRAM_API_URL", "https://api.telegram.org/bot", _url("http", "https"),
                                    "Telegram Bot API base; the token follows it (a local Bot API server, a test "
                                    "fake)")
    report_at: str = setting("QF_NOTIFIER_REPORT_AT", "21:00", _hhmm_utc,
                             "daily report (the last 24 h, with the equity chart) at HH:MM UTC (empty: off)")
    batch_ms: int = setting("QF_NOTIFIER_BATCH_MS", "2000", _int(0, 60_000),
                            "fills of one symbol within this many ms of the first go out as one message "
                            "(0: one message per fill)")
    allowed_chats: tuple = setting("QF_TELEGRAM_ALLOWED_CHATS", "", _chat_ids,
                                   "comma-separated chat ids whose commands the API's webhook obeys "
                                   "(empty: commands off)")
    webhook_secret: str = setting("QF_TELEGRAM_WEBHOOK_SECRET", "", _webhook_secret,
                                  "secret Telegram sends in X-Telegram-Bot-Api-Secret-Token with each "
                                  "webhook call (empty: POST /telegram/webhook is off)", secret=True)


SECTIONS = {"bus": BusConfig, "common": CommonConfig, "md": MarketDataConfig,
            "strategy": StrategyConfig, "risk": RiskConfig, "broker": BrokerConfig, "api": ApiConfig,
            "shabbat": ShabbatConfig, "notifier": NotifierConfig}


@dataclass(frozen=True, slots=True)
class Config:
    bus: BusConfig
    common: CommonConfig
    md: MarketDataConfig
    strategy: StrategyConfig
    risk: RiskConfig
    broker: BrokerConfig
    api: ApiConfig
    shabbat: ShabbatConfig
    notifier: NotifierConfig

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
    if not problems:
        problems += _cross_checks(sections)
    if not problems and sections["broker"].start_balances:
        problem = _start_account(sections, "QF_START_CASH" in env)
        if isinstance(problem, str):
            problems.append(problem)
        else:
            sections["broker"] = problem
    if problems:
        raise ConfigError("bad configuration: " + "; ".join(problems))
    return Config(**sections)


def _start_account(sections: dict, cash_given: bool) -> "BrokerConfig | str":
    """QF_START_BALANCES against QF_START_CASH: equity, P&L and the breakers count from one amount
    of the traded spot symbols' quote asset, so that amount (0 when the balances do not name the
    quote asset) is the start cash: QF_START_CASH need not be set; set, it must agree. Base-asset
    balances can be sold; positions and P&L count from them (a SELL of a start holding is a short
    against it, its P&L measured against holding it). Returns the BrokerConfig with that start
    cash, or the problem."""
    from shared.money import UnknownAsset, quote_asset

    broker = sections["broker"]
    given = {k: Decimal(v) for k, v in (e.split("=", 1) for e in broker.start_balances.split(",") if e)}
    quotes = set()
    for sym in sections["md"].symbols:
        if sym.startswith("USDM:"):
            continue
        try:
            quotes.add(quote_asset(sym))
        except UnknownAsset:
            pass
    if len(quotes) != 1:
        return (f"QF_START_BALANCES: the traded spot symbols have {len(quotes)} quote assets "
                f"({', '.join(sorted(quotes)) or 'none'}); the account counts equity in exactly one")
    [quote] = quotes
    amount = given.get(quote, Decimal(0))
    if cash_given and amount != broker.start_cash:
        return (f"QF_START_BALANCES gives {quote}={amount} but QF_START_CASH is {broker.start_cash}: "
                "set one of them (or both the same)")
    return replace(broker, start_cash=amount)


# -- settings that are each valid but cannot go together -------------------------------------

def _cross_checks(sections: dict) -> list[str]:
    """The problems of pairs of settings that contradict each other (every value valid on its own):
    no order could pass, a filter nothing passes, a limit that cannot apply, two sockets on one
    address. Each names both settings, as risk's soft-above-hard breaker check does."""
    problems = []
    st, risk = sections["strategy"], sections["risk"]
    if st.kind == "ofi":  # services/strategy/scoring.py: the score divides by the weights' sum
        if st.w_ofi + st.w_ofi_l1 + st.w_flow + st.w_depth + st.w_micro <= 0:
            problems.append("QF_STRATEGY_W_OFI, _W_OFI_L1, _W_FLOW, _W_DEPTH, _W_MICRO: at least one score "
                            "weight must be positive (all are 0)")
        if st.vol_min_bps > st.vol_max_bps:  # the regime is open while min <= vol <= max: never
            problems.append(f"QF_STRATEGY_VOL_MIN_BPS / _VOL_MAX_BPS: the minimum {st.vol_min_bps:g} is above "
                            f"the maximum {st.vol_max_bps:g} (no volatility lets a signal through)")
        if st.cancel_score > st.entry_score:  # an entry (score >= entry) is cancelled at score <= cancel
            problems.append(f"QF_STRATEGY_CANCEL_SCORE / _ENTRY_SCORE: the cancel score {st.cancel_score:g} is "
                            f"above the entry score {st.entry_score:g} (an entry would be cancelled as it rests)")
    # risk's checks: notional < min_notional or > max_order_notional is denied (0 is no "off" for either)
    overrides = {}
    for entry in (e.strip() for e in risk.symbol_limits.split(";") if e.strip()):
        name, *pairs = entry.split()
        overrides[name] = {k: Decimal(v) for k, _, v in (p.partition("=") for p in pairs)}
    # the global pair, when some traded symbol takes both from it (QF_RISK_SYMBOL_LIMITS overrides are
    # not judged here: tests/services/strategy/test_ofi.py's property test feeds any pair through them)
    keys = {"min_notional", "max_order_notional"}
    if risk.min_notional > risk.max_order_notional and any(
            not keys & set(overrides.get(sym, {})) for sym in sections["md"].symbols):
        problems.append(f"QF_RISK_MIN_NOTIONAL / _MAX_ORDER_NOTIONAL: the minimum notional {risk.min_notional:f} "
                        f"is above the maximum order notional {risk.max_order_notional:f} (no order could pass)")
    if risk.orders_per_s > risk.orders_per_min:  # two token buckets: a minute holds fewer than one second
        problems.append(f"QF_RISK_ORDERS_PER_S / _ORDERS_PER_MIN: {risk.orders_per_s} orders a second is above "
                        f"{risk.orders_per_min} a minute (the per-second limit could never apply)")
    problem = bind_conflict(bind_endpoints(sections))
    if problem:
        problems.append(problem)
    return problems


def bind_endpoints(sections: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(setting, address) of every address some process of the configuration binds: the bus
    endpoints (each of a list), the lock-step conductor's, the HTTP listeners' (metrics, the API)."""
    bus = sections["bus"]
    out = [("QF_MD_PUB", e) for e in endpoints(bus.md_pub)]
    out += [("QF_RISK_REP", bus.risk_rep), ("QF_BROKER_REP", bus.broker_rep), ("QF_BROKER_PUB", bus.broker_pub),
            ("QF_RISK_PUB", bus.risk_pub)]
    out += [("QF_STRATEGY_PUB", e) for e in endpoints(bus.strategy_pub)]
    if bus.lockstep:
        out.append(("QF_LOCKSTEP", bus.lockstep))
    for var, section in (("QF_MD_METRICS_BIND", "md"), ("QF_STRATEGY_METRICS_BIND", "strategy"),
                         ("QF_RISK_METRICS_BIND", "risk"), ("QF_BROKER_METRICS_BIND", "broker")):
        if sections[section].metrics_bind:
            out.append((var, sections[section].metrics_bind))
    out.append(("QF_API_BIND", sections["api"].bind))
    return out


_ANY_V4 = ("*", "0.0.0.0")
_LOCAL_V4 = ("*", "0.0.0.0", "127.0.0.1", "localhost")


def _address(endpoint: str) -> tuple[str, str, str] | None:
    """(transport, host, port-or-path) an address is bound as; None for what cannot clash with
    another process (inproc: in-process; port 0: any free port)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:  # host:port, an HTTP listener
        scheme, rest = "tcp", endpoint
    if scheme == "inproc":
        return None
    if scheme == "ipc":
        return ("ipc", "", os.path.normpath(rest))
    host, _, port = rest.rpartition(":")
    return None if port == "0" else ("tcp", host.lower(), port)


def bind_conflict(binds: list[tuple[str, str]]) -> str | None:
    """The problem when two of (setting, address) would bind one address — the same ipc path, or
    the same tcp port on the same host (or on this machine's every-address `*` / 0.0.0.0 and one of
    its IPv4 addresses): the second socket could never bind while the first lives. None if none."""
    seen: list[tuple[str, str, tuple[str, str, str]]] = []
    for var, endpoint in binds:
        addr = _address(endpoint)
        if addr is None:
            continue
        for var0, endpoint0, addr0 in seen:
            same = addr0 == addr or (
                addr[0] == addr0[0] == "tcp" and addr[2] == addr0[2]
                and (addr[1] in _ANY_V4 or addr0[1] in _ANY_V4) and {addr[1], addr0[1]} <= set(_LOCAL_V4))
            if same:
                return (f"{var0} and {var} both bind {mask_secrets(endpoint0)}"
                        + (f" / {mask_secrets(endpoint)}" if endpoint != endpoint0 else "")
                        + ": give each its own address")
        seen.append((var, endpoint, addr))
    return None
