"""Wire messages: frozen dataclasses, MessagePack codec, typed DecodeError.

Payload = msgpack map with `v`, `type`, `ts` (ns) and, on PUB/SUB, `seq`.
Requests and events are separate registries because the protocol (docs/protocol.md) names both
the `order` request and the `order.{SYMBOL}` event `order`.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar

import msgpack

from shared.enums import (ControlAction, Liquidity, OrderKind, OrderStatus, Side, TimeInForce,
                          TradingState, Verdict)
from shared.errors import DecodeError
from shared.money import BadAmount, to_decimal

VERSION = 1
MAX_FRAME = 1 << 20  # a bigger payload is refused before unpacking
# Wire decimals (docs/protocol.md): at most 64 characters, finite, and 1e-30 <= |x| < 1e30 (or a
# plain 0). An exponent is what makes a short string dangerous: "9e999999" overflows the first
# sum it enters, "1e-999999" is a million digits once written out without one. Within these
# bounds every product the broker makes (price x qty x fee rate, at most ~46 digits) is still
# a readable wire decimal, and Decimal arithmetic at 50 digits never overflows.
MAX_DECIMAL_LEN = 64
DECIMAL_MAX_ADJUSTED = 29  # the leading digit's exponent: |x| < 1e30
DECIMAL_MIN_ADJUSTED = -30  # |x| >= 1e-30; a zero written with an exponent below that is refused too
MAX_NAME = 128  # client_order_id, strategy, symbol of a request: 1 to 128 characters (answer caches stay bounded)


# -- field checkers: wire value -> python value, or DecodeError ----------------------

def _bad(name: str, want: str, got: Any) -> DecodeError:
    return DecodeError("bad_field", f"{name}: expected {want}, got {type(got).__name__} {str(got)[:40]!r}")


def _check_int(name, x):
    if type(x) is not int:
        raise _bad(name, "int", x)
    return x


def _check_float(name, x):
    if type(x) is float:
        if math.isfinite(x):
            return x
    elif type(x) is int:
        return float(x)
    raise _bad(name, "finite float", x)


def _check_str(name, x):
    if type(x) is not str:
        raise _bad(name, "str", x)
    return x


def _check_bool(name, x):
    if type(x) is not bool:
        raise _bad(name, "bool", x)
    return x


def check_decimal(name: str, x: Any) -> Decimal:
    """A wire decimal -> Decimal: shared.money.to_decimal's contract (a decimal string, int or
    Decimal, finite; never a float or a bool) within the wire's bounds (at most MAX_DECIMAL_LEN
    characters, 1e-30 <= |x| < 1e30 or 0). Raises DecodeError bad_field. The checker of every
    Decimal field of every message, nested ack fills included."""
    if type(x) is str and len(x) > MAX_DECIMAL_LEN:
        raise _bad(name, f"decimal string of at most {MAX_DECIMAL_LEN} characters", x)
    try:
        d = to_decimal(x, name)
    except BadAmount:
        raise _bad(name, "finite decimal string", x) from None
    if DECIMAL_MIN_ADJUSTED <= d.adjusted() <= DECIMAL_MAX_ADJUSTED:
        return d
    raise _bad(name, "decimal string, 1e-30 <= |x| < 1e30", x)


def _check_name(name, x):
    # printable: an id with a newline or an escape sequence forged log lines and terminal output
    if type(x) is str and 0 < len(x) <= MAX_NAME and x.isprintable():
        return x
    raise _bad(name, f"str of 1 to {MAX_NAME} printable characters", x)


def _check_levels(name, x):
    if type(x) is not list:
        raise _bad(name, "list of [price, qty]", x)
    for lvl in x:
        if type(lvl) is not list or len(lvl) != 2:
            raise _bad(name, "[price, qty]", lvl)
        _check_float(name, lvl[0]), _check_float(name, lvl[1])
    return x


def _check_dict(name, x):
    if type(x) is not dict:
        raise _bad(name, "map", x)
    return x


def _check_fills(name, x):
    """Ack.fills: a list of fill maps, each a `fill` message's fields without `v` and `type`."""
    if type(x) is not list:
        raise _bad(name, "list of fill maps", x)
    out = []
    for i, item in enumerate(x):
        if type(item) is not dict:
            raise _bad(f"{name}[{i}]", "fill map", item)
        try:
            out.append(_build(Fill, item))
        except DecodeError as exc:
            raise DecodeError(exc.reason, f"{name}[{i}]: {exc.detail}") from None
    return out


