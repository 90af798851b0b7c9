"""The report's figures from fills, equity snapshots and risk's state changes: pure (no I/O, no clock).

Why a fold over every fill rather than the API's answers: `/api/v1/stats` answers from the
tallies the broker keeps beside the fills (all time, no range), and a CSV export holds nothing
but fills; the report must give one answer from a database, the API and the export alike, over
any range. So the fills are folded here, oldest first, the ledger's way (services/report/trips.py,
held equal to shared/ledger.py's `Position`), and every figure follows the API's definition
(services/control/queries.py `stats`, `pnl`), to which tests/services/report/test_core.py holds
them on the same database:

- round trip: a position taken from flat back to flat, or through it (`Position.apply`); its
  P&L is realized minus the quote-asset fees since it opened. A win has P&L > 0 (zero is not a
  win). Profit factor: Σ wins / −Σ losses. The trips closed in the range count.
- net P&L: realized − quote fees + unrealized at the last fill price (`/api/v1/pnl`'s `net`);
  its change over the range, exact.
- Sharpe: the returns of the hourly equity closes (each UTC hour's last snapshot), mean over
  the sample standard deviation, × √8760. Sortino: the mean over the downside deviation
  (target 0), × √8760.
- max drawdown: the deepest fall below the running peak as a fraction of that peak (by amount
  when the peak is not above zero: a P&L curve from 0); its amount exact from the two points;
  its duration from the peak to the recovery, or to the range end when there was none.
- slippage: Σ slippage_arrival × qty (quote, exact), and in bp of Σ price × qty.
- maker share: maker fills / fills (and of the notional).

Money stays Decimal; the arrays the charts draw are float64. Feed `Tally.add()` every fill up to
the range end, oldest first (the positions at the range start need the fills before it), then
call `Tally.report()` once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Sequence

import numpy as np

from services.report.amounts import places, to_decimal, to_units
from services.report.trips import FillBatch, Holding, fold
from shared.enums import TradingState
from shared.money import MONEY, ZERO

NS = 1_000_000_000
HOUR_NS = 3600 * NS
DAY_NS = 86_400 * NS
HOURS_PER_YEAR = 24 * 365  # the API's annualisation of hourly returns
NO_END = 2**63 - 1
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ACTIVE = TradingState.ACTIVE.value


@dataclass(frozen=True, slots=True)
class EquitySeries:
    """Equity snapshots of the range, oldest first (by ts, then as stored), as exact text;
    `before`: the equity of the newest snapshot before the range start, when a start was asked
    and there is one (the starting balance)."""
    ts: Sequence[int]
    text: Sequence[str]
    before: str | None = None
    value: np.ndarray | None = None  # float64 of `text`, when the loader has it already


@dataclass(frozen=True, slots=True)
class StateChange:
    """A trading-state change risk stored (a `risk_events` row of kind STATE)."""
    ts: int
    state: str  # ACTIVE | REDUCING | HALTED | PAUSED_SHABBAT


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of time in one trading state other than ACTIVE, clipped to the report's range."""
    start: int
    end: int
    state: str


@dataclass(frozen=True, slots=True)
class Drawdown:
    """The deepest fall below a running peak: `fraction` of the peak (None when the peak was not
    above zero), `amount` exact; peak, trough and recovery times (recovery None: not recovered by
    `until`, the range end)."""
    fraction: float | None
    amount: Decimal
    peak_ts: int
    trough_ts: int
    recovered_ts: int | None
    until: int

    @property
    def duration_ns(self) -> int:
        return (self.recovered_ts if self.recovered_ts is not None else self.until) - self.peak_ts


@dataclass(frozen=True, slots=True)
class Curve:
    """What the equity and underwater charts draw. `derived`: no equity snapshots, so the curve is
    `start` plus the net P&L after each fill (marked at the last fill price); `start` is then the
    starting cash given, or None (a P&L curve from 0). `underwater`: below the running peak, as a
    fraction of it when every peak is above zero (`fractional`), else in quote."""
    ts: np.ndarray  # int64 ns
    value: np.ndarray  # float64, quote
    start: Decimal | None
    derived: bool
    underwater: np.ndarray  # float64, ≥ 0
    fractional: bool


