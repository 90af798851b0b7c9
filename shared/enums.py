"""Domain enums; `str` subclasses so they travel as plain strings."""
from enum import Enum


class Side(str, Enum):
    BUY = "BUY"
    SELL = "SELL"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1


class OrderKind(str, Enum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"


class TimeInForce(str, Enum):
    GTC = "GTC"
    IOC = "IOC"
    GTX = "GTX"  # post-only ("good till crossing", Binance futures' name; spot's LIMIT_MAKER)

    @property
    def rests(self) -> bool:
        """Whether a LIMIT order with this time in force may rest on the book (GTC, GTX; IOC never)."""
        return self is not TimeInForce.IOC


class OrderStatus(str, Enum):
    PENDING = "PENDING"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"


OPEN_STATUSES = frozenset({OrderStatus.PENDING, OrderStatus.PARTIALLY_FILLED})
TERMINAL_STATUSES = frozenset({OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED})


class Verdict(str, Enum):
    APPROVED = "APPROVED"
    ADJUSTED = "ADJUSTED"
    REJECTED = "REJECTED"


class TradingState(str, Enum):
    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"
    PAUSED_SHABBAT = "PAUSED_SHABBAT"  # risk: a Shabbat or Yom Tov pause (qf calendar); orders denied SHABBAT


class Liquidity(str, Enum):
    MAKER = "MAKER"
    TAKER = "TAKER"


class ControlAction(str, Enum):
    HALT = "HALT"
    RESUME = "RESUME"
    FLATTEN = "FLATTEN"
    STATE = "STATE"
