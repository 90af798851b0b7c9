"""Pure risk core: the trading state, the pre-trade gate over the checks, working orders, P&L and breakers."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, getcontext, localcontext, setcontext
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, NamedTuple

from services.risk import checks as ck
from services.risk import balances as bal
from services.risk.balances import Balances, FeeRates, Pricing, band_of, is_spot
from services.risk.checks import Reason
from services.risk.guards import (BREAKER_STATE, DAILY_KEYS, SEVERITY, LossStreak, RateLimiter, breaches)
from services.risk.limits import RiskLimits
from shared.enums import TERMINAL_STATUSES, ControlAction, OrderKind, OrderStatus, Side, TradingState
from shared.ledger import Ledger
from shared.money import MONEY, STEP, ZERO, from_book_float, text
from shared.messages import OrderRequest
from shared.shabbat import FLATTEN, PAUSED, phase_at

if TYPE_CHECKING:
    from shared.config import Config
    from shared.shabbat import Calendar, Pause

DAY_NS = 86_400 * 1_000_000_000
UNCERTAIN_NS = 10 * 1_000_000_000  # an order whose fate the broker never told us counts this long at most
MINUTE_NS = 60 * 1_000_000_000
NEVER = 1 << 63  # later than any ns timestamp
FLATTEN_IDS_KEPT = 1024  # ids of risk's own flatten orders remembered (exempt from a pause)
TARGET = {ControlAction.HALT: TradingState.HALTED, ControlAction.RESUME: TradingState.ACTIVE,
          ControlAction.FLATTEN: TradingState.REDUCING}


@dataclass(frozen=True, slots=True)
class Denial:
    """A pre-trade rejection: data, not an exception."""
    code: str
    text: str

    def as_reason(self) -> dict:
        return {"code": self.code, "text": self.text}


@dataclass(frozen=True, slots=True)
class Approval:
    """The order may go to the broker with `qty` (less than asked when `adjusted`)."""
    qty: Decimal
    adjusted: bool = False


@dataclass(frozen=True, slots=True)
class StateChange:
    """A trading-state transition, to be persisted and published by the shell."""
    ts: int
    state: TradingState
    previous: TradingState
    code: str  # HALT / RESUME / FLATTEN, a breaker key, NEW_DAY, or SHABBAT_FLATTEN / SHABBAT / SHABBAT_END
    reason: str
    by: str


@dataclass(slots=True)
class Working:
    """An order that may still fill: resting at the broker, or of unknown fate until `expires_ns`."""
    symbol: str
    side: Side
    qty: Decimal
    remaining: Decimal
    rests: bool
    expires_ns: int = 0  # 0: known to the broker


class OpenOrder(NamedTuple):
    """An order the broker holds open, as `replay` takes it back after a restart; `price`: a LIMIT
    order's (what its reservation is priced at), None for a MARKET order (priced at the mid)."""
    client_order_id: str
    symbol: str
    side: Side
    qty: Decimal
    remaining: Decimal
    rests: bool
    price: Decimal | None = None