def _check_ack(name, x):
    """Decision.order: the broker's whole `ack` message map, as risk splices it in."""
    if type(x) is not dict:
        raise _bad(name, "ack map", x)
    try:
        return from_wire(x, _ACKS)
    except DecodeError as exc:
        raise DecodeError(exc.reason, f"{name}: {exc.detail}") from None


def _enum_checker(cls):
    members = {m.value: m for m in cls}  # a dict lookup for the usual plain string; cls(x) for the rest

    def check(name, x):
        if type(x) is str:
            member = members.get(x)
            if member is not None:
                return member
        try:
            return cls(x)
        except ValueError:
            raise _bad(name, "/".join(m.value for m in cls), x) from None
    return check


Name = typing.NewType("Name", str)  # an identifier a request brings in: 1 to MAX_NAME characters
_CHECKERS = {int: _check_int, float: _check_float, str: _check_str, bool: _check_bool,
             Decimal: check_decimal, dict: _check_dict, Name: _check_name}
Levels = list  # [[price, qty], ...] floats, best first


def _checker_for(tp):
    optional = False
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if tp is list:
        check = _check_levels
    elif typing.get_origin(tp) is list and typing.get_args(tp) == (Fill,):
        check = _check_fills
    elif tp is Ack:
        check = _check_ack
    elif isinstance(tp, type) and issubclass(tp, Enum):
        check = _enum_checker(tp)
    else:
        check = _CHECKERS[tp]
    return optional, check


# -- messages -----------------------------------------------------------------------

_PLAIN = frozenset({str, int, float, bool, type(None), dict, list, tuple})  # neither Decimal nor Enum


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    TYPE: ClassVar[str] = ""
    ts: int

    def to_wire(self, seq: int | None = None) -> dict:
        """The msgpack map: enums as strings, Decimals as strings."""
        out = {"v": VERSION, "type": self.TYPE}
        for name in self._names:
            value = getattr(self, name)
            kind = type(value)
            if kind is Decimal:
                value = format(value, "f")  # never exponent notation ("1E-8")
            elif kind in _PLAIN:
                pass
            elif isinstance(value, Decimal):
                value = format(value, "f")
            elif isinstance(value, Enum):
                value = value.value
            elif isinstance(value, Message):  # a nested message (Decision.order): its whole map
                value = value.to_wire()
            out[name] = value
        if seq is not None:
            out["seq"] = seq
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Book(Message):
    """`book.{SYMBOL}`: top-N levels and metrics after one applied depth event."""
    TYPE = "book"
    symbol: str
    exch_ts: int
    update_id: int
    bids: Levels
    asks: Levels
    mid: float
    spread: float
    spread_bps: float
    imbalance: float
    microprice: float
    recv_ts: int = 0  # local receive time (ns) of the depth event: the start of tick-to-trade

    def to_wire(self, seq: int | None = None) -> dict:
        """Same map as Message.to_wire (no Decimal or Enum fields), built directly: the hot path."""
        return book_wire(self.ts, self.symbol, self.exch_ts, self.update_id, self.bids, self.asks, self.mid,
                         self.spread, self.spread_bps, self.imbalance, self.microprice, self.recv_ts, seq)


def book_problem(book: "Book") -> str | None:
    """Why a book's mid cannot be trusted as a price, in a few words, or None: a crossed or locked
    top of book, or a mid that is not between the best bid and the best ask. Marketdata never
    sends such a book; a peer on the bus that does must not move what risk marks positions at
    (one crossed book with mid 1.0 tripped the daily-loss breaker). O(1): the top only."""
    bids, asks = book.bids, book.asks
    if not bids or not asks:
        return None  # one-sided: no mid to use (shared/money.from_book_float refuses it)
    try:
        bid, ask, mid = float(bids[0][0]), float(asks[0][0]), float(book.mid)
    except (TypeError, ValueError, IndexError):
        return "a top level that is not a [price, qty] pair"
    if not bid < ask:  # NaN included
        return f"crossed or locked: bid {bid!r} >= ask {ask!r}"
    if not bid <= mid <= ask:
        return f"mid {mid!r} outside bid {bid!r} / ask {ask!r}"
    return None


