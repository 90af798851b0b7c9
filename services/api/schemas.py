"""The API's request and response schemas (pydantic), from which flask-openapi3 validates the
query strings and writes `/api/v1/openapi.json`.

Money is a decimal string everywhere (`Money`: exact, never a float); times are ns since the
epoch (integers). Query models forbid unknown parameters: a typo (`symbl=`) is a 400, not a
silently unfiltered answer."""
from __future__ import annotations

import calendar
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Le
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_NS = 2**63 - 1

Money = Annotated[str, StringConstraints(pattern=r"^-?[0-9]+(\.[0-9]+)?$"),
                  Field(description="exact decimal string")]
Symbol = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,20}$"),
                   Field(description="a symbol such as BTCUSDT (any case)")]
_DIGITS = re.compile(r"[0-9]+")
_RFC3339 = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")


def _instant_ns(value: str) -> int:
    """ns since the epoch from digits (ns) or an RFC 3339 time with its offset, clamped to
    0..MAX_NS (a range that starts before 1970 or ends after 2262 means all of that side).
    By hand, not pydantic's datetime: in lax mode it takes "0.5" for half a second after 1970."""
    if _DIGITS.fullmatch(value):
        digits = value.lstrip("0") or "0"
        return MAX_NS if len(digits) > 19 else min(int(digits), MAX_NS)
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise ValueError("expected ns since the epoch or an RFC 3339 time with its UTC offset")
    day, hm, sec, frac, offset = m.groups()
    offset = "+00:00" if offset in ("Z", "z") else offset
    problem = _not_real(day, hm, sec, offset)
    if problem:
        raise ValueError(f"not a real time: {problem}")
    leap = sec == "60"  # RFC 3339's leap second: the last instant of its minute
    t = datetime.fromisoformat(f"{day}T{hm}:{'59' if leap else sec}{offset}")
    micros = int(((frac or ".0")[1:] + "000000")[:6])
    ns = (int(t.timestamp()) + (1 if leap else 0)) * 1_000_000_000 + micros * 1000
    return max(0, min(ns, MAX_NS))


def _not_real(day: str, hm: str, sec: str, offset: str) -> str | None:
    """What makes an RFC 3339 time of the right shape not a real one, in the API's words (not
    datetime's, which quote timedelta reprs), or None."""
    y, mo, d = (int(x) for x in day.split("-"))
    h, mi = (int(x) for x in hm.split(":"))
    oh, om = int(offset[1:3]), int(offset[4:6])
    if not 1 <= y:
        return "year 0000 is before 0001"
    if not 1 <= mo <= 12:
        return f"month {mo:02d} is not between 01 and 12"
    last = calendar.monthrange(y, mo)[1]
    if not 1 <= d <= last:
        return f"day {d:02d} is not between 01 and {last} in {y:04d}-{mo:02d}"
    if h > 23:
        return f"hour {h:02d} is not between 00 and 23"
    if mi > 59:
        return f"minute {mi:02d} is not between 00 and 59"
    if int(sec) > 60:
        return f"second {sec} is not between 00 and 60"
    if oh > 23 or om > 59:
        return f"offset {offset} is not between -23:59 and +23:59"
    return None


def _digits(value):
    """A query string's integer as digits only: pydantic's lax int would take "5.0" and "1_000".
    Digits past 19 (over any maximum the API takes) are kept as 20 nines, so the bound check
    says "over the maximum" whatever their number (and no 10^5-digit int() is parsed)."""
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError("expected an integer (digits only)")
        digits = value.lstrip("0") or "0"
        return "9" * 20 if len(digits) > 19 else digits
    return value


Digits = BeforeValidator(_digits)
Instant = Annotated[str, AfterValidator(_instant_ns), WithJsonSchema({
    "anyOf": [{"type": "string", "pattern": "^[0-9]{1,19}$"}, {"type": "string", "format": "date-time"}],
    "description": "ns since the epoch, or an RFC 3339 time with its UTC offset (2026-12-07T10:00:00Z)"})]
CURSOR_REFUSED = "not one this endpoint gave (pass the next_cursor of its previous page)"
_CURSOR_SHAPE = re.compile(r"[tos]\.-?[0-9a-f]{1,16}\.[A-Za-z0-9_-]{1,100}\.[0-9a-f]{10}")


def _cursor_shape(value: str) -> str:
    """A cursor's shape only (its endpoint and check are the query layer's: queries.decode_cursor),
    refused in the same words as a cursor of the right shape that this endpoint did not give."""
    if not _CURSOR_SHAPE.fullmatch(value):
        raise ValueError(CURSOR_REFUSED)
    return value


_CURSOR_DOC = ("an opaque string: the next_cursor of this endpoint's previous page, for the page after it. "
               "Cursors carry their endpoint and a check: one made up, edited or from another endpoint is "
               "400 bad_param")