class RiskEngine:
    """Pre-trade checks, trading state, working orders, the ledger and the breakers.
    Pure: time comes in as `now_ns`, and nothing here does I/O. The engine owns its state;
    its fields are for reading (tests, summaries), and the shells hand over through methods:

    - events in: `on_book`, `book_fills` / `settle_order` (the broker's vetted word),
      `on_order`, `on_sent`, `control`, `expire`;
    - the gate: `check` for a new order, `recheck` for a retry of one whose fate is unsure;
    - after each batch of events: `evaluate_due(now_ns)` (when `needs_evaluation`);
    - state changes to store and publish: `take_changes()` (pending while `has_changes`);
    - checkpoints: `figures_changed` says the figures of `snapshot()` moved since the shell
      last stored them, `figures_stored()` once it did;
    - what the desk vets against: `working_order`, `cancellable_ids`, `marks`, `booked_for`,
      `has_fill`.

    The spot account (`balances`, services/risk/balances.py): `start_balances` per asset (None:
    `start_cash` in the quote asset of each traded spot symbol), moved by every booked fill;
    each working order on a spot symbol holds what it may still spend, priced with `fees`
    (None: no fees), and no order may spend more than is free (INSUFFICIENT_BALANCE). Orders
    for USD-M symbols are denied (UNSUPPORTED_MARKET); their books are still kept and marked.

    The Shabbat and Yom Tov pauses (`calendar`, shared/shabbat.py; None: none kept): `state` is
    the state in force, `held` the one operators and breakers set (HALT, RESUME, FLATTEN, the
    breakers, the new day), which is what a checkpoint stores. From `flatten_ns` before a pause
    starts the state in force is REDUCING (code SHABBAT_FLATTEN: the shell cancels and closes
    through `flatten_orders`), from its start to its end PAUSED_SHABBAT (SHABBAT: every new order
    is denied SHABBAT but risk's own closing orders), then `held` again (SHABBAT_END): trading
    resumes by itself, unless an operator HALT came meanwhile (HALTED outranks a pause). The
    phase comes from the calendar and `now_ns` alone (`on_clock`), never from memory, so an engine
    rebuilt during a pause is paused at once."""

    def __init__(self, limits: RiskLimits, start_cash: Decimal, *,
                 start_balances: Mapping[str, Decimal] | None = None, fees: FeeRates | None = None,
                 calendar: "Calendar | None" = None, flatten_ns: int = 15 * MINUTE_NS) -> None:
        self.limits = limits
        self.stale_ns = limits.stale_ns
        self.ledger = Ledger(start_cash)
        self.fees = fees if fees is not None else FeeRates()
        self.balances = Balances(bal.start_balances(start_balances or {}, limits.rules, start_cash))
        self.pricing = Pricing(self.fees, band_of(limits.price_band_bps, limits.fill_band_bps), limits.rules)
        self.state, self.state_code, self.state_reason, self.state_by, self.state_ts = (
            TradingState.ACTIVE, "", "", "", 0)
        # the state operators and breakers set, beneath a pause (a checkpoint stores this one)
        self.held, self.held_code, self.held_reason, self.held_by, self.held_ts = (
            TradingState.ACTIVE, "", "", "", 0)
        self.calendar = calendar
        self.flatten_ns = flatten_ns
        self.pause_phase = ""  # "", FLATTEN or PAUSED (shared/shabbat.py phase_at)
        self.pause: "Pause | None" = None  # the pause of the phase (the next one when trading)
        # the phase may change at this instant (phase_at's until_ns); never without a calendar, so
        # `check` does not even call on_clock then
        self._pause_until = -1 if calendar is not None else NEVER
        self._flatten_ids: dict[str, None] = {}  # risk's own closing orders: they pass a pause
        self.book_ns: dict[str, int] = {}
        self._mids: dict[str, Decimal] = {}  # symbol -> the last two-sided book's mid (`marks`)
        self.working: dict[str, Working] = {}
        self.exposure: dict[tuple[str, Side], Decimal] = {}
        self.rates = RateLimiter(limits.orders_per_s, limits.orders_per_min)
        self.streak = LossStreak(limits.loss_streak, limits.loss_window_ns, limits.loss_pause_ns)
        self.peak: Decimal | None = None
        self.day: int | None = None
        self.day_start: Decimal | None = None
        self.tripped: set[str] = set()
        self._changes: list[StateChange] = []  # handed over by take_changes()
        self._dirty = False  # figures_changed / figures_stored()
        self.replaying = False  # while rebuilding from fills: no peaks, days or breakers
        self._moved = False  # a mark or fill since the last evaluate(): needs_evaluation
        # The checks' arithmetic runs in this copy of MONEY, switched to and back per order:
        # localcontext() makes a new copy each time, and that cost every order a microsecond.
        self._money = MONEY.copy()

    @classmethod
    def from_config(cls, limits: RiskLimits, cfg: "Config") -> "RiskEngine":
        """The engine of `cfg`: QF_START_CASH, QF_START_BALANCES and the broker's fees.
        Raises UnknownAsset (a ConfigError) for a spot symbol of no known quote asset."""
        from shared.shabbat import calendar_from
        b, sh = cfg.broker, cfg.shabbat
        return cls(limits, b.start_cash, start_balances=bal.parse_balances(b.start_balances),
                   fees=FeeRates(b.taker_fee, b.maker_fee, b.fee_asset),
                   calendar=calendar_from(sh) if sh.pause else None, flatten_ns=sh.flatten_min * MINUTE_NS)

    # -- the gate --------------------------------------------------------------------------

    def check(self, order: OrderRequest, now_ns: int) -> Approval | Denial:
        """Approve `order` at `now_ns` (taking a rate token), cut it to what fits (ADJUSTED),
        or deny it with the first failing check: symbol, qty, price, state, stale book,
        price band, notional, open orders, loss pause, position limits, rate."""
        if now_ns >= self._pause_until:
            self.on_clock(now_ns)  # a pause starts or ends at its minute, whatever came before
        if self._moved:
            self.evaluate(now_ns)  # the breakers judge the latest marks and fills first
        rules = self.limits.rules.get(order.symbol)
        if rules is None:
            return self._deny(Reason.UNKNOWN_SYMBOL, order, ZERO, ZERO)
        if not is_spot(order.symbol):
            return self._deny(Reason.UNSUPPORTED_MARKET, order, ZERO, ZERO)
        outer = getcontext()
        setcontext(self._money)  # products of prices and quantities, exact
        try:
            return self._check(order, rules, now_ns)
        finally:
            setcontext(outer)

    def recheck(self, order: OrderRequest, now_ns: int) -> Approval | Denial:
        """`check` for a retry of an order risk may count already: one sent whose answer did not
        come in time, tracked by `on_sent` until its expiry. While the retry is judged, the earlier
        attempt stops counting (it would count twice); denied, the earlier attempt counts again
        just as before (the broker may have it), until settled or expired. Approved, the shell
        sends it and `on_sent` tracks it afresh. An order not tracked, or known to the broker
        (no expiry), is just checked."""
        unsure = self.working.get(order.client_order_id)
        if unsure is None or not unsure.expires_ns:
            return self.check(order, now_ns)
        coid, remaining = order.client_order_id, unsure.remaining  # untrack() zeroes unsure.remaining
        held = self.balances.holds.get(coid)
        self.untrack(coid)
        verdict = self.check(order, now_ns)
        if type(verdict) is Denial:
            self.track(coid, unsure.symbol, unsure.side, unsure.qty, remaining, unsure.rests, unsure.expires_ns)
            if held is not None:  # as it held before, not repriced at today's mid
                self.balances.hold(coid, held.asset, held.unit, remaining)
        return verdict

    def _check(self, order: OrderRequest, rules: ck.SymbolRules, now_ns: int) -> Approval | Denial:
        side, qty, symbol = order.side, order.qty, order.symbol
        held = self.ledger.positions.get(symbol)
        pos = ZERO if held is None else held.qty
        working = self.exposure.get((symbol, side), ZERO)
        code = (ck.check_qty(qty, rules) or ck.check_price(order.kind, order.price, rules)
                or ck.check_state(self.state, pos, working, side, qty, order.client_order_id in self._flatten_ids)
                or ck.check_book(self.book_ns.get(symbol), now_ns, self.stale_ns))
        if code:
            return self._deny(code, order, pos, working)
        mid = self._mids.get(symbol)
        if mid is None:  # books came, but never a two-sided one
            return self._deny(Reason.STALE_BOOK, order, pos, working)
        ref = order.price if order.kind is OrderKind.LIMIT else mid
        rests = order.kind is OrderKind.LIMIT and order.tif.rests  # GTC or post-only GTX
        code = (ck.check_band(order.kind, order.price, mid, self.limits.price_band_bps)
                or ck.check_notional(qty * ref, rules)
                or (rests and ck.check_open_orders(True, sum(w.rests for w in self.working.values()),
                                                   self.limits.max_open_orders)) or None)
        if not code and self.streak.paused(now_ns) and not ck.reduces_position(pos, side, qty):
            code = Reason.LOSS_COOLDOWN
        adjusted = False
        if not code:
            code = ck.check_position(pos, working, side, qty, ref, rules)
            if code and self.limits.adjust:
                fit = min(qty, ck.position_room(pos, working, side, ref, rules))
                if fit > 0 and fit * ref >= rules.min_notional:
                    code, qty, adjusted = None, fit, True
        if not code:
            held = self.pricing.unit(symbol, side, order.price if order.kind is OrderKind.LIMIT else None, mid)
            if held is None:  # a spot symbol of no known quote asset: nothing to spend it from
                return self._deny(Reason.UNKNOWN_SYMBOL, order, pos, working, "no known quote asset")
            asset, unit = held
            needed, free = qty * unit, self.balances.free(asset)
            if needed > free:
                return self._deny(Reason.INSUFFICIENT_BALANCE, order, pos, working,
                                  f"needs {text(needed)} {asset}, {text(free)} {asset} free")
        if not code and not self.rates.acquire(order.strategy, now_ns):  # last: only approvals take a token
            code = Reason.RATE_LIMIT
        if code:
            return self._deny(code, order, pos, working)
        return Approval(qty, adjusted)

    def _deny(self, code: str, order: OrderRequest, pos: Decimal, working: Decimal, detail: str = "") -> Denial:
        head = f"{ck.TEXTS[code]}: {detail}" if detail else ck.TEXTS[code]
        return Denial(code, f"{head} ({order.side.value} {order.qty} {order.symbol[:24]}, "
                            f"position {text(pos)}, working {text(working)}, state {self.state.value})")

    # -- trading state -----------------------------------------------------------------------

    def control(self, action: ControlAction, by: str, reason: str, now_ns: int) -> bool:
        """HALT → HALTED, RESUME → ACTIVE, FLATTEN → REDUCING (the shell then sends the closing
        orders), STATE → nothing. Returns whether the state changed."""
        if action is ControlAction.STATE:
            return False
        return self._set_state(TARGET[action], action.value, reason, by, now_ns)

    @property
    def has_changes(self) -> bool:
        """Whether state changes wait for `take_changes`."""
        return bool(self._changes)

    def take_changes(self) -> list[StateChange]:
        """The state changes since the last call, oldest first, for the shell to store, then
        publish; they are no longer pending."""
        changes, self._changes = self._changes, []
        return changes

    def _set_state(self, state: TradingState, code: str, reason: str, by: str, now_ns: int) -> bool:
        """Operators and breakers set `held`; the state in force follows unless a pause holds it
        (then it takes `held` when the pause ends). Returns whether `held` changed."""
        if state is self.held:
            return False
        self.held, self.held_code, self.held_reason, self.held_by, self.held_ts = state, code, reason, by, now_ns
        self._dirty = True
        self._enforce(code, reason, by, now_ns)
        return True

    def _in_force(self) -> TradingState:
        held = self.held
        if held is TradingState.HALTED:
            return held  # an operator's or a breaker's halt outranks a pause
        if self.pause_phase == PAUSED:
            return TradingState.PAUSED_SHABBAT
        if self.pause_phase == FLATTEN:
            return TradingState.REDUCING
        return held

    def _enforce(self, code: str, reason: str, by: str, now_ns: int) -> None:
        """The state in force from `held` and the pause; a change is recorded (`take_changes`)."""
        state = self._in_force()
        if state is self.state:
            return
        self._changes.append(StateChange(now_ns, state, self.state, code, reason, by))
        self.state, self.state_code, self.state_reason, self.state_by, self.state_ts = (
            state, code, reason, by, now_ns)

    # -- the Shabbat and Yom Tov pauses ----------------------------------------------------------

    def on_clock(self, now_ns: int) -> None:
        """The calendar's phase at `now_ns` (the shells call this every loop turn or step, `check`
        before judging): entering the flatten window, the pause or its end changes the state in
        force (SHABBAT_FLATTEN, SHABBAT, SHABBAT_END). O(1) between the instants it can change."""
        if self.calendar is None or now_ns < self._pause_until:
            return
        phase, pause, self._pause_until = phase_at(self.calendar, now_ns, self.flatten_ns)
        if phase == self.pause_phase and (phase == "" or pause == self.pause):
            self.pause = pause
            return
        ended, self.pause_phase, self.pause = self.pause, phase, pause
        if phase == PAUSED:
            code, reason = "SHABBAT", f"{pause.name}: from {_local(pause.start)} to {_local(pause.end)}"
        elif phase == FLATTEN:
            code, reason = "SHABBAT_FLATTEN", (f"{pause.name} starts at {_local(pause.start)}: entries stop, "
                                               f"working orders are cancelled, positions closed")
        else:
            code = "SHABBAT_END"
            reason = f"{ended.name} ended at {_local(ended.end)}" if ended is not None else "the pause ended"
            if self.held is not TradingState.ACTIVE:
                reason += f"; {self.held.value} stays ({self.held_code}: {self.held_reason})"
        self._enforce(code, reason, "calendar", now_ns)

    @property
    def pause_next_ns(self) -> int | None:
        """When the calendar's phase may next change (None: no calendar): a shell whose clock jumps
        (a replay) calls `on_clock` at this instant so the change lands on its minute."""
        return None if self.calendar is None else max(self._pause_until, 0)

    def held_positions(self) -> dict[str, str]:
        """symbol -> position (decimal text) of every position not flat."""
        return {s: text(p.qty) for s, p in sorted(self.ledger.positions.items()) if p.qty}

    @property
    def flatten_due(self) -> bool:
        """In the flatten window or a pause with a position or a working order left: what the
        shell's flatten (cancels, then closing orders through `flatten_orders`) is for."""
        if self.pause_phase not in (FLATTEN, PAUSED) or self.state is TradingState.HALTED:
            return False
        return bool(self.working) or any(p.qty for p in self.ledger.positions.values())

    def evaluate(self, now_ns: int) -> None:
        """Roll the day, track the peak, and fire the breakers whose condition newly holds
        (edge-triggered: one that fired fires again only after its condition cleared).
        Waits until every open position has a book mark (after a restart, until books came).
        Marks and fills only flag the figures as moved: the shell evaluates once per batch of
        events (off the reply path), and `check` first if it has not."""
        if self.replaying:
            return
        self._moved = False
        for pos in self.ledger.positions.values():
            if pos.qty and pos.mark is None:
                return  # an open position not yet marked at a book mid: no figure to judge by
        limits = self.limits
        equity = self.ledger.equity()
        day = now_ns // DAY_NS
        if day != self.day:
            self.day, self.day_start, self._dirty = day, equity, True
            self.tripped -= DAILY_KEYS
            if limits.day_reset and self.held_code in DAILY_KEYS:
                self._set_state(TradingState.ACTIVE, "NEW_DAY", "a new UTC day lifts the daily-loss state",
                                "risk", now_ns)
        if self.peak is None or equity > self.peak:
            self.peak, self._dirty = equity, True
        holding = breaches(equity, self.day_start, self.peak, limits.daily_loss, limits.daily_loss_soft,
                           limits.max_drawdown, limits.drawdown_soft)
        if holding == self.tripped:
            return
        fired = holding - self.tripped
        self.tripped, self._dirty = holding, True
        if fired:
            key = max(fired, key=lambda k: (SEVERITY[BREAKER_STATE[k]], k))
            target = BREAKER_STATE[key]
            if SEVERITY[target] > SEVERITY[self.held]:
                self._set_state(target, key, f"equity {text(equity)}, day start {text(self.day_start)}, "
                                             f"peak {text(self.peak)}", "risk", now_ns)

    @property
    def needs_evaluation(self) -> bool:
        """A mark or fill came since the last `evaluate`: the figures are to be judged."""
        return self._moved

    def evaluate_due(self, now_ns: int) -> None:
        """`evaluate` if marks or fills moved since the last one; else nothing (the shell calls
        this after each batch of events)."""
        if self._moved:
            self.evaluate(now_ns)

    # -- events ------------------------------------------------------------------------------

    def on_book(self, symbol: str, mid: float | Decimal, now_ns: int) -> None:
        """A book for `symbol` arrived at `now_ns`; its mid (when two-sided) becomes the mark
        (judged by the next `evaluate`)."""
        if symbol not in self.limits.rules:
            return  # nothing to mark, and a stranger's symbols must not grow our maps
        self.book_ns[symbol] = now_ns
        mark = from_book_float(mid)
        if mark is not None:
            self._mids[symbol] = mark
            self.ledger.mark(symbol, mark)
            self._moved = True

    def on_fill(self, fill: Mapping, now_ns: int) -> bool:
        """Apply a fill map once per `fill_id` (judged by the next `evaluate`); returns False for a
        duplicate. Its `ts` (else `now_ns`) times the round trip it may close. Raises ValueError
        when malformed."""
        applied = self.ledger.apply_map(fill)
        if applied is None:
            return False
        _pos, trip = applied
        # vetted by apply_map: decimal strings (or ints, Decimals) of a known side
        self.balances.on_fill(fill["symbol"], Side(fill["side"]), Decimal(fill["qty"]), Decimal(fill["price"]),
                              Decimal(fill.get("fee", 0)), fill.get("fee_asset", ""))
        ts = fill.get("ts")
        ts = ts if type(ts) is int else now_ns
        work = self.working.get(fill.get("client_order_id", ""))
        if work is not None:
            self._set_remaining(fill["client_order_id"], work, work.remaining - Decimal(fill["qty"]))
        if trip is not None:
            self.streak.on_trip(trip, ts)
        self._moved = True
        return True

    def book_fills(self, fills: Iterable[Mapping], now_ns: int,
                   on_bad: Callable[[Mapping, Exception], None] | None = None) -> int:
        """Book vetted fill maps, each once per `fill_id` (`on_fill`); returns how many were new.
        One that cannot be booked (ValueError, TypeError, ArithmeticError: the vetting is
        stricter, so a bug) is skipped and handed to `on_bad(fill, error)`, the rest still
        booked; without `on_bad` the error propagates."""
        booked = 0
        for fill in fills:
            try:
                booked += self.on_fill(fill, now_ns)
            except (ValueError, TypeError, ArithmeticError) as exc:
                if on_bad is None:
                    raise
                on_bad(fill, exc)
        return booked

    def settle_order(self, client_order_id: str, status: OrderStatus, filled_qty: Decimal, fills: Iterable[Mapping],
                     now_ns: int, on_bad: Callable[[Mapping, Exception], None] | None = None) -> int:
        """The broker's vetted answer about an order (its ack, or a cancel's reply): book its
        `fills` (`book_fills`, `on_bad` as there), then apply its `status` and `filled_qty`
        (`on_order`: a terminal status ends it). `fills`: a list or tuple (empty: none to book).
        Returns the fills booked."""
        booked = self.book_fills(fills, now_ns, on_bad) if fills else 0
        self.on_order(client_order_id, status, filled_qty)
        return booked

    def on_sent(self, client_order_id: str, symbol: str, side: Side, qty: Decimal, rests: bool,
                now_ns: int, price: Decimal | None = None) -> None:
        """The order went to the broker: until the broker says otherwise, all of it may fill
        (fail closed), for UNCERTAIN_NS at most. `price`: a LIMIT order's (None: MARKET), which
        its reservation is priced at (`track`)."""
        self.track(client_order_id, symbol, side, qty, qty, rests, now_ns + UNCERTAIN_NS, price)

    def on_order(self, client_order_id: str, status: OrderStatus, filled_qty: Decimal) -> None:
        """What the broker says of a working order (its ack, or an `order.*` event, which
        follows that order's fills on the bus): a terminal status ends it; an open one
        leaves `qty - filled_qty` working. An order no longer working stays ended."""
        work = self.working.get(client_order_id)
        if work is None:
            return
        if status in TERMINAL_STATUSES:
            self._set_remaining(client_order_id, work, ZERO)
        else:
            work.expires_ns = 0
            self._set_remaining(client_order_id, work, work.qty - filled_qty)

    def track(self, client_order_id: str, symbol: str, side: Side, qty: Decimal, remaining: Decimal,
              rests: bool = True, expires_ns: int = 0, price: Decimal | None = None) -> None:
        """An order that may still fill `remaining` of `qty`; counted by the position checks
        until filled, ended, or (when `expires_ns`) unconfirmed past that time. On a spot symbol
        it reserves what it may spend (services/risk/balances.py), priced at `price` (a LIMIT
        order's; None: a MARKET order's, at the symbol's mid now: without one it reserves nothing)."""
        self.untrack(client_order_id)
        if remaining > 0:
            work = Working(symbol, side, qty, ZERO, rests, expires_ns)
            self.working[client_order_id] = work
            self._set_remaining(client_order_id, work, remaining)
            held = self.pricing.unit(symbol, side, price, self._mids.get(symbol))
            if held is not None:
                self.balances.hold(client_order_id, held[0], held[1], remaining)

    def untrack(self, client_order_id: str) -> None:
        work = self.working.get(client_order_id)
        if work is not None:
            self._set_remaining(client_order_id, work, ZERO)

    def working_order(self, client_order_id: str) -> Working | None:
        """The order risk counts as working under this id, or None (ended, or never known).
        For reading: the engine changes it."""
        return self.working.get(client_order_id)

    def cancellable_ids(self) -> list[str]:
        """Working orders the broker has (not those of unknown fate), for FLATTEN to cancel."""
        return [coid for coid, w in self.working.items() if not w.expires_ns]

    @property
    def working_count(self) -> int:
        """How many orders risk counts as working (resting, or of unknown fate)."""
        return len(self.working)

    def expire(self, now_ns: int) -> None:
        """Forget orders of unknown fate the broker never confirmed by `expires_ns`."""
        for coid in [c for c, w in self.working.items() if w.expires_ns and w.expires_ns <= now_ns]:
            self.untrack(coid)

    def _set_remaining(self, coid: str, work: Working, remaining: Decimal) -> None:
        remaining = max(remaining, ZERO)
        key = (work.symbol, work.side)
        self.exposure[key] = self.exposure.get(key, ZERO) + remaining - work.remaining
        work.remaining = remaining
        self.balances.set_remaining(coid, remaining)  # its reservation follows (released at 0)
        if not remaining:
            del self.working[coid]
            if not self.exposure[key]:
                del self.exposure[key]

    # -- FLATTEN -----------------------------------------------------------------------------

    def flatten_orders(self, now_ns: int, id_prefix: str) -> list[OrderRequest]:
        """MARKET orders closing every open position (rounded down to its lot), for the normal path."""
        out = []
        for symbol, pos in sorted(self.ledger.positions.items()):
            rules = self.limits.rules.get(symbol)
            if rules is None or not pos.qty:
                continue
            qty = (abs(pos.qty) // rules.lot_size) * rules.lot_size
            if qty > 0:
                coid = f"{id_prefix}-{symbol}"
                self._flatten_ids[coid] = None
                out.append(OrderRequest(ts=now_ns, client_order_id=coid, strategy="risk",
                                        symbol=symbol, side=Side.SELL if pos.qty > 0 else Side.BUY,
                                        kind=OrderKind.MARKET, qty=qty))
        while len(self._flatten_ids) > FLATTEN_IDS_KEPT:
            del self._flatten_ids[next(iter(self._flatten_ids))]
        return out

    # -- what the desk vets the broker's word against ---------------------------------------

    @property
    def marks(self) -> Mapping[str, Decimal]:
        """symbol -> the mid of its last two-sided book (live, not a copy: read it, keep no change)."""
        return self._mids

    def booked_for(self, fill_id: str) -> str | None:
        """The client_order_id a fill id was booked for, or None (Ledger.booked_for)."""
        return self.ledger.booked_for(fill_id)

    def has_fill(self, fill_id: str) -> bool:
        """Whether a fill with this id was booked already (Ledger.has_seen)."""
        return self.ledger.has_seen(fill_id)

    # -- figures and persistence ------------------------------------------------------------

    @property
    def figures_changed(self) -> bool:
        """The figures of `snapshot()` changed since the shell last stored them (`figures_stored`)."""
        return self._dirty

    def figures_stored(self) -> None:
        """The shell stored the current `snapshot()`: no checkpoint is due until they change."""
        self._dirty = False

    def equity(self) -> Decimal:
        return self.ledger.equity()

    def drawdown(self, equity: Decimal | None = None) -> Decimal:
        """(peak - equity) / peak, rounded half-even to 1e-8; 0 without a positive peak."""
        equity = self.ledger.equity() if equity is None else equity
        if self.peak is None or self.peak <= 0 or equity >= self.peak:
            return ZERO
        with localcontext(MONEY):
            return ((self.peak - equity) / self.peak).quantize(STEP, ROUND_HALF_EVEN)

    def position_map(self) -> dict[str, str]:
        """symbol -> signed base position as a decimal string (ControlReply.positions)."""
        return {s: text(p.qty) for s, p in sorted(self.ledger.positions.items()) if p.qty or p.fills}

    def snapshot(self) -> dict:
        """What fills cannot rebuild: the trading state, peak, day, day start equity, fired breakers."""
        return {"state": self.held.value, "code": self.held_code, "reason": self.held_reason,
                "by": self.held_by, "state_ts": self.held_ts, "peak_equity": self.peak, "day": self.day,
                "day_start_equity": self.day_start, "tripped": ",".join(sorted(self.tripped))}

    def replay(self, fills: Iterable[Mapping], open_orders: Iterable[tuple], snapshot: Mapping | None) -> int:
        """Rebuild after a restart: apply stored `fills` (maps with `ts`, in commit order) without
        judging them (the balances move as they did), track `open_orders` (`OpenOrder`s, or tuples
        of its fields: reserving again what they held), then take back `snapshot` (the last stored
        one, if any). Returns the fills applied."""
        self.replaying = True
        try:
            applied = sum(self.on_fill(f, f["ts"]) for f in fills)
        finally:
            self.replaying = False
        for coid, symbol, side, qty, remaining, rests, price in (OpenOrder(*o) for o in open_orders):
            self.track(coid, symbol, side, qty, remaining, rests, price=price)
        if snapshot is not None:
            self.restore(snapshot)
        self._changes.clear()
        return applied

    def restore(self, snap: Mapping) -> None:
        """Take back a `snapshot()` (after the fills were replayed)."""
        held = TradingState(snap["state"])
        if held is TradingState.PAUSED_SHABBAT:  # never stored as held; a pause is the calendar's
            held = TradingState.ACTIVE
        self.held = self.state = held
        self.held_code = self.state_code = snap["code"]
        self.held_reason = self.state_reason = snap["reason"]
        self.held_by = self.state_by = snap["by"]
        self.held_ts = self.state_ts = snap["state_ts"]
        self.pause_phase, self.pause = "", None
        self._pause_until = -1 if self.calendar is not None else NEVER  # on_clock judges again
        self.peak, self.day, self.day_start = snap["peak_equity"], snap["day"], snap["day_start_equity"]
        self.tripped = {k for k in snap["tripped"].split(",") if k}
        self._dirty = False

    def restore_legacy(self, state: TradingState | None, code: str, reason: str,
                       equities: Iterable[Decimal]) -> None:
        """Take back what a database written before checkpoints existed holds (after `replay`,
        when it found no snapshot): the last STATE event, if any (`state`, `code`, `reason`: a
        halt survives, coming back ACTIVE would fail open), and the peak of `equities` (the
        broker's equity snapshots)."""
        if state is not None and state is not TradingState.PAUSED_SHABBAT and not code.startswith("SHABBAT"):
            self.held = self.state = state
            self.held_code = self.state_code = code
            self.held_reason = self.state_reason = reason
        for equity in equities:
            if self.peak is None or equity > self.peak:
                self.peak = equity

    def pause_view(self) -> dict | None:
        """The pause of the phase as plain values (None: no calendar, or none ahead)."""
        if self.calendar is None or self.pause is None:
            return None
        return {"phase": self.pause_phase, **self.pause.to_json()}

    def summary(self) -> dict:
        """Everything risk knows, as plain values (Decimals as strings), for control replies."""
        equity = self.ledger.equity()
        opt = (lambda d: None if d is None else text(d))
        positions = {s: {"qty": text(p.qty), "avg_price": opt(p.avg_price), "realized": text(p.realized),
                         "fees": text(p.fees), "unrealized": text(p.unrealized()), "mark": opt(p.price_for_mark()),
                         "fees_by_asset": {a: text(f) for a, f in sorted(p.fees_by_asset().items())}}
                     for s, p in sorted(self.ledger.positions.items())}
        return {"state": self.state.value, "code": self.state_code, "reason": self.state_reason,
                "by": self.state_by, "since_ts": self.state_ts, "held": self.held.value,
                "pause": self.pause_view(), "equity": text(equity),
                "realized": text(self.ledger.realized()), "fees": text(self.ledger.fees()),
                "unrealized": text(self.ledger.unrealized()), "peak_equity": opt(self.peak),
                "day_start_equity": opt(self.day_start), "day": self.day,
                "drawdown": text(self.drawdown(equity)), "tripped": sorted(self.tripped),
                "loss_pause_until": self.streak.paused_until, "working": len(self.working),
                "positions": positions, "balances": self.balances.view(),
                "fees_by_asset": {a: text(f) for a, f in sorted(self.ledger.fees_by_asset().items())}}


def _local(t) -> str:
    """A pause's local time for a reason text: `Fri 2026-12-11 15:55 IST`."""
    return t.strftime("%a %Y-%m-%d %H:%M %Z")
