"""A backtest's figures, from its fills and its equity curve: pure, no I/O.

Money stays exact (Decimal, printed as decimal strings); the ratios (Sharpe, win rate, maker
share, events per second) are floats. Every figure says what it is measured on:

- `turnover`: Σ price × qty over all fills (quote asset).
- `fees`: Σ fees, in the quote asset; a fee paid in the base asset (QF_BROKER_FEE_ASSET=received)
  is valued at its fill's price.
- `net_pnl`: equity at the end − start cash (cash plus positions marked at the last mid).
  `gross_pnl` = `net_pnl` + `fees`.
- `max_drawdown`: the largest fall of the equity curve from a running peak, in the quote asset
  (`max_drawdown_frac`: as a fraction of that peak). The curve is sampled after every fill and
  once per `SAMPLE_NS` of capture time.
- `sharpe`: mean / standard deviation of the equity's returns over consecutive `SAMPLE_NS` (1 s)
  steps of capture time, scaled by √(steps per day): a *daily* Sharpe ratio, stated as such
  (`sharpe_period`). None with fewer than two returns or no variation.
- `win_rate`: share of round trips (a position taken from flat back to flat, or through it)
  whose P&L after fees was positive; None without a round trip.
- `slippage_decision` / `slippage_arrival`: quantity-weighted mean of the fills' slippage
  (price units, positive = cost) against the mid when the broker took the order and the mid
  of the book the order met (docs/fill-model.md); `*_bps`: the same in basis points of the
  average mid.
- `maker_share`: share of the filled quantity that rested and was filled as a maker.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal, localcontext

from shared.enums import Liquidity
from shared.ledger import Ledger
from shared.money import MONEY, ZERO, quote_asset, text
from shared.messages import Fill

SAMPLE_NS = 1_000_000_000  # the equity curve's step for the Sharpe ratio (capture time)
STEPS_PER_DAY = 86_400


@dataclass(slots=True)
class Gap:
    """A break in a symbol's diff-depth chain: `after` is the book's last update id, `next_first`
    the first id of the event that did not follow on. Repaired when a later snapshot in the
    capture resynced the book (at `repaired_at`, its update id)."""
    symbol: str
    ts: int
    after: int
    next_first: int
    repaired_at: int | None = None

    def as_dict(self) -> dict:
        return {"symbol": self.symbol, "ts": self.ts, "after_update_id": self.after,
                "next_first_update_id": self.next_first, "repaired": self.repaired_at is not None,
                "repaired_at_update_id": self.repaired_at}


@dataclass(slots=True)
class BadEvent:
    """A capture message the book sync or the router could not use (a NaN or negative level, a
    bad trade, a broken snapshot): where it was read (`where`, "FILE:LINE"), the symbol it was
    about ("" when none), why (`reason`, the decode-error reason) and what was wrong (`detail`).
    When it cost the symbol its book (`book_lost`), `skipped` counts the capture's messages that
    came while the book was gone, until a later snapshot resynced it (`repaired_at`, its update
    id, at `repaired_ts`) or the capture ended (`repaired_at` None)."""
    where: str
    symbol: str
    reason: str
    detail: str
    ts: int
    book_lost: bool = False
    skipped: int = 0
    repaired_at: int | None = None
    repaired_ts: int | None = None

    def as_dict(self, end_ns: int) -> dict:
        lost_ns = ((self.repaired_ts if self.repaired_ts is not None else end_ns) - self.ts) if self.book_lost else 0
        return {"where": self.where, "symbol": self.symbol, "reason": self.reason, "detail": self.detail,
                "ts": self.ts, "book_lost": self.book_lost, "skipped_messages": self.skipped,
                "skipped_s": round(max(lost_ns, 0) / 1e9, 3),
                "repaired": self.book_lost and self.repaired_at is not None,
                "repaired_at_update_id": self.repaired_at}


@dataclass(slots=True)
class Figures:
    """Collects what the summary is made of while the backtest runs (`on_fill`, `on_mark`,
    `sample`), then `summary()` computes the figures."""
    start_cash: Decimal
    ledger: Ledger = field(init=False)
    fills: int = 0
    turnover: Decimal = ZERO
    fees: Decimal = ZERO
    qty: Decimal = ZERO
    maker_qty: Decimal = ZERO
    slip_decision: Decimal = ZERO  # Σ slippage × qty
    slip_decision_qty: Decimal = ZERO
    slip_arrival: Decimal = ZERO
    slip_arrival_qty: Decimal = ZERO
    mid_notional: Decimal = ZERO  # Σ decision (else arrival) mid × qty: slippage in bps of the mid
    mid_qty: Decimal = ZERO
    trips: int = 0
    wins: int = 0
    peak: Decimal | None = None
    max_dd: Decimal = ZERO
    max_dd_frac: Decimal = ZERO
    curve: list[float] = field(default_factory=list)  # equity once per SAMPLE_NS, for the Sharpe ratio
    next_sample: int | None = None
    equity: Decimal = ZERO

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.start_cash, remember=0)  # the broker's fills are unique already
        self.equity = self.start_cash

    def on_fill(self, fill: Fill) -> None:
        """One committed fill (the broker's own object: exact Decimals)."""
        with localcontext(MONEY):
            notional = fill.price * fill.qty
            in_base = fill.fee_asset != quote_asset(fill.symbol)
            self.fills += 1
            self.turnover += notional
            self.fees += fill.fee * fill.price if in_base else fill.fee
            self.qty += fill.qty
            if fill.liquidity is Liquidity.MAKER:
                self.maker_qty += fill.qty
            if fill.slippage_decision is not None:
                self.slip_decision += fill.slippage_decision * fill.qty
                self.slip_decision_qty += fill.qty
            if fill.slippage_arrival is not None:
                self.slip_arrival += fill.slippage_arrival * fill.qty
                self.slip_arrival_qty += fill.qty
            mid = fill.decision_mid if fill.decision_mid is not None else fill.arrival_mid
            if mid is not None:
                self.mid_notional += mid * fill.qty
                self.mid_qty += fill.qty
        _pos, trip = self.ledger.apply(fill.fill_id, fill.symbol, fill.side, fill.qty, fill.price, fill.fee,
                                       fill.fee_asset)
        if trip is not None:
            self.trips += 1
            self.wins += trip > 0

    def on_equity(self, equity: Decimal, now_ns: int) -> None:
        """The account's equity (cash + positions at mid) at `now_ns`: after a fill, and whenever the
        caller likes; the drawdown is tracked on every value, the Sharpe curve once per SAMPLE_NS."""
        self.equity = equity
        if self.peak is None or equity > self.peak:
            self.peak = equity
        else:
            dd = self.peak - equity
            if dd > self.max_dd:
                self.max_dd = dd
                if self.peak > 0:
                    with localcontext(MONEY):
                        self.max_dd_frac = (dd / self.peak).quantize(Decimal("1e-8"))
        if self.next_sample is None:
            self.next_sample = now_ns - now_ns % SAMPLE_NS + SAMPLE_NS
            self.curve.append(float(equity))
        while now_ns >= self.next_sample:  # a quiet stretch repeats the last value: flat returns
            self.curve.append(float(equity))
            self.next_sample += SAMPLE_NS

    def _bps(self, total: Decimal, qty: Decimal) -> float | None:
        """A quantity-weighted slippage in basis points of the average mid the fills were judged at."""
        if not qty or not self.mid_qty:
            return None
        return round(float(total / qty) / float(self.mid_notional / self.mid_qty) * 1e4, 3)

    def sharpe(self) -> float | None:
        returns = [(b - a) / a for a, b in zip(self.curve, self.curve[1:]) if a > 0]
        if len(returns) < 2:
            return None
        mean = sum(returns) / len(returns)
        var = sum((r - mean) ** 2 for r in returns) / (len(returns) - 1)
        if var <= 0:
            return None
        return mean / math.sqrt(var) * math.sqrt(STEPS_PER_DAY)

    def summary(self, events: int, orders: int, seconds: float, gaps: list[Gap], **extra) -> dict:
        """The summary as one JSON-ready map: money as decimal strings, ratios as floats (None
        where undefined). Keys: those of issue #12 plus a few more (`*_frac`, counts)."""
        net = self.equity - self.start_cash
        with localcontext(MONEY):
            gross = net + self.fees

        def avg(total: Decimal, qty: Decimal) -> str | None:
            if not qty:
                return None
            with localcontext(MONEY):
                return text((total / qty).quantize(Decimal("1e-8")))
        return {
            "events": events, "orders": orders, "fills": self.fills, "turnover": text(self.turnover),
            "gross_pnl": text(gross), "net_pnl": text(net), "fees": text(self.fees),
            "max_drawdown": text(self.max_dd), "max_drawdown_frac": text(self.max_dd_frac),
            "sharpe": self.sharpe(), "sharpe_period": "daily, from 1 s equity returns",
            "win_rate": (self.wins / self.trips) if self.trips else None, "round_trips": self.trips,
            "slippage_decision": avg(self.slip_decision, self.slip_decision_qty),
            "slippage_arrival": avg(self.slip_arrival, self.slip_arrival_qty),
            "slippage_decision_bps": self._bps(self.slip_decision, self.slip_decision_qty),
            "slippage_arrival_bps": self._bps(self.slip_arrival, self.slip_arrival_qty),
            "maker_share": float(self.maker_qty / self.qty) if self.qty else None,
            "events_per_s": round(events / seconds) if seconds > 0 else None,
            "gaps": [g.as_dict() for g in gaps],
            "start_cash": text(self.start_cash), "end_equity": text(self.equity),
            **extra,
        }