def book_wire(ts: int, symbol: str, exch_ts: int, update_id: int, bids: list, asks: list, mid: float,
              spread: float, spread_bps: float, imbalance: float, microprice: float, recv_ts: int,
              seq: int | None = None) -> dict:
    """The wire map of a `book` message from its field values, without building a Book (marketdata's
    per-event path); keys in field order, exactly as Message.to_wire makes them. Checks nothing."""
    out = {"v": VERSION, "type": "book", "ts": ts, "symbol": symbol, "exch_ts": exch_ts, "update_id": update_id,
           "bids": bids, "asks": asks, "mid": mid, "spread": spread, "spread_bps": spread_bps,
           "imbalance": imbalance, "microprice": microprice, "recv_ts": recv_ts}
    if seq is not None:
        out["seq"] = seq
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Trade(Message):
    """`trade.{SYMBOL}`: one exchange trade."""
    TYPE = "trade"
    symbol: str
    exch_ts: int
    trade_id: int
    price: Decimal
    qty: Decimal
    buyer_is_maker: bool
    recv_ts: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MdStatus(Message):
    """`status.{SYMBOL}`: the feed's state while no trustworthy book can be published."""
    TYPE = "md_status"
    symbol: str
    state: str  # CONNECTING / SYNCING / SYNCED / DISCONNECTED / REPLAY_DONE / REPLAY_FAILED
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Clock(Message):
    """`clock`: lock-step replay only (QF_LOCKSTEP, shared/lockstep.py). The conductor moves
    every service's clock to `ts` with no market event: the instant the broker's next request
    is due (its timer, on the capture's time). `ts` 0 is the start-up handshake, not a time."""
    TYPE = "clock"


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderRequest(Message):
    """Request `order`: strategy → risk → broker."""
    TYPE = "order"
    client_order_id: Name
    strategy: Name
    symbol: Name
    side: Side
    kind: OrderKind
    qty: Decimal
    price: Decimal | None = None
    tif: TimeInForce = TimeInForce.GTC
    confidence: float = 0.0
    signal_ts: int = 0  # recv_ts of the book event that triggered the order


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision(Message):
    """Reply `decision`: risk's verdict, with the broker's ack when it went through."""
    TYPE = "decision"
    client_order_id: str
    verdict: Verdict
    reason: dict | None = None  # {"code": ..., "text": ...} when not APPROVED
    qty: Decimal = Decimal(0)
    # The broker's ack when the order went through: its whole map (`v`, `type`, `ts` included), as
    # risk splices the broker's bytes in unchanged (services/risk/desk.py); decoded and checked as an Ack.
    order: Ack | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    """Reply `ack`: the broker's answer to an order or cancel, after its commit."""
    TYPE = "ack"
    client_order_id: str
    order_id: str
    status: OrderStatus
    filled_qty: Decimal
    avg_price: Decimal | None = None
    # On the wire each is the `fill` message's map without `v` and `type` (Fill.wire_body): every
    # field a fill event has. Decoded as Fills, every field checked (decimals by check_decimal).
    fills: list[Fill] = ()
    reason: str = ""

    def to_wire(self, seq: int | None = None) -> dict:
        """Message.to_wire's map, built directly (the broker's answer path); each fill's map is a copy
        of the one its Fill made once (Fill.wire_body), so the broker formats a fill's decimals once."""
        status = self.status
        out = {"v": VERSION, "type": "ack", "ts": self.ts, "client_order_id": self.client_order_id,
               "order_id": self.order_id, "status": status.value if isinstance(status, Enum) else status,
               "filled_qty": _text(self.filled_qty), "avg_price": _text(self.avg_price),
               "fills": [f.wire_body() for f in self.fills], "reason": self.reason}
        if seq is not None:
            out["seq"] = seq
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    TYPE = "cancel"
    client_order_id: Name