Cursor = Annotated[str, AfterValidator(_cursor_shape), WithJsonSchema({
    "type": "string", "pattern": "^[to]\\.[0-7]?[0-9a-f]{1,15}\\.[A-Za-z0-9_-]{1,100}\\.[0-9a-f]{10}$",
    "description": _CURSOR_DOC})]
SignalCursor = Annotated[str, AfterValidator(_cursor_shape), WithJsonSchema({
    "type": "string", "pattern": "^s\\.[0-7]?[0-9a-f]{1,15}\\.[0-9a-f]{1,16}\\.[0-9a-f]{10}$",
    "description": _CURSOR_DOC})]


class Query(BaseModel):
    """A query string's model: unknown parameters are refused; the JSON schema is kept.

    flask-openapi3 calls `model_json_schema()` on every request it validates (~0.5 ms each, more
    than the rest of a paginated query): a class's schema never changes, so it is made once."""
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict[str, Any]:
        if args or kwargs:
            return super().model_json_schema(*args, **kwargs)
        cache = cls.__dict__.get("_schema_cache")
        if cache is None:
            cache = super().model_json_schema()
            setattr(cls, "_schema_cache", cache)
        return cache


class NoQuery(Query):
    """No parameters."""


class RangeQuery(Query):
    symbol: Optional[Symbol] = None
    from_: Optional[Instant] = Field(None, alias="from", description="from this time on (inclusive)")
    to: Optional[Instant] = Field(None, description="up to this time (exclusive)")
    limit: Annotated[int, Digits] = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="rows per page")
    cursor: Optional[Cursor] = None


class TradesQuery(RangeQuery):
    side: Optional[Literal["BUY", "SELL"]] = None
    since: Optional[Annotated[int, Ge(0), Le(MAX_NS), Digits]] = Field(None, description="fills with ts ≥ since (ns); the older "
                                                                    "spelling of `from`")
    format: Literal["json", "csv"] = Field("json", description="csv: text/csv, the next cursor in X-Next-Cursor")


class OrdersQuery(RangeQuery):
    side: Optional[Literal["BUY", "SELL"]] = None
    status: Optional[Literal["PENDING", "PARTIALLY_FILLED", "FILLED", "CANCELLED", "REJECTED"]] = None


class SignalsQuery(RangeQuery):
    cursor: Optional[SignalCursor] = None


class PositionsQuery(Query):
    symbol: Optional[Symbol] = None


class EquityQuery(Query):
    from_: Optional[Instant] = Field(None, alias="from", description="default: `to` minus one day")
    to: Optional[Instant] = Field(None, description="default: now")
    interval: Literal["auto", "1m", "5m", "15m", "1h", "4h", "1d"] = Field(
        "auto", description="bucket; each point is the last snapshot in its bucket (auto: at most 500 points)")


class RiskQuery(Query):
    window: Annotated[int, Digits] = Field(3600, ge=1, le=30 * 86400, description="seconds of denials to count by reason")
    limit: Annotated[int, Digits] = Field(50, ge=1, le=500, description="recent risk events to list")


class StatsQuery(Query):
    from_: Optional[Instant] = Field(None, alias="from", description=(
        "the window's start (inclusive; default: the first fill): the fill figures (fills, maker shares, "
        "notional, fees, slippage) and the equity figures are over fills and snapshots in [from, to); the "
        "round-trip figures are all time (the answer's `window` lists both)"))
    to: Optional[Instant] = Field(None, description="the window's end (exclusive; default: no end); to ≤ from: "
                                                    "an empty window")


# -- responses (the document's; the views build plain dicts that match them) -----------------

class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""
    error: ErrorDetail


class Live(BaseModel):
    status: Literal["ok"]


class ServiceBeat(BaseModel):
    status: str
    age_s: Optional[float]
    pid: Optional[int]
    started_ts: Optional[int]
    fresh: bool


class Feed(BaseModel):
    state: str
    detail: str
    synced: bool


class Health(BaseModel):
    status: Literal["ok", "error"]
    db: Literal["ok", "error"]
    problems: list[str] = Field(description="what is wrong, one line each (empty when ok)")
    services: dict[str, ServiceBeat]
    feeds: dict[str, Feed]
    error: Optional[ErrorDetail] = None


class RiskStateStored(BaseModel):
    state: str
    code: str
    reason: str
    by: str
    ts: Optional[int]


class Equity(BaseModel):
    ts: int
    equity: Money
    cash: Money
    note: str


class Status(BaseModel):
    fills: int
    orders: dict[str, int]
    equity: Optional[Equity]
    positions: dict[str, Money]
    ts: int
    risk_state: RiskStateStored
    trading_state: str = Field(description="risk's state now: from its live heartbeat when fresh, else stored")
    pause: dict[str, Any]
    services: dict[str, ServiceBeat]
    feeds: dict[str, Feed]