@dataclass(frozen=True, slots=True)
class Report:
    """Every figure and array of the report (see the module docstring for their definitions)."""
    start: int | None  # the range shown, ns: as asked, else from the data (None: no data, none asked)
    end: int | None
    quote: str  # the quote asset of every symbol traded ("" when they differ or none is known)
    fills: int
    maker_fills: int
    maker_notional_share: float | None
    trips: int
    wins: int
    gross_win: Decimal
    gross_loss: Decimal  # ≤ 0
    trip_ts: np.ndarray  # int64: each trip's closing fill
    trip_pnl: np.ndarray  # float64, quote
    net_pnl: dict[str, Decimal]  # per quote asset
    fees: dict[str, Decimal]  # per asset paid in
    slippage_fills: int
    slippage_cost: dict[str, Decimal]  # per quote asset
    slippage_bps: float | None
    equity_start: Decimal | None  # the snapshots' (None for a derived curve)
    equity_end: Decimal | None
    curve: Curve | None  # None: fewer than two points
    drawdown: Drawdown | None
    hourly_closes: int
    sharpe: float | None
    sortino: float | None
    spans: tuple[Span, ...]
    states_from: int | None  # risk's states are known from here on (None: all, or none given)
    heat: np.ndarray  # (7, 24) float64: net P&L of the trips closed in each weekday × UTC hour
    heat_trips: np.ndarray  # (7, 24) int64

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.trips if self.trips else None

    @property
    def profit_factor(self) -> float | None:
        return float(self.gross_win) / float(-self.gross_loss) if self.gross_loss else None