@dataclass(frozen=True, slots=True, kw_only=True)
class Control(Message):
    TYPE = "control"
    action: ControlAction
    by: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlReply(Message):
    TYPE = "control_reply"
    state: TradingState
    reason: str
    positions: dict  # symbol -> decimal string
    equity: Decimal
    detail: dict | None = None  # realized, fees, peak and day-start equity, flatten results


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """Reply `error`: a request that could not even be read (its decode error)."""
    TYPE = "error"
    code: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderEvent(Message):
    """`order.{SYMBOL}`: an order's status changed."""
    TYPE = "order"
    order_id: str
    client_order_id: str
    symbol: str
    status: OrderStatus
    filled_qty: Decimal
    avg_price: Decimal | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fill(Message):
    """`fill.{SYMBOL}`: one execution, published only after it is committed."""
    TYPE = "fill"
    fill_id: str
    order_id: str
    client_order_id: str
    symbol: str
    side: Side
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: Liquidity
    exch_ts: int
    # Fill quality (issue #5), optional: left off the wire while unset, so a fill
    # without them encodes byte for byte as before.
    decision_mid: Decimal | None = None  # mid when the broker took the order (decision time)
    arrival_mid: Decimal | None = None  # mid of the book the order met at the simulated exchange
    slippage_decision: Decimal | None = None  # side sign × (price − decision_mid): > 0 cost, < 0 improvement
    slippage_arrival: Decimal | None = None  # the same against arrival_mid
    queue_wait_ns: int = 0  # maker fills: from joining the queue to this fill; 0 for takers
    # to_wire's map (without `seq`), made on first use and copied out: the broker puts each fill in its
    # ack and in a fill.* event, and formatting its seven decimals is most of the cost of either.
    # Not a field of the message (no init, no compare, not on the wire).
    _wire: dict | None = field(default=None, init=False, repr=False, compare=False)

    _QUALITY: ClassVar[tuple[str, ...]] = ("decision_mid", "arrival_mid", "slippage_decision",
                                           "slippage_arrival", "queue_wait_ns")

    def to_wire(self, seq: int | None = None) -> dict:
        """Message.to_wire's map without the unset quality fields, built directly, once per Fill (the
        generic loop costs three times as much); each call returns a fresh copy, free to change."""
        wire = self._wire
        if wire is None:
            side, liquidity = self.side, self.liquidity
            wire = {"v": VERSION, "type": "fill", "ts": self.ts, "fill_id": self.fill_id,
                    "order_id": self.order_id, "client_order_id": self.client_order_id, "symbol": self.symbol,
                    "side": side.value if isinstance(side, Enum) else side,
                    "price": _text(self.price), "qty": _text(self.qty), "fee": _text(self.fee),
                    "fee_asset": self.fee_asset,
                    "liquidity": liquidity.value if isinstance(liquidity, Enum) else liquidity,
                    "exch_ts": self.exch_ts}
            for name in self._QUALITY:
                value = getattr(self, name)
                if isinstance(value, Decimal):  # a zero slippage is a measurement: kept, as "0"
                    wire[name] = format(value, "f")
                elif value is not None and value != 0:
                    wire[name] = value
            object.__setattr__(self, "_wire", wire)
        out = wire.copy()
        if seq is not None:
            out["seq"] = seq
        return out

    def wire_body(self) -> dict:
        """The fill's map as carried in Ack.fills: to_wire's without `v` and `type` (a fresh copy)."""
        out = self.to_wire()
        del out["v"], out["type"]
        return out


