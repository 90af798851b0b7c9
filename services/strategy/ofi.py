"""The order-flow imbalance strategy (issue #13 part 2): a pure core, books and answers in, actions out.

Who calls what: the shell (the live service, or `qf backtest`) feeds every `book.{SYMBOL}` to
`on_book(book, now_ns)` and every `trade.{SYMBOL}` to `on_trade(trade, now_ns)`, in receive order;
risk's answers to `on_decision` (orders) and `on_cancel_answer` (cancels); the broker's `fill.*` and
`order.*` events to `on_fill` and `on_order`; `risk.state` to `on_risk_state`; and calls `tick(now)`
now and then (time stops, stale entries with no book arriving). Every call that returns actions
returns them in order, to be sent at once: `OrderIntent` (an order through risk) or `CancelIntent`.
After any of them, `take_signals()` hands over the signals to publish and store. Time is always an
argument (wall clock live, recorded time in a backtest); no I/O, no clock, no logging.

The signal (services/strategy/scoring.py, whose docstring has the formulas): a score in [-1, 1]
per book from multi-level and best-level OFI, trade flow, depth imbalance and the microprice,
filtered by the spread and volatility regime; side BUY / SELL / flat, confidence = its size.

Orders (spot, long/flat; one working order per symbol, and at most one request in flight per symbol:
an order awaiting its decision, or a cancel awaiting its answer; COOLDOWN_MS between orders):

- entry (flat = the position rounded down to the lot is 0 or under the min notional at the mid;
  trading state ACTIVE; signal BUY): qty = floor(NOTIONAL * confidence * min(1, TARGET_VOL_BPS /
  (vol_1s * 1e4)) / price / lot) * lot, capped by max_order_notional / price, max_position -
  position and max_notional / price - position (each rounded down to the lot); under the min
  notional (or 0): skipped, counted. A post-only LIMIT GTX BUY at the best bid (on the tick grid,
  rounded down), or a MARKET BUY (sized at the best ask) when confidence >= MARKET_CONFIDENCE.
  A SELL signal never opens a short. A USD-M symbol (`USDM:…`) is scored (its signals are
  published) but never traded: risk denies its orders (UNSUPPORTED_MARKET).
- exit while long (ret_bps = (mid / avg_entry - 1) * 1e4, avg_entry the fills' VWAP since flat):
  take_profit ret_bps >= TAKE_PROFIT_BPS; stop_loss ret_bps <= -STOP_LOSS_BPS; time_stop
  now - first entry fill >= MAX_HOLD_MS; reversal: a SELL signal with confidence >=
  REVERSAL_CONFIDENCE. A MARKET SELL of the position rounded down to the lot; what is left under
  the lot or the min notional is dust (counted, never traded). A resting entry is cancelled first
  (reason "exit"). In REDUCING exits still go; HALTED and PAUSED_SHABBAT (a Shabbat or Yom Tov
  pause: risk flattens before it and closes what is left itself) send nothing but cancels.
- a resting entry is cancelled when: older than ENTRY_TTL_MS ("stale"); the best bid moved more
  than AWAY_BPS from its price ("away_from_touch"); the score fell to CANCEL_SCORE or below, or the
  regime filter closed ("signal_lost"); the trading state is not ACTIVE ("state").

Orders come from books (entries, exits) and `tick` (exits only); answers and events only ever
ask for cancels, so no answer starts a chain of orders without time passing.

Its position and orders follow the fills (every `fill_id` applied exactly once, whether it came in
an ack or on `fill.*`) and the order events, never a decision's qty: an order risk answered with a
rejection it could not be sure of (NO_REPLY, BROKER_UNAVAILABLE, BROKER_ERROR, BAD_ANSWER) stays
known, and what the broker then says of it is applied (an open order adopted as the working one).
An `order.*` event of an unknown client_order_id starting with `QF_STRATEGY_NAME-` on our symbols,
open: a leftover of an earlier run, adopted and cancelled. A fill or ack that is not credible
(another side or symbol, a non-positive quantity or price, more filled than the order, a spot
position driven below 0) raises ValueError with nothing applied. Risk unreachable
(`set_risk_reachable(False)`): no requests at all until it is reachable again (counted).

Signals (`take_signals`): one at each change of side, and one with every order (its
client_order_id and action; it stands for a side change of the same book too); never one per book
while nothing changes. Their FeatureVector is read after the order went out, before the symbol's
next event (the same values), and the Signal built when taken: the per-book path reads only the
few features the score needs (`SymbolFeatures.head()`), not the whole vector.

Cost: O(1) per event (a constant times the windows and horizons); the features' rings are
preallocated; known orders (for late fills) and pending signals are bounded. The features and the
score are C (`SymbolFeatures`, `Scorer.score`); an entry is sized in integers from flat
(`_entry_units`, equal to the Decimal `_entry_decimal`). On the shipped capture (6,493 books,
orders answered at once by a stand-in) `on_book` takes p50 ~3 µs, p99 ~20 µs on a warm core
(bench/strategy.py, `strategy_decision_warm_us_*`); in the live process, where a book meets caches
the other services used since the last one, about five times that.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Iterable, Mapping

from services.risk.checks import RISK_ORDER_PREFIXES, SymbolRules
from services.strategy.core import OrderIntent
from services.strategy.features import FeatureParams, SymbolFeatures
from services.strategy.scoring import Scorer, Signal, feature_names, feature_params, flatten, signal_params
from services.strategy.working import (CANCEL_UNSURE, CANCELLING, DONE, OPEN, SENT, UNKNOWN, UNSURE, KnownOrders,
                                       WorkingOrder, check_fills)
from shared.config import StrategyConfig
from shared.enums import OPEN_STATUSES, OrderKind, OrderStatus, Side, TimeInForce, TradingState, Verdict
from shared.messages import Ack, Book, Decision, Fill, OrderEvent, Trade
from shared.money import MONEY, ZERO, UnknownAsset, base_asset, from_book_float

__all__ = ["Action", "CancelIntent", "OfiStrategy", "Signal", "WorkingOrder", "signal_params"]

MAX_SIGNALS = 10_000  # signals kept for `take_signals` (the oldest dropped, counted, beyond)
MAX_LEFTOVERS = 64  # adopted leftovers waiting for their cancel, per symbol


@dataclass(frozen=True, slots=True)
class CancelIntent:
    """A cancel the strategy wants sent (through risk's desk)."""
    client_order_id: str
    symbol: str
    reason: str  # "stale" | "away_from_touch" | "signal_lost" | "state" | "exit" | "leftover"


Action = OrderIntent | CancelIntent


class _Symbol:
    """One symbol's state."""
    __slots__ = ("symbol", "rules", "features", "position", "avg_entry", "entry_f", "entry_ns", "working",
                 "leftovers", "last_order_ns", "book", "mid", "vol_bps", "score", "side", "confidence", "regime",
                 "pub_side", "dust_counted", "min_notional_f", "unsnapped", "base", "books_only", "units")

    def __init__(self, symbol: str, rules: SymbolRules, params: FeatureParams) -> None:
        self.symbol = symbol
        self.rules = rules
        self.books_only = symbol.startswith("USDM:")
        try:  # a fee paid in the base asset (QF_BROKER_FEE_ASSET=received) comes off what is held
            self.base = base_asset(symbol)
        except UnknownAsset:
            self.base = ""
        self.features = SymbolFeatures(params)
        self.position = ZERO
        self.avg_entry: Decimal | None = None
        self.entry_f = 0.0  # avg_entry as a float (for the bps comparisons with the mid); 0: unknown
        self.entry_ns = 0
        self.working: WorkingOrder | None = None
        self.leftovers: deque[WorkingOrder] = deque()
        self.last_order_ns: int | None = None
        self.book: Book | None = None
        self.mid = 0.0
        self.vol_bps = 0.0  # vol_1s in bps per second
        self.score = 0.0
        self.side: Side | None = None
        self.confidence = 0.0
        self.regime = False
        self.pub_side: Side | None = None
        self.dust_counted = False
        self.min_notional_f = float(rules.min_notional)
        self.units = _rule_units(rules)  # the integer sizing's limits (None: sizing in Decimal)
        self.unsnapped: list[list] = []  # signal snapshots still without their features (OfiStrategy._snap)


_STEP = Decimal("1e-8")
_UNITS_PX_MAX = 1e7  # below this a book price times 1e8 rounds to its exact 1e-8 units


def _units(x: Decimal, exp: int, rounding: str = ROUND_FLOOR) -> int:
    """x * 10**exp rounded to an integer (exact)."""
    return int(x.scaleb(exp, context=MONEY).to_integral_value(rounding=rounding))


def _rule_units(rules: SymbolRules) -> tuple[int, ...] | None:
    """The entry sizing's limits in integers (OfiStrategy._entry_units): lot and tick in 1e-8 units,
    max order notional, max position (1e-8 units), max notional and min notional (1e-16 units: a
    price times a qty). None when a step is off the 1e-8 grid (then sizing stays in Decimal)."""
    lot, tick = rules.lot_size.scaleb(8, context=MONEY), rules.tick_size.scaleb(8, context=MONEY)
    if lot != lot.to_integral_value() or tick != tick.to_integral_value() or lot <= 0 or tick <= 0:
        return None
    return (int(lot), int(tick), _units(rules.max_order_notional, 16), _units(rules.max_position, 8),
            _units(rules.max_notional, 16), _units(rules.min_notional, 16, ROUND_CEILING))


def _floor(x: Decimal, step: Decimal) -> Decimal:
    """`x` rounded down to a multiple of `step` (exact)."""
    return (MONEY.divide(x, step)).to_integral_value(rounding=ROUND_FLOOR) * step


class OfiStrategy:
    """Spot long/flat on order-flow imbalance (see the module docstring for every rule)."""

    def __init__(self, cfg: StrategyConfig, symbols: Iterable[str], rules: Mapping[str, SymbolRules],
                 id_prefix: str | None = None) -> None:
        self.cfg = cfg
        self.scorer = Scorer(cfg)
        # QF_STRATEGY_NOTIONAL in 1e-8 units for the integer sizing (0: off the grid, sizing in Decimal)
        n = cfg.notional.scaleb(8, context=MONEY)
        self.notional_e8 = int(n) if n == n.to_integral_value() else 0
        self.params = feature_params(cfg)
        self.names = feature_names(self.params)
        # the prefix must differ between runs (the shell adds its start time): client_order_id is
        # the idempotency key at risk and the broker
        self.id_prefix = id_prefix or cfg.name
        self.leftover_prefix = cfg.name + "-"
        self.cooldown_ns = cfg.cooldown_ms * 1_000_000
        self.ttl_ns = cfg.entry_ttl_ms * 1_000_000
        self.hold_ns = cfg.max_hold_ms * 1_000_000
        self._sym: dict[str, _Symbol] = {}
        for s in symbols:
            key = s.upper()
            r = rules.get(key)
            if r is None:
                raise ValueError(f"no risk rules for {key}")
            self._sym[key] = _Symbol(key, r, self.params)
        self._orders = KnownOrders()
        self._signals: deque[list] = deque()  # `_snap`s, made Signals by take_signals
        self.state = TradingState.ACTIVE
        self.reachable = True
        self._n = 0
        self.stats: dict[str, int] = dict.fromkeys((
            "books", "books_unused", "trades", "not_ready", "filtered", "side_changes", "signals_dropped",
            "entries_limit",
            "entries_market", "exits_take_profit", "exits_stop_loss", "exits_time_stop", "exits_reversal",
            "cancels_stale", "cancels_away_from_touch", "cancels_signal_lost", "cancels_state", "cancels_exit",
            "cancels_leftover", "cancel_failures", "skipped_min_notional", "dust", "fills", "duplicate_fills",
            "foreign_fills", "risk_closes", "unknown_decisions", "adopted", "blocked_unreachable", "syncs",
            "refused"), 0)
        self.rejections: dict[str, int] = {}

    # -- queries ------------------------------------------------------------------------------

    def trades(self, symbol: str) -> bool:
        """Whether `symbol` is one of the strategy's symbols."""
        return symbol in self._sym

    def position(self, symbol: str) -> Decimal:
        return self._sym[symbol].position

    def working(self, symbol: str) -> WorkingOrder | None:
        """The working order of `symbol` (in flight or resting), if any."""
        return self._sym[symbol].working

    def last_signal(self, symbol: str) -> Signal | None:
        """The signal of `symbol`'s latest book (None before its first book)."""
        st = self._sym[symbol]
        if st.book is None:
            return None
        snap = self._snap(st, st.features.vector().ts)
        self._fill_features(st)
        return self._build(snap)

    def has_signals(self) -> bool:
        """Whether `take_signals` has something."""
        return bool(self._signals)

    def take_signals(self) -> list[Signal]:
        """The signals to publish and store since the last call (side changes and every signal that
        triggered an order), oldest first; they are no longer pending. (Kept as snapshots until
        now: the per-book path only takes the FeatureVector, the Signal is built here.)"""
        if not self._signals:
            return []
        for st in self._sym.values():
            if st.unsnapped:
                self._fill_features(st)
        out = [self._build(snap) for snap in self._signals]
        self._signals.clear()
        return out

    # -- market data ------------------------------------------------------------------------

    def on_trade(self, trade: Trade, now_ns: int) -> None:
        """Feed one trade (features only)."""
        st = self._sym.get(trade.symbol)
        if st is not None:
            if st.unsnapped:
                self._fill_features(st)
            self.stats["trades"] += 1
            st.features.on_trade(trade, now_ns)

    def on_book(self, book: Book, now_ns: int) -> list[Action]:
        """Feed one book: features, the signal, then what to do."""
        st = self._sym.get(book.symbol)
        if st is None:
            return []
        if st.unsnapped:
            self._fill_features(st)
        if not st.features.on_book(book, now_ns):
            self.stats["books_unused"] += 1  # an empty side or a bad level (the features' `skipped`)
            return []
        self.stats["books"] += 1
        st.book = book
        self._score(st)
        changed = st.side is not st.pub_side
        if changed:
            st.pub_side = st.side
            self.stats["side_changes"] += 1
        acts = self._decide(st, now_ns)
        if changed and not (acts and type(acts[0]) is OrderIntent):
            self._push(st, now_ns)  # (an order's signal, pushed by _send, stands for the side change too)
        return acts

    def _score(self, st: _Symbol) -> None:
        """The signal of `st`'s features into `st` (Scorer.score)."""
        st.score, st.side, st.confidence, why, st.mid, vol = self.scorer.score(st.features)
        st.vol_bps = vol * 1e4
        st.regime = not why
        if why:
            self.stats[why] += 1

    def _snap(self, st: _Symbol, now_ns: int, cid: str = "", action: str = "") -> list:
        """What a Signal of `st` now is made of. Its FeatureVector is read later (`_fill_features`),
        before the symbol's next event or at `take_signals`, whichever comes first: the same
        features (nothing fed them in between), read after the order went out, not before."""
        book = st.book
        snap = [st.symbol, now_ns, st.side, st.confidence, st.score, None, book.update_id, book.recv_ts or book.ts,
                cid, action]
        st.unsnapped.append(snap)
        return snap

    @staticmethod
    def _fill_features(st: _Symbol) -> None:
        vec = st.features.vector()
        for snap in st.unsnapped:
            snap[5] = vec
        st.unsnapped.clear()

    def _build(self, snap: list) -> Signal:
        symbol, ts, side, confidence, score, vec, update_id, recv_ts, cid, action = snap
        return Signal(symbol=symbol, ts=ts, side=side, confidence=confidence, score=score,
                      features=flatten(vec, self.names), update_id=update_id, recv_ts=recv_ts,
                      client_order_id=cid, action=action)

    def _push(self, st: _Symbol, now_ns: int, cid: str = "", action: str = "") -> None:
        if len(self._signals) >= MAX_SIGNALS:
            self._signals.popleft()
            self.stats["signals_dropped"] += 1
        self._signals.append(self._snap(st, now_ns, cid, action))

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Action]:
        """Time rules without a book: time stops, stale entries, cancels to ask again. Cheap: only
        symbols with a position or an order are looked at."""
        out: list[Action] = []
        for st in self._sym.values():
            if st.book is not None and (st.working is not None or st.position > 0 or st.leftovers):
                acts = self._decide(st, now_ns, entries=False)
                if acts:
                    out.extend(acts)
        return out

    # -- deciding -----------------------------------------------------------------------------

    def _decide(self, st: _Symbol, now: int, orders: bool = True, entries: bool = True) -> list[Action]:
        """What to do now: a cancel, an exit (`orders`), an entry (`entries`, on a book only), or
        nothing. Answers and events ask for cancels only (an order follows at the next book or
        tick), so no answer can start a chain of orders without time passing."""
        if st.book is None:
            return []
        w = st.working
        if w is not None:
            if w.phase is not OPEN:
                return []  # a request in flight: nothing else until it is answered
            why = self._cancel_reason(st, w, now)
            if why is None or now < w.retry_ns:
                return []
            if not self.reachable:
                self.stats["blocked_unreachable"] += 1
                return []
            w.phase, w.cancel_reason = CANCELLING, why
            self.stats["cancels_" + why] += 1
            return [CancelIntent(w.client_order_id, st.symbol, why)]
        while st.leftovers and st.leftovers[0].phase is not OPEN:
            st.leftovers.popleft()  # ended meanwhile (its order event): nothing to cancel
        if st.leftovers:
            if not self.reachable:
                self.stats["blocked_unreachable"] += 1
                return []
            w = st.working = st.leftovers.popleft()
            w.phase, w.cancel_reason = CANCELLING, "leftover"
            self.stats["cancels_leftover"] += 1
            return [CancelIntent(w.client_order_id, st.symbol, "leftover")]
        if not orders or (st.last_order_ns is not None and now - st.last_order_ns < self.cooldown_ns):
            return []
        if st.books_only:  # USD-M: signals, no orders (risk denies them: margin, leverage, funding
            return []  # are not modelled), so none is sent to be refused
        qty = self._exit_qty(st)
        if qty > 0:
            why = self._exit_reason(st, now)
            if why is None or self.state is TradingState.HALTED or self.state is TradingState.PAUSED_SHABBAT:
                return []
            return self._send(st, now, Side.SELL, qty, OrderKind.MARKET, None, "exit", "exit:" + why)
        if not entries or st.side is not Side.BUY or self.state is not TradingState.ACTIVE:
            return []
        return self._entry(st, now)

    def _cancel_reason(self, st: _Symbol, w: WorkingOrder, now: int) -> str | None:
        if w.purpose == "leftover":
            return "leftover"
        if self.state is not TradingState.ACTIVE:
            return "state"
        if w.purpose != "entry":
            return "stale" if now - w.sent_ns >= self.ttl_ns else None  # an exit resting: never in practice
        if self._exit_qty(st) > 0 and self._exit_reason(st, now) is not None:
            return "exit"
        if now - w.sent_ns >= self.ttl_ns:
            return "stale"
        if w.price_f > 0 and abs(st.book.bids[0][0] - w.price_f) * 1e4 > self.cfg.away_bps * w.price_f:
            return "away_from_touch"
        if not st.regime or st.score <= self.cfg.cancel_score:
            return "signal_lost"
        return None

    def _exit_qty(self, st: _Symbol) -> Decimal:
        """The position rounded down to the lot, 0 when that is under the min notional (dust)."""
        pos = st.position
        if pos <= 0:
            return ZERO
        lot = st.rules.lot_size
        qty = _floor(pos, lot)
        if qty <= 0 or (st.mid > 0 and float(qty) * st.mid < st.min_notional_f):
            return ZERO
        return qty

    def _exit_reason(self, st: _Symbol, now: int) -> str | None:
        cfg = self.cfg
        if st.entry_f <= 0 and st.mid > 0:
            st.entry_f = st.mid  # a position taken over from risk (sync) without its price: from now
        if st.entry_f > 0 and st.mid > 0:
            ret_bps = (st.mid / st.entry_f - 1.0) * 1e4
            if ret_bps >= cfg.take_profit_bps:
                return "take_profit"
            if ret_bps <= -cfg.stop_loss_bps:
                return "stop_loss"
        if now - st.entry_ns >= self.hold_ns:
            return "time_stop"
        if st.side is Side.SELL and st.confidence >= cfg.reversal_confidence:
            return "reversal"
        return None

    def _entry(self, st: _Symbol, now: int) -> list[Action]:
        cfg, book = self.cfg, st.book
        market = st.confidence >= cfg.market_confidence
        vol_bps = st.vol_bps
        scale = st.confidence * (min(1.0, cfg.target_vol_bps / vol_bps) if vol_bps > 0 else 1.0)
        px = book.asks[0][0] if market else book.bids[0][0]
        if st.units is not None and self.notional_e8 and st.position == 0 and 0.0 < px < _UNITS_PX_MAX:
            qty, price = self._entry_units(st, px, scale, market)
        else:
            qty, price = self._entry_decimal(st, px, scale, market)
        if price is None:
            return []
        if qty is None:
            self.stats["skipped_min_notional"] += 1
            return []
        if market:
            return self._send(st, now, Side.BUY, qty, OrderKind.MARKET, None, "entry", "entry")
        return self._send(st, now, Side.BUY, qty, OrderKind.LIMIT, price, "entry", "entry")

    def _entry_decimal(self, st: _Symbol, px: float, scale: float, market: bool
                       ) -> tuple[Decimal | None, Decimal | None]:
        """(qty, price) of an entry at book price `px`: price None for no usable price, qty None
        when it rounds to nothing or is under the min notional. In Decimal: the reference, and
        the path for a position that is not flat (dust) or rules off the 1e-8 grid."""
        rules = st.rules
        price = from_book_float(px)
        if price is not None and not market:
            price = _floor(price, rules.tick_size)
        if price is None or price <= 0:
            return None, None
        notional = MONEY.multiply(self.cfg.notional, Decimal(round(scale * 1e8)).scaleb(-8))
        # floor(min(...)) = min(floor(...)): the order notional, capped by max_order_notional, the
        # base room under max_position and the notional room under max_notional, to the lot once
        pos = st.position
        qty = _floor(min(MONEY.divide(min(notional, rules.max_order_notional), price), rules.max_position - pos,
                         MONEY.divide(rules.max_notional, price) - pos), rules.lot_size)
        if qty <= 0 or MONEY.multiply(qty, price) < rules.min_notional:
            return None, price
        return qty, price

    def _entry_units(self, st: _Symbol, px: float, scale: float, market: bool
                     ) -> tuple[Decimal | None, Decimal | None]:
        """`_entry_decimal` from flat, in integers (prices and quantities in 1e-8 units, notionals
        in 1e-16): the same (qty, price), exactly (tests/services/strategy/test_ofi.py), without
        a dozen Decimal operations on the per-book path. `px` in (0, 1e7): px * 1e8 rounds to
        the book's exact units."""
        lot_u, tick_u, max_order, max_pos, max_notional, min_notional = st.units
        p_u = round(px * 1e8)
        if not market:
            p_u -= p_u % tick_u
        if p_u <= 0:
            return None, None
        notional = self.notional_e8 * round(scale * 1e8)
        lots = min(min(notional, max_order) // p_u, max_pos, max_notional // p_u) // lot_u
        price = st.rules.tick_size * (p_u // tick_u) if not market else _STEP * p_u
        if lots <= 0 or lots * lot_u * p_u < min_notional:
            return None, price
        return st.rules.lot_size * lots, price

    def _send(self, st: _Symbol, now: int, side: Side, qty: Decimal, kind: OrderKind, price: Decimal | None,
              purpose: str, action: str) -> list[Action]:
        if not self.reachable:
            self.stats["blocked_unreachable"] += 1
            return []
        self._n += 1
        cid = f"{self.id_prefix}-{self._n}"
        book = st.book
        tif = TimeInForce.GTX if kind is OrderKind.LIMIT else TimeInForce.GTC
        intent = OrderIntent(client_order_id=cid, symbol=st.symbol, side=side, qty=qty, kind=kind,
                             confidence=st.confidence, signal_ts=book.recv_ts or book.ts, price=price, tif=tif,
                             reason=action)
        w = WorkingOrder(cid, st.symbol, side, kind, qty, price, purpose, action, now,
                         price_f=float(price) if price is not None else 0.0)
        st.working = w
        st.last_order_ns = now
        self._remember(w)
        if purpose == "entry":
            self.stats["entries_market" if kind is OrderKind.MARKET else "entries_limit"] += 1
        else:
            self.stats["exits_" + action.partition(":")[2]] += 1
        self._push(st, now, cid, action)
        return [intent]

    def _remember(self, w: WorkingOrder) -> None:
        self._orders.add(w)

    # -- answers ------------------------------------------------------------------------------

    def on_decision(self, decision: Decision, now_ns: int) -> list[Action]:
        """Risk's answer to an order we sent. Fills in its ack are applied (once per fill_id); a
        rejection is counted by its code. Raises ValueError for an ack that is not credible of the
        order (nothing applied; the order's fate is then unknown)."""
        w = self._orders.get(decision.client_order_id)
        if w is None:
            self.stats["unknown_decisions"] += 1
            return []
        st = self._sym[w.symbol]
        was_sent = w.phase is SENT
        if decision.verdict is Verdict.REJECTED:
            code = str((decision.reason or {}).get("code") or "REJECTED")
            self._reject(code)
            if was_sent:
                self._end(st, w, UNKNOWN if code in UNSURE else DONE)
            return self._decide(st, now_ns, orders=False)
        if decision.verdict is Verdict.ADJUSTED and decision.qty > 0 and w.qty is not None and decision.qty < w.qty:
            w.qty = decision.qty
        ack = decision.order
        if ack is None:
            self._reject("NO_ACK")
            if was_sent:
                self._end(st, w, UNKNOWN)
            return self._decide(st, now_ns, orders=False)
        streamed = w.status  # what `order.*` said of it before this answer came (None: nothing yet)
        try:
            self._apply_ack(st, w, ack, now_ns)
        except ValueError:
            self.stats["refused"] += 1
            if was_sent:
                self._end(st, w, UNKNOWN)
            raise
        if ack.status is OrderStatus.REJECTED:
            self._reject(ack.reason or "BROKER_REJECTED")
        status = ack.status
        if streamed is not None and streamed not in OPEN_STATUSES and status in OPEN_STATUSES:
            # the ack (relayed by risk) is older than the end the broker's own stream already told:
            # a post-only entry acked PENDING, then filled; it must not come back as a resting order
            status = w.status = streamed
        if was_sent:
            if status in OPEN_STATUSES:
                w.phase = OPEN
            else:
                self._end(st, w, DONE)
        elif w.phase is UNKNOWN:  # a late answer of an order given up on: it rests, or it ended
            if status in OPEN_STATUSES:
                self._adopt(st, w)
            else:
                w.phase = DONE
        return self._decide(st, now_ns, orders=False)

    def on_cancel_answer(self, client_order_id: str, ack: Ack | None, error_code: str | None,
                         now_ns: int) -> list[Action]:
        """Risk's answer to a cancel: the order's ack (fills applied, status taken), or an error code
        (UNKNOWN_ORDER: the broker has no such order; others: unsure, asked again after the
        cooldown). Raises ValueError for an ack that is not credible (nothing applied)."""
        w = self._orders.get(client_order_id)
        if w is None:
            self.stats["unknown_decisions"] += 1
            return []
        st = self._sym[w.symbol]
        cancelling = w.phase is CANCELLING
        if ack is not None:
            try:
                self._apply_ack(st, w, ack, now_ns)
            except ValueError:
                self.stats["refused"] += 1
                if cancelling:
                    w.phase, w.retry_ns = OPEN, now_ns + self.cooldown_ns
                raise
            if cancelling:
                if ack.status in OPEN_STATUSES:
                    self.stats["cancel_failures"] += 1
                    w.phase, w.retry_ns = OPEN, now_ns + self.cooldown_ns
                else:
                    self._end(st, w, DONE)
        elif cancelling:
            code = error_code or "ERROR"
            self._reject("cancel:" + code)
            if code in CANCEL_UNSURE:
                self.stats["cancel_failures"] += 1
                w.phase, w.retry_ns = OPEN, now_ns + max(self.cooldown_ns, 1)
            else:  # UNKNOWN_ORDER and the like: nothing rests there
                self._end(st, w, DONE)
        return self._decide(st, now_ns, orders=False)

    def _reject(self, code: str) -> None:
        self.rejections[code] = self.rejections.get(code, 0) + 1

    def _end(self, st: _Symbol, w: WorkingOrder, phase: str) -> None:
        w.phase = phase
        if st.working is w:
            st.working = None

    # -- the broker's events ------------------------------------------------------------------

    def on_fill(self, fill: Fill, now_ns: int) -> list[Action]:
        """A `fill.*` event (or a fill from an ack): applied once per fill_id. Raises ValueError for
        a fill that is not credible (nothing applied)."""
        st = self._sym.get(fill.symbol)
        w = self._orders.get(fill.client_order_id)
        if w is None:
            if st is not None and fill.client_order_id.startswith(RISK_ORDER_PREFIXES):
                # risk closed what is held itself (an operator's FLATTEN, a pause's flatten): its
                # fills move the position as ours do; the order is risk's, never ours to work
                w = WorkingOrder.leftover(fill.client_order_id, fill.symbol, fill.side, now_ns)
                w.phase, w.purpose = DONE, "risk"
                self._remember(w)
                self.stats["risk_closes"] += 1
            elif st is None or not fill.client_order_id.startswith(self.leftover_prefix):
                self.stats["foreign_fills"] += 1
                return []
            else:
                # an order of an earlier run (or one forgotten): its fills move the position all the same
                w = WorkingOrder.leftover(fill.client_order_id, fill.symbol, fill.side, now_ns)
                self._remember(w)
                self.stats["adopted"] += 1
        st = self._sym[w.symbol]
        if fill.fill_id in w.fill_ids:
            self.stats["duplicate_fills"] += 1
            return []
        check_fills(w, st.position, (fill,))
        self._apply(st, w, fill, now_ns)
        return []

    def on_order(self, event: OrderEvent, now_ns: int) -> list[Action]:
        """An `order.*` event: the status of one of our orders; an open order of an earlier run
        (our name's prefix, our symbol) is adopted and cancelled."""
        st = self._sym.get(event.symbol)
        if st is None:
            return []
        w = self._orders.get(event.client_order_id)
        if w is None:
            if event.status not in OPEN_STATUSES or not event.client_order_id.startswith(self.leftover_prefix):
                return []
            w = WorkingOrder.leftover(event.client_order_id, event.symbol, None, now_ns, event.status)
            self._remember(w)
            self.stats["adopted"] += 1
            self._adopt(st, w)
            return self._decide(st, now_ns, orders=False)
        if w.symbol != event.symbol:
            return []
        w.status = event.status
        if event.status in OPEN_STATUSES:
            if w.phase is UNKNOWN:  # its answer was lost, but it rests at the broker: it works again
                self._adopt(st, w)
                return self._decide(st, now_ns, orders=False)
            return []
        if w.phase is OPEN:  # ended at the broker (filled, cancelled): no longer working
            self._end(st, w, DONE)
            return self._decide(st, now_ns, orders=False)
        if w.phase is UNKNOWN:
            w.phase = DONE
        return []  # SENT / CANCELLING: the answer settles it

    def _adopt(self, st: _Symbol, w: WorkingOrder) -> None:
        w.phase = OPEN
        if w.purpose == "leftover" or st.working is not None:
            w.purpose = "leftover"  # a second order on the symbol: cancelled when the slot is free
            if st.working is None:
                st.working = w
            elif len(st.leftovers) < MAX_LEFTOVERS:
                st.leftovers.append(w)
            return
        st.working = w

    # -- fills --------------------------------------------------------------------------------

    def _apply_ack(self, st: _Symbol, w: WorkingOrder, ack: Ack, now: int) -> None:
        if ack.client_order_id != w.client_order_id:
            raise ValueError(f"ack of {ack.client_order_id!r} for order {w.client_order_id!r}")
        if ack.filled_qty < 0 or (w.qty is not None and ack.filled_qty > w.qty):
            raise ValueError(f"ack filled {ack.filled_qty} of an order for {w.qty}")
        new = [f for f in ack.fills if f.fill_id not in w.fill_ids]
        if len({f.fill_id for f in new}) != len(new):
            raise ValueError("an ack lists one fill_id twice")
        check_fills(w, st.position, new)
        for f in new:
            self._apply(st, w, f, now)
        self.stats["duplicate_fills"] += len(ack.fills) - len(new)
        w.status = ack.status

    def _apply(self, st: _Symbol, w: WorkingOrder, f: Fill, now: int) -> None:
        w.fill_ids.add(f.fill_id)
        if w.side is None:
            w.side = f.side
        w.filled += f.qty
        self.stats["fills"] += 1
        before = st.position
        if f.side is Side.BUY:
            if self._exit_qty(st) <= 0:
                st.entry_ns = now  # a new position: its time stop starts here
            st.position = before + f.qty
            if st.avg_entry is None or before <= 0:
                st.avg_entry = f.price
            else:
                st.avg_entry = MONEY.divide(MONEY.add(MONEY.multiply(before, st.avg_entry),
                                                      MONEY.multiply(f.qty, f.price)), st.position)
            st.entry_f = float(st.avg_entry)
        else:
            st.position = before - f.qty
        if f.fee and f.fee_asset == st.base:  # held is what came in less the fee paid out of it
            st.position -= f.fee
        if st.position <= 0 and f.side is Side.SELL:
            st.avg_entry, st.entry_f = None, 0.0
        if st.position > 0 and self._exit_qty(st) <= 0:
            if not st.dust_counted:
                st.dust_counted = True
                self.stats["dust"] += 1
        else:
            st.dust_counted = False

    # -- risk ---------------------------------------------------------------------------------

    def on_risk_state(self, state: TradingState, now_ns: int) -> list[Action]:
        """Risk's trading state: REDUCING/HALTED/PAUSED_SHABBAT stop entries and cancel resting ones
        (exits still go in REDUCING)."""
        self.state = state
        out: list[Action] = []
        if state is not TradingState.ACTIVE:
            for st in self._sym.values():
                if st.working is not None and st.working.phase is OPEN:
                    out.extend(self._decide(st, now_ns, orders=False))
        return out

    def set_risk_reachable(self, ok: bool, now_ns: int) -> None:
        """False: no requests at all (counted in blocked_unreachable) until True again."""
        self.reachable = ok

    def sync(self, positions: Mapping[str, Decimal], now_ns: int) -> None:
        """Take each symbol's position as risk holds it (after a start or a silence of risk); a
        symbol risk does not list is flat. Its entry price is unknown: the mid at the next decision
        stands for it, and its time stop starts now. Raises ValueError for a negative position
        (nothing applied)."""
        for sym, qty in positions.items():
            if sym in self._sym and qty < 0:
                raise ValueError(f"a spot position of {sym} below 0: {qty}")
        self.stats["syncs"] += 1
        for sym, st in self._sym.items():
            qty = positions.get(sym, ZERO)
            if qty != st.position:
                st.position = qty
                st.avg_entry, st.entry_f = None, 0.0
                st.entry_ns = now_ns
