"""Properties of the risk core under any interleaving of orders, fills, marks, controls and restarts."""
from __future__ import annotations

import dataclasses
from collections import deque
from decimal import Decimal as D
from fractions import Fraction

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.broker.core import Order
from services.risk.checks import SymbolRules, reduces_position
from services.risk.core import Approval, RiskEngine
from services.risk.limits import RiskLimits
from shared.enums import (OPEN_STATUSES, TERMINAL_STATUSES, ControlAction, OrderKind, OrderStatus, Side,
                          TimeInForce, TradingState)
from shared.messages import OrderRequest

MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")
TICK, LOT, FEE_RATE = D("0.5"), D("0.001"), D("0.001")
START = D("10")
# base to sell as well (issue #13: a spot account cannot sell what it does not hold), so the ledger's
# positions still go short of where they started and the REDUCING rules are exercised both ways
START_BALANCES = {"USDT": START, "BTC": D("0.02"), "ETH": D("0.02")}


def rules(symbol: str) -> SymbolRules:
    return SymbolRules(symbol, lot_size=LOT, tick_size=TICK, min_notional=D("0.15"), max_order_notional=D("1.5"),
                       max_position=D("0.02"), max_notional=D("1.8"))


LIMITS = RiskLimits(rules={s: rules(s) for s in SYMBOLS}, stale_book_ms=1500, max_open_orders=3,
                    price_band_bps=D(300), orders_per_s=6, orders_per_min=60, loss_streak=2,
                    loss_window_ns=60_000 * MS, loss_pause_ns=20_000 * MS, daily_loss=D("0.02"),
                    daily_loss_soft=D("0.01"), max_drawdown=D("0.03"), drawdown_soft=D("0.02"), adjust=True)