@dataclass(slots=True)
class Tally:
    """Folds batches of fills (`add`, oldest first, every fill before `end`) into holdings and
    the range's figures; then `report()` makes the Report. `derive_curve`: keep the net P&L after
    each fill of the range, exact (for a source without equity snapshots: a CSV export)."""
    start: int | None = None  # the range [start, end) asked, ns; None: from the data
    end: int | None = None
    derive_curve: bool = False
    holdings: dict[str, Holding] = field(default_factory=dict)
    first_ts: int | None = None  # the first and last fill of the range
    last_ts: int | None = None
    fills: int = 0
    maker_fills: int = 0
    notional: float = 0.0
    maker_notional: float = 0.0
    fees: dict[str, Decimal] = field(default_factory=dict)
    slip_n: int = 0
    slip_cost: dict[str, Decimal] = field(default_factory=dict)
    trip_ts: list[int] = field(default_factory=list)
    trip_pnl: list[Decimal] = field(default_factory=list)
    net_start: dict[str, Decimal] | None = None  # net P&L per quote asset when the range began
    curve_ts: list[int] = field(default_factory=list)
    curve_net: list[Decimal] = field(default_factory=list)  # Σ net P&L after each fill (derive_curve)
    _total: Decimal = ZERO

    def add(self, b: FillBatch) -> None:
        """Book the batch's fills; count those of the range."""
        if self.end is not None and len(b) and b.ts.max() >= self.end:
            b = b.take(np.flatnonzero(b.ts < self.end))
        if not len(b):
            return
        if self.net_start is None:
            first = np.flatnonzero(b.ts >= self.start) if self.start is not None else np.zeros(1, dtype=np.int64)
            offset = int(first[0]) if len(first) else len(b)
            if offset:
                fold(self.holdings, b.take(slice(0, offset)))
            if offset == len(b):
                return
            self.net_start = self.net_by_quote()
            with localcontext(MONEY):
                self._total = sum(self.net_start.values(), ZERO)
            b = b.take(slice(offset, None))
        self._count(b)

    def _count(self, b: FillBatch) -> None:
        """Fold a batch of the range and count it in."""
        done = fold(self.holdings, b, net_delta=self.derive_curve)
        ts = b.ts.tolist()
        self.trip_ts += [ts[i] for i in done.trip_index]
        self.trip_pnl += done.trip_pnl
        if done.net_delta is not None:
            scale = max(done.scale, places(self._total))
            totals = np.cumsum(done.net_delta * 10 ** (scale - done.scale)) + to_units(self._total, scale)
            self.curve_ts += ts
            self.curve_net += [to_decimal(int(u), scale) for u in totals]
            self._total = self.curve_net[-1]
        lo, hi = int(b.ts.min()), int(b.ts.max())
        self.first_ts = lo if self.first_ts is None else min(self.first_ts, lo)
        self.last_ts = hi if self.last_ts is None else max(self.last_ts, hi)
        notional = b.price.floats() * b.qty.floats()
        self.fills += len(b)
        self.maker_fills += int(b.maker.sum())
        self.notional += float(notional.sum())
        self.maker_notional += float(notional[b.maker].sum())
        quote = np.array([self.holdings[s].quote for s in b.symbol.tolist()], dtype=object) \
            if len(set(b.symbol.tolist())) > 1 else np.full(len(b), self.holdings[b.symbol[0]].quote, dtype=object)
        paid_in = np.where(b.fee_asset == "", quote, b.fee_asset)  # no fee asset: the quote asset
        _add_units(self.fees, paid_in, b.fee.units, b.fee.scale)
        m = b.measured
        if m.any():
            _add_units(self.slip_cost, quote[m], b.slippage.units[m] * b.qty.units[m], b.slippage.scale + b.qty.scale)
            self.slip_n += int(m.sum())

    def net_by_quote(self) -> dict[str, Decimal]:
        """Net P&L so far per quote asset: realized − quote fees + unrealized at the last price."""
        out: dict[str, Decimal] = {}
        with localcontext(MONEY):
            for h in self.holdings.values():
                out[h.quote] = out.get(h.quote, ZERO) + h.net
        return out

    def report(self, equity: EquitySeries | None = None, changes: Sequence[StateChange] = (),
               states_from: int | None = None, start_cash: Decimal | None = None) -> Report:
        """The Report of what was added. `equity`: the range's snapshots (None or empty: the curve
        is derived from the fills when `derive_curve`); `changes`: risk's state changes up to the
        range end, oldest first; `states_from`: the first time they are known from (None: every
        change is given); `start_cash`: the starting balance of a derived curve."""
        eq_ts, eq_text, eq_value = _equity_arrays(equity)
        lo, hi = self._range(eq_ts)
        end_net = self.net_by_quote()
        start_net = self.net_start if self.net_start is not None else end_net
        with localcontext(MONEY):
            net = {q: v - start_net.get(q, ZERO) for q, v in sorted(end_net.items())}
            gross_win = sum((x for x in self.trip_pnl if x > 0), ZERO)
            gross_loss = sum((x for x in self.trip_pnl if x < 0), ZERO)
            slip_total = sum(self.slip_cost.values(), ZERO)
        quotes = {h.quote for h in self.holdings.values()}
        quote = quotes.pop() if len(quotes) == 1 else ""
        pnl = np.array([float(x) for x in self.trip_pnl], dtype=np.float64)
        trip_ts = np.array(self.trip_ts, dtype=np.int64)
        curve, exact, equity_start, equity_end = self._curve(equity, (eq_ts, eq_text, eq_value), lo, start_cash)
        drawdown, closes, sharpe, sortino = None, 0, None, None
        if curve is not None:
            drawdown = max_drawdown(curve.ts, curve.value, exact, hi if hi is not None else int(curve.ts[-1]))
            if not curve.derived or (curve.start is not None and curve.start > 0):
                hourly = hourly_closes(curve.ts, curve.value)
                closes = len(hourly)
                sharpe, sortino = ratios(hourly)
        heat, heat_n = heatmap(trip_ts, pnl)
        return Report(
            start=lo, end=hi, quote=quote, fills=self.fills, maker_fills=self.maker_fills,
            maker_notional_share=self.maker_notional / self.notional if self.notional else None,
            trips=len(self.trip_pnl), wins=sum(1 for x in self.trip_pnl if x > 0), gross_win=gross_win,
            gross_loss=gross_loss, trip_ts=trip_ts, trip_pnl=pnl, net_pnl=net, fees=dict(sorted(self.fees.items())),
            slippage_fills=self.slip_n, slippage_cost=dict(sorted(self.slip_cost.items())),
            slippage_bps=float(slip_total) * 10_000 / self.notional if self.slip_n and self.notional else None,
            equity_start=equity_start, equity_end=equity_end, curve=curve, drawdown=drawdown,
            hourly_closes=closes, sharpe=sharpe, sortino=sortino,
            spans=tuple(state_spans(changes, lo, hi, states_from)) if lo is not None else (),
            states_from=states_from,
            heat=heat, heat_trips=heat_n)

    def _range(self, eq_ts: np.ndarray) -> tuple[int | None, int | None]:
        """The range shown: as asked, else from the first to the last fill or snapshot in it;
        (None, None) with neither."""
        firsts = [t for t in (self.first_ts, int(eq_ts[0]) if len(eq_ts) else None) if t is not None]
        lasts = [t for t in (self.last_ts, int(eq_ts[-1]) if len(eq_ts) else None) if t is not None]
        lo = self.start if self.start is not None else min(firsts, default=None)
        hi = self.end if self.end is not None else max(lasts, default=None)
        lo = hi if lo is None else lo
        hi = lo if hi is None else max(hi, lo)
        return lo, hi

    def _curve(self, equity: EquitySeries | None, snapshots: tuple[np.ndarray, list[str], np.ndarray],
               lo: int | None, start_cash: Decimal | None):
        """(Curve or None, its exact values, the snapshots' start and end equity or None)."""
        ts, exact, value = snapshots
        if len(ts):
            before = equity.before if equity is not None else None
            if before is not None and lo is not None and lo < ts[0]:
                ts, exact = np.concatenate(([lo], ts)).astype(np.int64), [before, *exact]
                value = np.concatenate(([float(before)], value))
            curve_start, derived = Decimal(exact[0]), False
            equity_start, equity_end = curve_start, Decimal(exact[-1])
        elif self.derive_curve and self.curve_ts:
            base = start_cash if start_cash is not None else ZERO
            with localcontext(MONEY):
                first = sum(self.net_start.values(), ZERO) if self.net_start else ZERO
                exact = [base + first, *(base + v for v in self.curve_net)]
            ts = np.array([min(lo if lo is not None else self.curve_ts[0], self.curve_ts[0]), *self.curve_ts],
                          dtype=np.int64)
            value = np.array([float(v) for v in exact], dtype=np.float64)
            curve_start, derived = start_cash, True
            equity_start = equity_end = None
        else:
            return None, [], None, None
        if len(ts) < 2:
            return None, [], equity_start, equity_end
        under, fractional = underwater(value)
        return Curve(ts, value, curve_start, derived, under, fractional), exact, equity_start, equity_end


