"""Stateful guards with time as an argument: order-rate token buckets, the loss-streak pause, circuit breakers."""
from __future__ import annotations

from collections import OrderedDict, deque
from decimal import Decimal

from shared.enums import TradingState

SECOND_NS = 1_000_000_000
STRATEGIES_MAX = 1024  # buckets kept; a flood of made-up strategy names cannot grow memory


class TokenBucket:
    """`capacity` tokens, refilled evenly over `period_ns`; starts full. Integer
    arithmetic (one token = `period_ns` units), so it is exact and deterministic."""

    __slots__ = ("capacity", "period", "full", "level", "t")

    def __init__(self, capacity: int, period_ns: int, now_ns: int) -> None:
        self.capacity, self.period = capacity, period_ns
        self.level = self.full = capacity * period_ns
        self.t = now_ns

    def _refill(self, now_ns: int) -> None:
        if now_ns > self.t:  # a clock that steps back refills nothing
            level = self.level + (now_ns - self.t) * self.capacity
            self.level = level if level < self.full else self.full
            self.t = now_ns

    def available(self, now_ns: int) -> bool:
        """Whether one token can be taken at `now_ns`."""
        self._refill(now_ns)
        return self.level >= self.period

    def take(self, now_ns: int) -> None:
        """Take one token (call after `available`)."""
        self._refill(now_ns)
        self.level -= self.period


TOTAL_FACTOR = 4  # all strategies together: this many strategies' worth of orders a second and a minute


class RateLimiter:
    """Per strategy: `per_s` orders a second and `per_min` a minute, each a token bucket; and all
    strategies together TOTAL_FACTOR times that. The strategy is a name its client sends: a client
    that made up a new one for every order passed the limit 299 times in 0.2 s, and a flood of
    names evicted a real strategy's buckets (STRATEGIES_MAX) and so refilled them."""

    def __init__(self, per_s: int, per_min: int) -> None:
        self.per_s, self.per_min = per_s, per_min
        self.buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self.total: tuple[TokenBucket, TokenBucket] | None = None  # made at the first order (its time)

    def _total(self, now_ns: int) -> bool:
        """Whether the shared buckets have a token each (refilled to `now_ns`, nothing taken)."""
        if self.total is None:
            self.total = (TokenBucket(self.per_s * TOTAL_FACTOR, SECOND_NS, now_ns),
                          TokenBucket(self.per_min * TOTAL_FACTOR, 60 * SECOND_NS, now_ns))
        return self.total[0].available(now_ns) and self.total[1].available(now_ns)

    def allows(self, strategy: str, now_ns: int) -> bool:
        """Whether `strategy` may send one more order at `now_ns` (nothing is taken)."""
        pair = self.buckets.get(strategy)
        return self._total(now_ns) and (pair is None or (pair[0].available(now_ns) and pair[1].available(now_ns)))

    def acquire(self, strategy: str, now_ns: int) -> bool:
        """Take a token of both buckets of `strategy` when both have one; returns whether it did.
        The same as `allows` then `take`, refilled and taken here in one call: it is on every
        approved order's path, where each call costs."""
        if not self._total(now_ns):
            return False
        pair = self.buckets.get(strategy)
        if pair is None:
            self.take(strategy, now_ns)
            return True
        sec, mnt = pair
        sec._refill(now_ns)
        if sec.level < sec.period:
            return False
        mnt._refill(now_ns)
        if mnt.level < mnt.period:
            return False
        sec.level -= sec.period
        mnt.level -= mnt.period
        self.buckets.move_to_end(strategy)
        self.total[0].take(now_ns)
        self.total[1].take(now_ns)
        return True

    def take(self, strategy: str, now_ns: int) -> None:
        """Count one approved order of `strategy` at `now_ns`."""
        pair = self.buckets.get(strategy)
        if pair is None:
            pair = self.buckets[strategy] = (TokenBucket(self.per_s, SECOND_NS, now_ns),
                                             TokenBucket(self.per_min, 60 * SECOND_NS, now_ns))
            if len(self.buckets) > STRATEGIES_MAX:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(strategy)
        pair[0].take(now_ns)
        pair[1].take(now_ns)
        self._total(now_ns)
        self.total[0].take(now_ns)
        self.total[1].take(now_ns)


class LossStreak:
    """After freqtrade's StoplossGuard: `n` losing round trips within `window_ns` pause
    entries for `pause_ns` from the last of them; then counting starts afresh. n = 0: off."""

    def __init__(self, n: int, window_ns: int, pause_ns: int) -> None:
        self.n, self.window, self.pause = n, window_ns, pause_ns
        self.losses: deque[int] = deque()
        self.paused_until = 0

    def on_trip(self, pnl: Decimal, ts: int) -> bool:
        """Record a round trip's net P&L at `ts`; returns True when this one starts a pause."""
        if not self.n or pnl >= 0:
            return False
        self.losses.append(ts)
        while self.losses and self.losses[0] < ts - self.window:
            self.losses.popleft()
        if len(self.losses) < self.n:
            return False
        self.paused_until = max(self.paused_until, ts + self.pause)
        self.losses.clear()
        return True

    def paused(self, now_ns: int) -> bool:
        return now_ns < self.paused_until


# Breaker keys, each with the state it imposes when it fires.
DAILY_LOSS, DAILY_LOSS_SOFT = "DAILY_LOSS", "DAILY_LOSS_SOFT"
MAX_DRAWDOWN, DRAWDOWN_SOFT = "MAX_DRAWDOWN", "DRAWDOWN_SOFT"
BREAKER_STATE = {DAILY_LOSS: TradingState.HALTED, DAILY_LOSS_SOFT: TradingState.REDUCING,
                 MAX_DRAWDOWN: TradingState.HALTED, DRAWDOWN_SOFT: TradingState.REDUCING}
DAILY_KEYS = frozenset({DAILY_LOSS, DAILY_LOSS_SOFT})


def breaches(equity: Decimal, day_start: Decimal | None, peak: Decimal | None, daily_loss: Decimal,
             daily_loss_soft: Decimal, max_drawdown: Decimal, drawdown_soft: Decimal) -> set[str]:
    """The breaker keys whose condition holds: a loss since `day_start` or a drawdown from
    `peak` of at least the given fraction (0 turns a breaker off). Exact: no division."""
    out = set()
    if day_start is not None and day_start > 0:
        loss = day_start - equity
        if daily_loss and loss >= daily_loss * day_start:
            out.add(DAILY_LOSS)
        if daily_loss_soft and loss >= daily_loss_soft * day_start:
            out.add(DAILY_LOSS_SOFT)
    if peak is not None and peak > 0:
        down = peak - equity
        if max_drawdown and down >= max_drawdown * peak:
            out.add(MAX_DRAWDOWN)
        if drawdown_soft and down >= drawdown_soft * peak:
            out.add(DRAWDOWN_SOFT)
    return out


SEVERITY = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}