class RiskMachine(RuleBasedStateMachine):
    """The risk core against a small paper exchange (the broker core's Order state machine),
    with a bus that delivers fills and order events late, in order, and an ack that may be lost.

    Checked: an approved order keeps every limit; the ledger balances against a brute force
    of exact fractions; fills apply exactly once across restarts; a restart resumes the
    stored state; an order told to be over never counts again."""

    @initialize()
    def start(self):
        self.engine = RiskEngine(LIMITS, START, start_balances=START_BALANCES)
        self.now = T0
        self.mids = {s: D(100) for s in SYMBOLS}
        self.orders: dict[str, Order] = {}  # the exchange's view, by client order id
        self.db: list[dict] = []  # committed fills, in commit order
        self.bus: deque = deque()  # ("fill", map) | ("order", coid, status, filled): published, not yet read
        self.applied: set[str] = set()  # fill ids the current engine applied
        self.told_terminal: set[str] = set()  # orders the engine was told are over
        self.stored: dict | None = None  # the last checkpoint written
        self.n = 0
        for symbol in SYMBOLS:
            self.engine.on_book(symbol, float(self.mids[symbol]), self.now)

    # -- the paper exchange -----------------------------------------------------------------

    def _fill(self, order: Order, price: D, qty: D) -> dict:
        self.n += 1
        order.fill(price, qty, self.now)
        f = {"fill_id": f"f{self.n:06d}", "client_order_id": order.client_order_id, "symbol": order.symbol,
             "side": order.side.value, "price": str(price), "qty": str(qty), "fee": str(price * qty * FEE_RATE),
             "fee_asset": "USDT", "ts": self.now}
        self.db.append(f)
        self.bus.append(("fill", f))
        return f

    def _event(self, order: Order) -> None:
        self.bus.append(("order", order.client_order_id, order.status, order.filled_qty))

    def _apply(self, f: dict) -> None:
        if self.engine.on_fill(f, self.now):
            assert f["fill_id"] not in self.applied, "a fill applied twice"
            self.applied.add(f["fill_id"])

    def _tell(self, coid: str, status: OrderStatus, filled: D) -> None:
        self.engine.on_order(coid, status, filled)
        if status in TERMINAL_STATUSES:
            self.told_terminal.add(coid)

    def _settle(self) -> None:
        self.engine.evaluate(self.now)  # what the shell does after each batch of events
        if self.engine.has_changes:  # the shell stores a state change before anyone hears of it
            for change in self.engine.take_changes():
                event(f"state change: {change.code}")
            assert not self.engine.has_changes
            self.stored = self.engine.snapshot()
            self.engine.figures_stored()

    # -- rules ------------------------------------------------------------------------------

    @rule(symbol=st.sampled_from(SYMBOLS), ticks=st.integers(-30, 30))
    def book(self, symbol, ticks):
        mid = min(D(150), max(D(50), self.mids[symbol] + ticks * TICK))
        self.mids[symbol] = mid
        self.engine.on_book(symbol, float(mid), self.now)
        for order in list(self.orders.values()):  # resting orders the new book crosses fill at their price
            if order.symbol == symbol and order.is_open and (
                    (order.side is Side.BUY and order.price >= mid + TICK)
                    or (order.side is Side.SELL and order.price <= mid - TICK)):
                self._fill(order, order.price, order.remaining)
                self._event(order)
        self._settle()

    @rule(ms=st.integers(1, 1000))
    def advance(self, ms):
        self.now += ms * MS
        self.engine.expire(self.now)
        self._settle()

    @rule(symbol=st.sampled_from(SYMBOLS), side=st.sampled_from(Side), lots=st.integers(1, 16),
          kind=st.sampled_from(OrderKind), offset=st.integers(-8, 8), ioc=st.booleans(),
          acked=st.integers(0, 4), filled_lots=st.integers(0, 16))
    def submit(self, symbol, side, lots, kind, offset, ioc, acked, filled_lots):
        self._submit(symbol, side, lots, kind, offset, ioc, acked, filled_lots)

    @rule(symbol=st.sampled_from(SYMBOLS), acked=st.booleans())
    def close(self, symbol, acked):
        """Close the position at market: round trips, for the loss-streak pause."""
        pos = self.engine.ledger.qty(symbol)
        if pos:
            self._submit(symbol, Side.SELL if pos > 0 else Side.BUY, int(abs(pos) / LOT), OrderKind.MARKET, 0,
                         False, acked, 100)

    @rule(symbol=st.sampled_from(SYMBOLS), side=st.sampled_from(Side), lots=st.integers(2, 6))
    def rest(self, symbol, side, lots):
        """A GTC LIMIT away from the touch: it rests, for the open-orders limit."""
        self._submit(symbol, side, lots, OrderKind.LIMIT, -4 if side is Side.BUY else 4, False, 1, 0)

    def _submit(self, symbol, side, lots, kind, offset, ioc, acked, filled_lots):
        self.n += 1
        coid = f"c{self.n}"
        mid = self.mids[symbol]
        price = mid + offset * TICK if kind is OrderKind.LIMIT else None
        tif = TimeInForce.IOC if ioc else TimeInForce.GTC
        req = OrderRequest(ts=self.now, client_order_id=coid, strategy="p", symbol=symbol, side=side, kind=kind,
                           qty=lots * LOT, price=price, tif=tif)
        eng = self.engine
        pos, working = eng.ledger.qty(symbol), eng.exposure.get((symbol, side), D(0))
        state, booked, resting = eng.state, eng.book_ns.get(symbol), sum(w.rests for w in eng.working.values())
        paused, known_mid = eng.streak.paused(self.now), eng.marks.get(symbol)
        verdict = eng.check(req, self.now)
        event(f"verdict: {'ADJUSTED' if getattr(verdict, 'adjusted', False) else getattr(verdict, 'code', 'APPROVED')}")
        if not isinstance(verdict, Approval):
            return
        # -- every approved order keeps every limit ----------------------------------------
        q, r, s = verdict.qty, rules(symbol), side.sign
        ref = price if kind is OrderKind.LIMIT else known_mid
        assert 0 < q <= req.qty and q % r.lot_size == 0 and verdict.adjusted == (q != req.qty)
        assert state is TradingState.ACTIVE or (state is TradingState.REDUCING and pos * s < 0
                                                and q + working <= abs(pos))
        assert booked is not None and self.now - booked <= LIMITS.stale_ns and known_mid is not None
        before, after = pos + s * working, pos + s * (working + q)
        shrinks = abs(after) < abs(before) and after * before >= 0
        assert shrinks or (abs(after) <= r.max_position and abs(after) * ref <= r.max_notional)
        assert r.min_notional <= q * ref and req.qty * ref <= r.max_order_notional
        if kind is OrderKind.LIMIT:
            assert price % r.tick_size == 0 and abs(price - known_mid) * 10_000 <= LIMITS.price_band_bps * known_mid
        rests = kind is OrderKind.LIMIT and tif is TimeInForce.GTC
        assert not rests or resting < LIMITS.max_open_orders
        assert not paused or reduces_position(pos, side, q)
        # -- the exchange takes it ----------------------------------------------------------
        eng.on_sent(coid, symbol, side, q, rests, self.now)
        order = Order.from_request(dataclasses.replace(req, qty=q), f"o{self.n}", self.now)
        touch = mid + TICK if side is Side.BUY else mid - TICK
        crosses = kind is OrderKind.MARKET or (price >= touch if side is Side.BUY else price <= touch)
        fills = []
        if crosses:
            take = min(q, filled_lots * LOT) if kind is OrderKind.MARKET else q
            if take:
                fills.append(self._fill(order, touch, take))
        if order.is_open and (kind is OrderKind.MARKET or tif is TimeInForce.IOC):
            order.cancel("IOC_REMAINDER", self.now)
        self.orders[coid] = order
        self._event(order)
        if acked:  # the ack came back (0: lost, risk said BROKER_UNAVAILABLE; the bus still tells)
            for f in fills:
                self._apply(f)
            self._tell(coid, order.status, order.filled_qty)
        self._settle()

    @precondition(lambda self: self.bus)
    @rule(n=st.integers(1, 6))
    def deliver(self, n):
        for _ in range(min(n, len(self.bus))):
            event = self.bus.popleft()
            if event[0] == "fill":
                self._apply(event[1])
            else:
                self._tell(*event[1:])
        self._settle()

    @precondition(lambda self: any(o.is_open for o in self.orders.values()))
    @rule(data=st.data(), told=st.booleans())
    def cancel(self, data, told):
        order = data.draw(st.sampled_from([o for o in self.orders.values() if o.is_open]))
        order.cancel("CANCELLED_BY_CLIENT", self.now)
        self._event(order)
        if told:  # the cancel's ack
            self._tell(order.client_order_id, order.status, order.filled_qty)

    @rule(action=st.sampled_from([ControlAction.HALT, ControlAction.FLATTEN] + [ControlAction.RESUME] * 4))
    def control(self, action):
        self.engine.control(action, "prop", "test", self.now)
        self._settle()

    @rule()
    def heartbeat(self):
        self.engine.expire(self.now)
        self.stored = self.engine.snapshot()
        self.engine.figures_stored()

    @rule()
    def restart(self):
        new = RiskEngine(LIMITS, START, start_balances=START_BALANCES)
        open_orders = [(c, o.symbol, o.side, o.qty, o.remaining, o.kind is OrderKind.LIMIT and o.tif is TimeInForce.GTC)
                       for c, o in self.orders.items() if o.status in OPEN_STATUSES]
        assert new.replay(list(self.db), open_orders, self.stored) == len(self.db)
        if self.stored is not None:
            assert new.snapshot() == self.stored  # trading state, peak, day start, breakers: as stored
        self.engine, self.applied = new, {f["fill_id"] for f in self.db}
        self.told_terminal = {c for c, o in self.orders.items() if o.status in TERMINAL_STATUSES}

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def ledger_balances_against_a_brute_force(self):
        led = self.engine.ledger
        for symbol in SYMBOLS:
            mine = [f for f in self.db if f["fill_id"] in self.applied and f["symbol"] == symbol]
            qty = sum((Fraction(f["qty"]) * (1 if f["side"] == "BUY" else -1) for f in mine), Fraction(0))
            flow = sum((Fraction(f["qty"]) * Fraction(f["price"]) * (-1 if f["side"] == "BUY" else 1) for f in mine),
                       Fraction(0))
            fees = sum((Fraction(f["fee"]) for f in mine), Fraction(0))
            pos = led.position(symbol)
            assert pos.qty == qty and pos.fees == fees and pos.realized - pos.cost == flow
            if pos.qty:
                mark = pos.price_for_mark()
                assert pos.unrealized() == pos.qty * mark - pos.cost
        assert led.equity() == START + led.realized() - led.fees() + led.unrealized()
        assert led.equity() == led.cash() + sum((p.qty * p.price_for_mark() for p in led.positions.values()
                                                 if p.qty), D(0))

    @invariant()
    def working_orders_add_up_and_terminal_orders_stay_ended(self):
        eng = self.engine
        totals: dict = {}
        for coid, work in eng.working.items():
            assert work.remaining > 0 and coid not in self.told_terminal
            key = (work.symbol, work.side)
            totals[key] = totals.get(key, D(0)) + work.remaining
        assert totals == eng.exposure


TestRiskMachine = RiskMachine.TestCase
TestRiskMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