def _add_units(sums: dict[str, Decimal], keys: np.ndarray, units: np.ndarray, scale: int) -> None:
    """sums[k] += Σ units where keys == k, for each k (units / 10**scale: exact)."""
    kinds = sorted(set(keys.tolist()))
    for key in kinds:
        total = int(units.sum() if len(kinds) == 1 else units[keys == key].sum())
        with localcontext(MONEY):
            sums[key] = sums.get(key, ZERO) + to_decimal(total, scale)


def _equity_arrays(equity: EquitySeries | None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The snapshots' times, texts and values, sorted by time (stable: as given within a time)."""
    if equity is None or not len(equity.ts):
        return np.zeros(0, dtype=np.int64), [], np.zeros(0)
    ts = np.asarray(equity.ts, dtype=np.int64)
    text = list(equity.text)
    value = equity.value if equity.value is not None else np.array(text, dtype=np.float64)
    if len(ts) > 1 and not (np.diff(ts) >= 0).all():
        order = np.argsort(ts, kind="stable")
        ts, text, value = ts[order], [text[i] for i in order.tolist()], value[order]
    return ts, text, value


def underwater(value: np.ndarray) -> tuple[np.ndarray, bool]:
    """How far each point is below the running peak: as a fraction of the peak when every peak
    is above zero (True), else in the curve's units (False)."""
    peak = np.maximum.accumulate(value)
    below = peak - value
    if len(peak) and peak[0] > 0:  # the running peak only rises: the first is the smallest
        return below / peak, True
    return below, False


def max_drawdown(ts: np.ndarray, value: np.ndarray, exact: Sequence, until: int) -> Drawdown | None:
    """The deepest fall below the running peak (by fraction of the peak when every peak is above
    zero, else by amount), with the exact amount from `exact` (texts or Decimals of `value`) and
    its timing; None for fewer than two points."""
    if len(value) < 2:
        return None
    under, fractional = underwater(value)
    worst = int(np.argmax(under))  # the first of the deepest
    peak_value = np.maximum.accumulate(value)[worst]
    at_peak = np.flatnonzero(value[:worst + 1] >= peak_value)
    peak_i = int(at_peak[-1])  # the last time at the peak before the trough
    later = np.flatnonzero(value[worst + 1:] >= peak_value)
    recovered = int(ts[worst + 1 + later[0]]) if len(later) else None
    with localcontext(MONEY):
        amount = Decimal(exact[peak_i]) - Decimal(exact[worst])
    if not under[worst]:
        return Drawdown(0.0 if fractional else None, ZERO, int(ts[peak_i]), int(ts[worst]), int(ts[worst]), until)
    return Drawdown(float(under[worst]) if fractional else None, amount, int(ts[peak_i]), int(ts[worst]),
                    recovered, max(until, int(ts[-1])))


def hourly_closes(ts: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Each UTC hour's last value (ts sorted; within an hour the last given), oldest first."""
    if not len(ts):
        return np.zeros(0)
    hour = ts // HOUR_NS
    last = np.flatnonzero(np.diff(hour) != 0)
    return value[np.append(last, len(ts) - 1)]


def ratios(closes: np.ndarray) -> tuple[float | None, float | None]:
    """(Sharpe, Sortino) of the returns between consecutive closes (those from a close above
    zero), annualised by √8760; None with fewer than two returns or no spread (no downside)."""
    a, b = closes[:-1], closes[1:]
    ok = a > 0
    r = b[ok] / a[ok] - 1
    if len(r) < 2:
        return None, None
    mean = float(r.mean())
    sd = float(r.std(ddof=1))
    down = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    scale = math.sqrt(HOURS_PER_YEAR)
    return (mean / sd * scale if sd > 0 else None), (mean / down * scale if down > 0 else None)


def heatmap(ts: np.ndarray, pnl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ P&L and the count of the trips closed in each (weekday Mon..Sun, UTC hour) cell."""
    grid, count = np.zeros((7, 24)), np.zeros((7, 24), dtype=np.int64)
    if len(ts):
        weekday = (ts // DAY_NS + 3) % 7  # 1970-01-01 was a Thursday
        hour = (ts // HOUR_NS) % 24
        np.add.at(grid, (weekday, hour), pnl)
        np.add.at(count, (weekday, hour), 1)
    return grid, count


def state_spans(changes: Sequence[StateChange], lo: int, hi: int, known_from: int | None = None) -> list[Span]:
    """The stretches of [lo, hi] risk spent in a state other than ACTIVE, from its changes
    (oldest first). Before the first change the state is ACTIVE, or unknown (not shaded) when
    the changes are known only from `known_from` on."""
    out: list[Span] = []
    state, since = (_ACTIVE if known_from is None else None), lo
    for change in sorted(changes, key=lambda c: c.ts):
        if change.ts >= hi:
            break
        if change.state == state:
            continue
        if state not in (None, _ACTIVE) and change.ts > lo:
            out.append(Span(max(since, lo), change.ts, state))
        state, since = change.state, change.ts
    if state not in (None, _ACTIVE) and hi > max(since, lo):
        out.append(Span(max(since, lo), hi, state))
    return out