class Trade(BaseModel):
    fill_id: str
    order_id: str
    client_order_id: str
    symbol: str
    side: str
    price: Money
    qty: Money
    fee: Money
    fee_asset: str
    liquidity: str
    exch_ts: int
    ts: int
    mid_at_fill: Optional[Money] = None
    decision_mid: Optional[Money] = None
    arrival_mid: Optional[Money] = None
    slippage_decision: Optional[Money] = None
    slippage_arrival: Optional[Money] = None
    queue_wait_ns: Optional[int] = None


class TradesPage(BaseModel):
    trades: list[Trade]
    count: int
    next_cursor: Optional[str]


class Order(BaseModel):
    order_id: str
    client_order_id: str
    strategy: str
    symbol: str
    side: str
    kind: str
    tif: str
    qty: Money
    price: Optional[Money]
    status: str
    filled_qty: Money
    avg_price: Optional[Money]
    reason: str
    created_ts: int
    updated_ts: int
    arrival_ts: Optional[int]
    decision_mid: Optional[Money]
    arrival_mid: Optional[Money]


class OrdersPage(BaseModel):
    orders: list[Order]
    count: int
    next_cursor: Optional[str]


class Position(BaseModel):
    symbol: str
    qty: Money
    avg_entry_price: Optional[Money]
    cost_basis: Money
    realized_pnl: Money
    fees: dict[str, Money]
    net_realized_pnl: Money
    unrealized_pnl: Money = Field(description="the open quantity marked at the last fill price")
    last_price: Optional[Money]
    fills: int


class Positions(BaseModel):
    positions: list[Position]


class PnlToday(BaseModel):
    day: str
    realized: Money
    fees: Money
    net_realized: Money
    fills: int
    equity_start: Optional[Money] = Field(description="equity at the last snapshot before the UTC day began")
    equity_change: Optional[Money]


class Pnl(BaseModel):
    realized: Money
    unrealized: Money
    fees: Money
    other_fees: dict[str, Money]
    net_realized: Money
    net: Money = Field(description="net realized plus unrealized")
    equity: Optional[Equity]
    today: PnlToday
    symbols: int


class EquityPoint(BaseModel):
    ts: int
    equity: Money
    cash: Money


class EquitySeries(BaseModel):
    interval_s: int = Field(description="the bucket used (coarser than asked when the range needs it)")
    requested_interval_s: Optional[int]
    interval_widened_from: Optional[int] = Field(description=(
        "the asked interval (s) when it was widened: an asked interval is used while it makes at most 10,000 "
        "points over the range; past that the smallest that makes at most 500 is (as `auto`)"))
    note: Optional[str] = Field(description="why the interval was widened, when it was")
    start: int = Field(alias="from")
    to: int
    points: list[EquityPoint]


class RiskEventOut(BaseModel):
    ts: int
    kind: str
    code: str
    text: str
    client_order_id: str
    symbol: str
    state: str


class Risk(BaseModel):
    state: RiskStateStored
    live: Optional[dict[str, Any]] = Field(description="risk's newest risk.state message, when heard")
    limits: dict[str, Any]
    pause: dict[str, Any]
    denials: dict[str, Any]
    events: list[RiskEventOut]


class StatsWindow(BaseModel):
    start: Optional[int] = Field(alias="from", description="the window asked (ns), null: none")
    to: Optional[int]
    applies_to: list[str] = Field(description="the fields over the fills and snapshots in [from, to) (all of "
                                              "them without a window)")
    all_time: list[str] = Field(description="the fields over every fill whatever the window: round trips "
                                            "(a trip's close and P&L depend on the position at `from`)")


class Stats(BaseModel):
    fills: int
    round_trips: int
    wins: int
    losses: int
    win_rate: Optional[float]
    profit_factor: Optional[float]
    gross_win: Money
    gross_loss: Money
    maker_share: Optional[float]
    maker_notional_share: Optional[float]
    notional: Money
    fees: dict[str, Money] = Field(description="fees by asset (the quote asset's under its name)")
    slippage: dict[str, Any]
    equity: dict[str, Any]
    window: StatsWindow


class Signal(BaseModel):
    ts: int
    symbol: str
    side: str
    confidence: float
    score: float
    features: dict[str, Any]
    update_id: int
    recv_ts: int
    client_order_id: str
    action: str


class SignalsPage(BaseModel):
    signals: list[Signal]
    count: int
    next_cursor: Optional[str]


class ControlBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["HALT", "RESUME", "FLATTEN"]
    reason: str = Field(min_length=1, max_length=500)
    by: str = Field("", max_length=80)


class ControlAnswer(BaseModel):
    state: str
    reason: str
    positions: Any
    equity: Any
    detail: Any