def _text(value: Any) -> Any:
    """A Decimal as Message.to_wire writes it (never exponent notation); anything else as it is."""
    return format(value, "f") if isinstance(value, Decimal) else value


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskState(Message):
    """`risk.state`: the trading state and what it is based on."""
    TYPE = "risk_state"
    state: TradingState
    reason: str
    equity: Decimal
    drawdown: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """`heartbeat.{service}`: liveness plus a few counters for `qf up`'s status line."""
    TYPE = "heartbeat"
    service: str
    pid: int
    started_ts: int
    status: str
    stats: dict | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert(Message):
    """`alert.{service}`: something an operator must hear about (the notifier relays it).
    Raised once per `code` while the condition lasts (shared/alerts.py), then `resolved`."""
    TYPE = "alert"
    service: str
    code: str  # stable, machine-readable: BROKER_ERROR, STORE_UNAVAILABLE, BOOK_STALLED, ...
    severity: str  # "error", "warning", or "resolved" when the condition ended
    text: str  # one line for a person
    count: int = 1  # occurrences since the last alert of this code went out


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalEvent(Message):
    """`signal.{SYMBOL}`: what the strategy concluded from a book, and why (the features, name →
    float). Published when the signal's side changes and with every order it triggers (then
    `client_order_id` names the order and `action` says what it was: `entry`, `exit:<why>`)."""
    TYPE = "signal"
    symbol: str
    side: str  # BUY, SELL, or FLAT
    confidence: float  # 0..1
    score: float = 0.0  # signed: > 0 buy pressure
    features: dict | None = None
    update_id: int = 0  # the triggering book's
    recv_ts: int = 0
    client_order_id: str = ""
    action: str = ""


EVENTS: dict[str, type[Message]] = {c.TYPE: c for c in
                                    (Book, Trade, MdStatus, OrderEvent, Fill, RiskState, Heartbeat, Alert, Clock,
                                     SignalEvent)}
REQUESTS: dict[str, type[Message]] = {c.TYPE: c for c in
                                      (OrderRequest, Decision, Ack, Cancel, Control, ControlReply, Error)}


_ACKS: dict[str, type[Message]] = {Ack.TYPE: Ack}  # what Decision.order decodes as


def _prepare(cls: type[Message]) -> None:
    hints = typing.get_type_hints(cls)
    specs = []
    wire_fields = [f for f in fields(cls) if f.init]  # not a memo such as Fill._wire
    for f in wire_fields:
        optional, check = _checker_for(hints[f.name])
        required = f.default is f.default_factory  # both MISSING
        specs.append((f.name, required, optional, check))
    cls._specs = tuple(specs)
    cls._names = tuple(f.name for f in wire_fields)


for _cls in (*EVENTS.values(), *REQUESTS.values()):
    _prepare(_cls)


# -- codec --------------------------------------------------------------------------

def encode(msg: Message, seq: int | None = None) -> bytes:
    """Message → msgpack bytes (`seq` added on PUB/SUB)."""
    return msgpack.packb(msg.to_wire(seq), use_bin_type=True)


def decode(payload: bytes, registry: dict[str, type[Message]] = EVENTS) -> Message:
    """msgpack bytes → Message. Raises DecodeError for anything that is not a
    valid message of `registry` (size, msgpack, version, type, fields)."""
    if len(payload) > MAX_FRAME:
        raise DecodeError("oversized", f"{len(payload)} bytes > {MAX_FRAME}")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError("bad_msgpack", str(exc)[:80]) from None
    return from_wire(raw, registry)


def from_wire(raw: Any, registry: dict[str, type[Message]] = EVENTS) -> Message:
    """An already unpacked map → Message; same checks as `decode`."""
    if type(raw) is not dict:
        raise DecodeError("not_a_map", type(raw).__name__)
    v = raw.get("v")
    if v != VERSION:
        raise DecodeError("bad_version", repr(v)[:20])
    cls = registry.get(raw.get("type")) if type(raw.get("type")) is str else None
    if cls is None:
        raise DecodeError("unknown_type", repr(raw.get("type"))[:40])
    return _build(cls, raw)


def _build(cls: type[Message], raw: dict) -> Message:
    """`cls` from the fields of map `raw` (other keys ignored), each checked; raises DecodeError."""
    kwargs = {}
    for name, required, optional, check in cls._specs:
        if name not in raw:
            if required:
                raise DecodeError("missing_field", f"{cls.TYPE}.{name}")
            continue
        value = raw[name]
        if value is None and optional:
            kwargs[name] = None
        else:
            kwargs[name] = check(name, value)
    return cls(**kwargs)


def seq_of(payload_map: dict) -> int | None:
    return payload_map.get("seq")
