"""Risk core: each check alone, the gate's order, ADJUSTED, rates, loss streak, breakers, state."""
from __future__ import annotations

import dataclasses
from decimal import Context, Inexact, getcontext, localcontext
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.risk import checks as ck
from services.risk.checks import Reason, SymbolRules
from services.risk.core import DAY_NS, Approval, Denial, RiskEngine
from services.risk.guards import LossStreak, RateLimiter, TokenBucket, breaches
from services.risk.limits import RiskLimits, default_rules
from shared.enums import ControlAction, OrderKind, OrderStatus, Side, TimeInForce, TradingState
from shared.messages import OrderRequest

MS = 1_000_000
S = 1_000_000_000
T0 = 1_700_000_000 * S  # 2023-11-14, 22:13 UTC: well inside one day
RULES = SymbolRules("BTCUSDT", lot_size=D("0.001"), tick_size=D("0.5"), min_notional=D("0.1"),
                    max_order_notional=D("2"), max_position=D("0.01"), max_notional=D("1.5"))


def order(qty="0.005", side=Side.BUY, symbol="BTCUSDT", kind=OrderKind.MARKET, price=None, coid="c1",
          strategy="s", tif=TimeInForce.GTC) -> OrderRequest:
    return OrderRequest(ts=T0, client_order_id=coid, strategy=strategy, symbol=symbol, side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price), tif=tif)


def fill(fill_id, side, qty, price, fee="0", symbol="BTCUSDT", coid="c1", ts=T0) -> dict:
    return {"fill_id": fill_id, "client_order_id": coid, "symbol": symbol, "side": side.value,
            "price": str(price), "qty": str(qty), "fee": str(fee), "fee_asset": "USDT", "ts": ts}


def limits(**kw) -> RiskLimits:
    rules = kw.pop("rules", {"BTCUSDT": RULES, "ETHUSDT": SymbolRules("ETHUSDT", *[getattr(RULES, f) for f in (
        "lot_size", "tick_size", "min_notional", "max_order_notional", "max_position", "max_notional")])})
    base = dict(stale_book_ms=1000, orders_per_s=100, orders_per_min=6000, daily_loss=D(0), daily_loss_soft=D(0),
                max_drawdown=D(0), drawdown_soft=D(0))
    base.update(kw)
    return RiskLimits(rules=rules, **base)


def mark(eng: RiskEngine, mid: float, now: int) -> None:
    """A book, then the evaluation the shell runs after each batch of events."""
    eng.on_book("BTCUSDT", mid, now)
    eng.evaluate(now)


def engine(start_balances=None, **kw) -> RiskEngine:
    eng = RiskEngine(limits(**kw), D("1000"), start_balances=start_balances)
    eng.on_book("BTCUSDT", 100.25, T0)
    return eng


# -- the checks one by one ----------------------------------------------------------------

def test_check_qty_price_and_tick_grids():
    assert ck.check_qty(D("0.005"), RULES) is None
    for bad in ("0", "-0.001", "0.0005", "1e12", "1E-9", "0.00100000001"):
        assert ck.check_qty(D(bad), RULES) == Reason.BAD_QTY, bad
    assert ck.check_qty(D("1e999999"), RULES) == Reason.BAD_QTY  # no overflow on the way
    assert ck.check_price(OrderKind.MARKET, None, RULES) is None
    assert ck.check_price(OrderKind.LIMIT, D("100.5"), RULES) is None
    for bad in (None, D(0), D("-1"), D("100.25"), D("1e13")):
        assert ck.check_price(OrderKind.LIMIT, bad, RULES) == Reason.BAD_PRICE, bad


def test_check_state():
    B, SELL = Side.BUY, Side.SELL
    assert ck.check_state(TradingState.ACTIVE, D(0), D(0), B, D(1)) is None
    assert ck.check_state(TradingState.HALTED, D("0.003"), D(0), SELL, D("0.001")) == Reason.HALTED
    assert ck.check_state(TradingState.REDUCING, D("0.003"), D(0), SELL, D("0.003")) is None
    assert ck.check_state(TradingState.REDUCING, D("0.003"), D(0), SELL, D("0.004")) == Reason.REDUCING
    assert ck.check_state(TradingState.REDUCING, D("0.003"), D("0.002"), SELL, D("0.002")) == Reason.REDUCING
    assert ck.check_state(TradingState.REDUCING, D("0.003"), D(0), B, D("0.001")) == Reason.REDUCING
    assert ck.check_state(TradingState.REDUCING, D("-0.003"), D(0), B, D("0.001")) is None
    assert ck.check_state(TradingState.REDUCING, D(0), D(0), SELL, D("0.001")) == Reason.REDUCING


def test_check_book_band_notional_open_orders():
    assert ck.check_book(None, T0, MS) == Reason.STALE_BOOK
    assert ck.check_book(T0, T0 + MS, MS) is None and ck.check_book(T0, T0 + MS + 1, MS) == Reason.STALE_BOOK
    assert ck.check_band(OrderKind.LIMIT, D("101"), D("100"), D("100")) is None  # exactly 100 bps
    assert ck.check_band(OrderKind.LIMIT, D("101.01"), D("100"), D("100")) == Reason.PRICE_BAND
    assert ck.check_band(OrderKind.LIMIT, D("98.99"), D("100"), D("100")) == Reason.PRICE_BAND
    assert ck.check_band(OrderKind.LIMIT, D("50"), D("100"), D(0)) is None  # no band
    assert ck.check_band(OrderKind.MARKET, None, D("100"), D("1")) is None
    assert ck.check_notional(D("0.09"), RULES) == Reason.MIN_NOTIONAL
    assert ck.check_notional(D("0.1"), RULES) is None and ck.check_notional(D("2"), RULES) is None
    assert ck.check_notional(D("2.01"), RULES) == Reason.MAX_ORDER_NOTIONAL
    assert ck.check_open_orders(True, 3, 3) == Reason.MAX_OPEN_ORDERS
    assert ck.check_open_orders(False, 3, 3) is None and ck.check_open_orders(True, 2, 3) is None


def test_check_position_base_notional_working_and_reducing():
    p = ck.check_position
    assert p(D(0), D(0), Side.BUY, D("0.01"), D("100"), RULES) is None
    assert p(D(0), D(0), Side.BUY, D("0.011"), D("100"), RULES) == Reason.MAX_POSITION
    assert p(D("0.006"), D(0), Side.BUY, D("0.005"), D("100"), RULES) == Reason.MAX_POSITION
    assert p(D(0), D("0.006"), Side.BUY, D("0.005"), D("100"), RULES) == Reason.MAX_POSITION
    assert p(D("0.006"), D(0), Side.SELL, D("0.016"), D("100"), RULES) is None
    assert p(D("0.006"), D(0), Side.SELL, D("0.017"), D("100"), RULES) == Reason.MAX_POSITION
    assert p(D(0), D(0), Side.BUY, D("0.01"), D("151"), RULES) == Reason.MAX_NOTIONAL  # 1.51 > 1.5
    # an over-limit position may always shrink, but not flip past the limit
    assert p(D("0.03"), D(0), Side.SELL, D("0.01"), D("100"), RULES) is None
    assert p(D("0.03"), D(0), Side.SELL, D("0.045"), D("100"), RULES) == Reason.MAX_POSITION
    assert ck.position_room(D("0.006"), D("0.001"), Side.BUY, D("100"), RULES) == D("0.003")
    assert ck.position_room(D("0.006"), D(0), Side.SELL, D("100"), RULES) == D("0.016")
    assert ck.position_room(D(0), D(0), Side.BUY, D("200"), RULES) == D("0.007")  # 1.5 / 200 = 0.0075
    assert ck.position_room(D("0.02"), D(0), Side.BUY, D("100"), RULES) == 0


# -- the gate ----------------------------------------------------------------------------

def test_a_good_order_is_approved_and_takes_a_rate_token():
    eng = engine(orders_per_s=2)
    assert eng.check(order(), T0 + MS) == Approval(D("0.005"))
    assert eng.check(order(), T0 + MS) == Approval(D("0.005"))
    assert eng.check(order(), T0 + MS).code == Reason.RATE_LIMIT
    assert eng.check(order(strategy="other"), T0 + MS) == Approval(D("0.005"))  # per strategy
    assert eng.check(order(), T0 + 501 * MS) == Approval(D("0.005"))  # half a second: one token back


@pytest.mark.parametrize("req,code", [
    (order("0"), Reason.BAD_QTY), (order("0.0005"), Reason.BAD_QTY), (order(symbol="DOGEUSDT"), Reason.UNKNOWN_SYMBOL),
    (order(symbol="ETHUSDT"), Reason.STALE_BOOK), (order(kind=OrderKind.LIMIT), Reason.BAD_PRICE),
    (order(kind=OrderKind.LIMIT, price="120"), Reason.PRICE_BAND),
    (order("0.001", kind=OrderKind.LIMIT, price="99.5"), Reason.MIN_NOTIONAL),
    (order("0.03", Side.SELL), Reason.MAX_ORDER_NOTIONAL)])
def test_denials_carry_code_and_text(req, code):
    denial = engine(adjust=False).check(req, T0 + MS)
    assert isinstance(denial, Denial) and denial.code == code, denial
    assert denial.as_reason() == {"code": code, "text": denial.text} and ck.TEXTS[code] in denial.text


def test_the_gate_is_exact_whatever_the_callers_decimal_context_and_leaves_it_as_it_was():
    """check() computes in its own copy of MONEY, not in the caller's context (here 3 digits,
    which would round 0.005 × 100.25 to 0.501 and let through a notional over the limit)."""
    tight = Context(prec=3, traps=[])
    reqs = [order(), order("0.015"), order(kind=OrderKind.LIMIT, price="100.5"), order("0.001", coid="x"),
            order(kind=OrderKind.LIMIT, price="120")]
    rules = {"BTCUSDT": dataclasses.replace(RULES, max_order_notional=D("0.5012"))}
    plain = [engine(rules=rules).check(r, T0 + MS) for r in reqs]
    eng = engine(rules=rules)
    with localcontext(tight) as ctx:
        assert [eng.check(r, T0 + MS) for r in reqs] == plain
        assert getcontext() is ctx and ctx.prec == 3 and not ctx.flags[Inexact]
    assert plain[0].code == Reason.MAX_ORDER_NOTIONAL  # 0.50125 > 0.5012: exact, not rounded to 0.501


def test_book_goes_stale_and_a_one_sided_book_is_no_mark():
    eng = engine()
    assert isinstance(eng.check(order(), T0 + 1000 * MS), Approval)
    assert eng.check(order(), T0 + 1001 * MS).code == Reason.STALE_BOOK
    eng.on_book("ETHUSDT", 0.0, T0)  # fresh, but no mid: cannot be priced
    assert eng.check(order(symbol="ETHUSDT"), T0).code == Reason.STALE_BOOK
    eng.on_book("DOGEUSDT", 1.0, T0)  # not traded: ignored
    assert "DOGEUSDT" not in eng.book_ns


def test_adjusted_cuts_to_the_lot_and_respects_min_notional():
    eng = engine()
    eng.on_fill(fill("f1", Side.BUY, "0.006", "100"), T0)
    assert eng.check(order("0.006"), T0) == Approval(D("0.004"), adjusted=True)
    eng.track("w", "BTCUSDT", Side.BUY, D("0.004"), D("0.004"))
    assert eng.check(order("0.002", coid="x"), T0).code == Reason.MAX_POSITION  # room 0: nothing fits
    eng.untrack("w")
    eng.on_fill(fill("f2", Side.BUY, "0.003", "100"), T0)  # 0.009: room 0.001, notional 0.10025 ≥ 0.1
    assert eng.check(order("0.005"), T0) == Approval(D("0.001"), adjusted=True)
    strict = engine(adjust=False)
    strict.on_fill(fill("f1", Side.BUY, "0.006", "100"), T0)
    assert strict.check(order("0.006"), T0).code == Reason.MAX_POSITION
    tight = engine(rules={"BTCUSDT": SymbolRules("BTCUSDT", D("0.001"), D("0.5"), D("0.5"), D("2"), D("0.01"),
                                                 D("1.5"))})
    tight.on_fill(fill("f1", Side.BUY, "0.008", "100"), T0)  # room 0.002 → notional 0.2 < 0.5
    assert tight.check(order("0.005"), T0).code == Reason.MAX_POSITION


def test_working_orders_count_until_filled_or_ended():
    eng = engine({"USDT": D("1000"), "BTC": D("1")})  # BTC to sell: the SELL below is judged by its position
    eng.track("w1", "BTCUSDT", Side.BUY, D("0.006"), D("0.006"))
    assert eng.exposure[("BTCUSDT", Side.BUY)] == D("0.006")
    assert eng.check(order("0.005", coid="a"), T0) == Approval(D("0.004"), adjusted=True)
    assert isinstance(eng.check(order("0.005", Side.SELL, coid="b"), T0), Approval)  # other side not worse
    eng.on_fill(fill("wf1", Side.BUY, "0.004", "100", coid="w1"), T0)
    assert eng.working["w1"].remaining == D("0.002") and eng.exposure[("BTCUSDT", Side.BUY)] == D("0.002")
    eng.on_order("w1", OrderStatus.CANCELLED, D("0.004"))
    assert eng.working == {} and eng.exposure == {}


def test_orders_of_unknown_fate_settle_or_expire():
    eng = engine()
    eng.track("u", "BTCUSDT", Side.BUY, D("0.005"), D("0.005"), rests=False, expires_ns=T0 + S)
    eng.on_order("u", OrderStatus.PARTIALLY_FILLED, D("0.002"))  # the broker has it: 0.003 left, no expiry
    assert (eng.working["u"].remaining, eng.working["u"].expires_ns) == (D("0.003"), 0)
    eng.track("v", "BTCUSDT", Side.SELL, D("0.001"), D("0.001"), rests=False, expires_ns=T0 + S)
    eng.expire(T0 + S)
    assert set(eng.working) == {"u"}


def test_max_open_orders_counts_what_may_rest():
    eng = engine(max_open_orders=1)
    eng.track("w", "BTCUSDT", Side.SELL, D("0.001"), D("0.001"))
    assert eng.check(order(kind=OrderKind.LIMIT, price="100", coid="l"), T0).code == Reason.MAX_OPEN_ORDERS
    assert isinstance(eng.check(order(kind=OrderKind.LIMIT, price="100", tif=TimeInForce.IOC), T0), Approval)
    assert isinstance(eng.check(order(), T0), Approval)


def test_halt_resume_flatten_state_with_who_and_why():
    eng = engine()
    assert eng.control(ControlAction.HALT, "ops", "drill", T0) is True
    assert (eng.state, eng.state_code, eng.state_by, eng.state_reason) == (TradingState.HALTED, "HALT", "ops", "drill")
    assert eng.check(order(), T0).code == Reason.HALTED
    assert eng.control(ControlAction.HALT, "ops", "again", T0) is False and eng.state_reason == "drill"
    assert eng.control(ControlAction.STATE, "ops", "", T0) is False
    assert eng.control(ControlAction.FLATTEN, "api", "wind down", T0) is True
    assert eng.check(order(), T0).code == Reason.REDUCING
    assert eng.control(ControlAction.RESUME, "api", "ok", T0) is True
    assert isinstance(eng.check(order(), T0), Approval)
    assert [(c.previous, c.state, c.code) for c in eng.take_changes()] == [
        (TradingState.ACTIVE, TradingState.HALTED, "HALT"), (TradingState.HALTED, TradingState.REDUCING, "FLATTEN"),
        (TradingState.REDUCING, TradingState.ACTIVE, "RESUME")]


def test_flatten_orders_close_every_position_on_the_lot():
    eng = engine()
    eng.on_fill(fill("f1", Side.BUY, "0.006", "100"), T0)
    eng.on_fill(fill("f2", Side.SELL, "0.002", "100", symbol="ETHUSDT"), T0)
    orders = eng.flatten_orders(T0, "fl")
    assert [(o.client_order_id, o.symbol, o.side, o.qty, o.kind) for o in orders] == [
        ("fl-BTCUSDT", "BTCUSDT", Side.SELL, D("0.006"), OrderKind.MARKET),
        ("fl-ETHUSDT", "ETHUSDT", Side.BUY, D("0.002"), OrderKind.MARKET)]


# -- guards ---------------------------------------------------------------------------------

def test_token_bucket_is_exact_and_ignores_a_clock_stepping_back():
    b = TokenBucket(3, S, T0)
    for _ in range(3):
        assert b.available(T0)
        b.take(T0)
    assert not b.available(T0) and not b.available(T0 - S)
    assert not b.available(T0 + S // 3 - 1) and b.available(T0 + S // 3 + 1)
    r = RateLimiter(per_s=100, per_min=2)
    r.take("s", T0), r.take("s", T0)
    assert not r.allows("s", T0 + S) and r.allows("s", T0 + 30 * S)


def test_made_up_strategy_names_share_one_ceiling():
    # the strategy is a name the client sends: one per order passed a 10/s limit 299 times in 0.2 s
    from services.risk.guards import TOTAL_FACTOR
    r = RateLimiter(per_s=10, per_min=300)
    assert sum(r.acquire(f"s{n}", T0) for n in range(1000)) == 10 * TOTAL_FACTOR
    assert not r.acquire("late", T0) and r.acquire("late", T0 + S // (10 * TOTAL_FACTOR))
    one = RateLimiter(per_s=10, per_min=300)
    assert sum(one.acquire("s", T0) for _ in range(100)) == 10  # one name: its own limit, as before


@given(steps=st.lists(st.tuples(st.sampled_from("abc"), st.integers(-S, S)), max_size=60),
       per_s=st.integers(1, 4), per_min=st.integers(1, 12))
def test_acquire_is_allows_then_take(steps, per_s, per_min):
    """RateLimiter.acquire refills and takes in one call; the two-step way is the reference."""
    fast, slow = RateLimiter(per_s, per_min), RateLimiter(per_s, per_min)
    now = T0
    for strategy, dt in steps:
        now += dt  # the clock may step back too
        expect = slow.allows(strategy, now)
        if expect:
            slow.take(strategy, now)
        assert fast.acquire(strategy, now) == expect
        assert list(fast.buckets) == list(slow.buckets)
        assert [(b.level, b.t) for pair in fast.buckets.values() for b in pair] == [
            (b.level, b.t) for pair in slow.buckets.values() for b in pair]


def test_loss_streak_pauses_entries_but_not_exits():
    g = LossStreak(2, 60 * S, 120 * S)
    assert g.on_trip(D("-1"), T0) is False and g.on_trip(D("5"), T0 + S) is False
    assert g.on_trip(D("-1"), T0 + 61 * S) is False  # the first loss left the window
    assert g.on_trip(D("-0.01"), T0 + 62 * S) is True and g.paused(T0 + 100 * S)
    assert not g.paused(T0 + 182 * S)

    eng = engine(loss_streak=1, loss_window_ns=60 * S, loss_pause_ns=60 * S)
    eng.on_fill(fill("a", Side.BUY, "0.005", "100", fee="0.001"), T0)
    eng.on_fill(fill("b", Side.SELL, "0.002", "101", fee="0.001"), T0)  # partly closed: no round trip yet
    assert isinstance(eng.check(order("0.001", coid="x"), T0), Approval)
    eng.on_fill(fill("c", Side.SELL, "0.003", "99", fee="0.001"), T0 + S)  # flat: 0.002 - 0.003 - fees < 0
    assert eng.check(order("0.001", coid="y"), T0 + S).code == Reason.LOSS_COOLDOWN
    eng.on_fill(fill("d", Side.BUY, "0.002", "100"), T0 + S)
    assert isinstance(eng.check(order("0.001", Side.SELL, coid="z"), T0 + S), Approval)  # reducing passes
    assert eng.check(order("0.001", coid="w"), T0 + 61 * S + 1).code == Reason.STALE_BOOK  # the pause is over
    eng.on_book("BTCUSDT", 100.25, T0 + 61 * S + 1)
    assert isinstance(eng.check(order("0.001", coid="w"), T0 + 61 * S + 1), Approval)


def test_breaches_are_exact_fractions():
    args = (D("0.02"), D("0.01"), D("0.05"), D("0.03"))
    assert breaches(D("990"), D("1000"), D("1000"), *args) == {"DAILY_LOSS_SOFT"}
    assert breaches(D("990.01"), D("1000"), D("1000"), *args) == set()
    assert breaches(D("980"), D("1000"), D("1000"), *args) == {"DAILY_LOSS", "DAILY_LOSS_SOFT"}
    assert breaches(D("1045"), D("1045"), D("1100"), *args) == {"MAX_DRAWDOWN", "DRAWDOWN_SOFT"}
    assert breaches(D("1"), D("1000"), D("1000"), D(0), D(0), D(0), D(0)) == set()


def test_breakers_reduce_then_halt_fire_once_and_stay_until_resume():
    eng = RiskEngine(limits(daily_loss=D("0.02"), daily_loss_soft=D("0.01"), max_drawdown=D("0.5"),
                            drawdown_soft=D("0.4")), D("1000"))
    eng.on_fill(fill("f1", Side.BUY, "0.01", "100"), T0)
    mark(eng, 100.0, T0)
    assert (eng.day_start, eng.peak, eng.state) == (D("1000"), D("1000"), TradingState.ACTIVE)
    mark(eng, 0.5, T0 + 1)  # equity 1000 - 0.995
    mark(eng, 1.0, T0 + 2)
    assert eng.state is TradingState.ACTIVE
    eng.take_changes()
    big = RiskEngine(limits(daily_loss=D("0.02"), daily_loss_soft=D("0.01")), D("10"))
    big.on_fill(fill("f1", Side.BUY, "0.01", "100"), T0)
    mark(big, 100.0, T0)
    mark(big, 89.0, T0 + 1)  # -0.11 of 10: 1.1 % → REDUCING
    assert (big.state, big.state_code, big.state_by) == (TradingState.REDUCING, "DAILY_LOSS_SOFT", "risk")
    mark(big, 79.0, T0 + 2)  # 2.1 % → HALTED
    assert (big.state, big.state_code) == (TradingState.HALTED, "DAILY_LOSS")
    big.control(ControlAction.RESUME, "ops", "accepted", T0 + 3)
    mark(big, 78.0, T0 + 4)  # still beyond: fired already, the operator's RESUME stands
    assert big.state is TradingState.ACTIVE
    mark(big, 100.0, T0 + 5)  # recovered: re-armed
    mark(big, 79.0, T0 + 6)
    assert big.state is TradingState.HALTED
    assert [c.code for c in big.take_changes()] == ["DAILY_LOSS_SOFT", "DAILY_LOSS", "RESUME", "DAILY_LOSS"]


def test_a_new_utc_day_takes_a_new_start_equity_and_may_lift_a_daily_halt():
    for reset in (False, True):
        eng = RiskEngine(limits(daily_loss=D("0.02"), day_reset=reset), D("10"))
        eng.on_fill(fill("f1", Side.BUY, "0.01", "100"), T0)
        mark(eng, 100.0, T0)
        mark(eng, 79.0, T0 + 1)
        assert eng.state is TradingState.HALTED
        next_day = (T0 // DAY_NS + 1) * DAY_NS
        mark(eng, 79.0, next_day)
        assert eng.day == next_day // DAY_NS and eng.day_start == D("10") - D("0.21")
        assert eng.state is (TradingState.ACTIVE if reset else TradingState.HALTED)


def test_snapshot_restore_round_trip():
    eng = engine(daily_loss=D("0.5"))
    eng.control(ControlAction.HALT, "api", "why", T0)
    snap = eng.snapshot()
    other = RiskEngine(eng.limits, D("1000"))
    other.restore(snap)
    assert other.snapshot() == snap and other.state is TradingState.HALTED and not other.figures_changed


# -- the hand-offs between the engine and its shells -----------------------------------------

def test_recheck_of_a_retry_after_a_timeout_keeps_the_unsure_order_counted_when_denied():
    eng = engine()
    eng.on_sent("u", "BTCUSDT", Side.BUY, D("0.006"), True, T0)  # sent; the broker never answered
    expires = eng.working["u"].expires_ns
    assert expires > T0 and eng.exposure[("BTCUSDT", Side.BUY)] == D("0.006")
    eng.control(ControlAction.HALT, "ops", "drill", T0)
    denial = eng.recheck(order("0.006", coid="u"), T0 + MS)
    assert isinstance(denial, Denial) and denial.code == Reason.HALTED
    work = eng.working_order("u")  # the broker may have the first attempt: still counted, as it was
    assert work is not None and (work.symbol, work.side, work.qty, work.remaining, work.rests, work.expires_ns) == (
        "BTCUSDT", Side.BUY, D("0.006"), D("0.006"), True, expires)
    assert eng.exposure == {("BTCUSDT", Side.BUY): D("0.006")}
    eng.on_fill(fill("uf", Side.BUY, "0.002", "100", coid="u"), T0 + MS)  # partly filled meanwhile
    denial = eng.recheck(order("0.006", coid="u"), T0 + 2 * MS)
    assert isinstance(denial, Denial) and eng.working["u"].remaining == D("0.004")
    assert eng.exposure == {("BTCUSDT", Side.BUY): D("0.004")} and eng.working["u"].expires_ns == expires


def test_recheck_judges_a_retry_without_its_earlier_attempt_and_checks_the_rest_as_check_does():
    eng = engine()
    eng.on_sent("u", "BTCUSDT", Side.BUY, D("0.006"), False, T0)
    # counted once, not twice: the whole 0.006 fits the 0.01 limit again (check() alone cuts it)
    assert eng.check(order("0.006", coid="u"), T0) == Approval(D("0.004"), adjusted=True)
    assert eng.recheck(order("0.006", coid="u"), T0) == Approval(D("0.006"))
    assert eng.working_order("u") is None and eng.exposure == {}  # the shell sends it: on_sent counts it again
    eng.on_sent("u", "BTCUSDT", Side.BUY, D("0.006"), False, T0)
    assert eng.exposure == {("BTCUSDT", Side.BUY): D("0.006")}
    # an order the broker confirmed (no expiry) is not an unsure one: it stays counted
    eng.on_order("u", OrderStatus.PENDING, D(0))
    assert eng.recheck(order("0.006", coid="u"), T0) == Approval(D("0.004"), adjusted=True)
    assert eng.working["u"].remaining == D("0.006")
    assert eng.recheck(order("0.001", coid="new"), T0) == Approval(D("0.001"))  # unknown: plain check


def test_take_changes_drains_the_pending_state_changes():
    eng = engine()
    assert not eng.has_changes and eng.take_changes() == []
    eng.control(ControlAction.HALT, "ops", "drill", T0)
    eng.control(ControlAction.RESUME, "ops", "over", T0 + 1)
    assert eng.has_changes
    taken = eng.take_changes()
    assert [(c.ts, c.previous, c.state, c.code, c.by, c.reason) for c in taken] == [
        (T0, TradingState.ACTIVE, TradingState.HALTED, "HALT", "ops", "drill"),
        (T0 + 1, TradingState.HALTED, TradingState.ACTIVE, "RESUME", "ops", "over")]
    assert not eng.has_changes and eng.take_changes() == []
    eng.control(ControlAction.HALT, "ops", "again", T0 + 2)
    assert [c.reason for c in eng.take_changes()] == ["again"] and len(taken) == 2  # a new list each time


def test_evaluate_due_runs_only_after_marks_or_fills_moved():
    eng = RiskEngine(limits(), D("1000"))
    assert not eng.needs_evaluation
    eng.evaluate_due(T0)
    assert eng.day is None and eng.peak is None and not eng.figures_changed  # nothing moved: not evaluated
    eng.on_book("BTCUSDT", 100.0, T0)
    assert eng.needs_evaluation
    eng.evaluate_due(T0)
    assert not eng.needs_evaluation and (eng.day, eng.peak) == (T0 // DAY_NS, D("1000"))
    next_day = (T0 // DAY_NS + 1) * DAY_NS
    eng.evaluate_due(next_day)
    assert eng.day == T0 // DAY_NS  # no mark or fill since: the day is rolled by the next evaluation
    eng.on_fill(fill("f1", Side.BUY, "0.001", "100"), next_day)
    assert eng.needs_evaluation
    eng.evaluate_due(next_day)
    assert not eng.needs_evaluation and eng.day == next_day // DAY_NS


def test_figures_changed_until_stored():
    eng = RiskEngine(limits(), D("1000"))
    assert not eng.figures_changed
    eng.on_book("BTCUSDT", 100.0, T0)
    eng.evaluate_due(T0)  # a first day and peak
    assert eng.figures_changed
    eng.figures_stored()
    assert not eng.figures_changed
    eng.on_book("BTCUSDT", 100.0, T0 + 1)
    eng.evaluate_due(T0 + 1)  # same day, same peak: nothing new to store
    assert not eng.figures_changed
    eng.control(ControlAction.HALT, "ops", "drill", T0 + 2)
    assert eng.figures_changed
    eng.figures_stored()
    assert not eng.figures_changed


def test_settle_order_books_each_fill_once_then_applies_the_status():
    eng = engine()
    eng.on_sent("s", "BTCUSDT", Side.BUY, D("0.005"), True, T0)
    part = [fill("s1", Side.BUY, "0.002", "100", coid="s")]
    assert eng.settle_order("s", OrderStatus.PARTIALLY_FILLED, D("0.002"), part, T0) == 1
    work = eng.working_order("s")  # the broker has it now: no expiry, 0.003 still working
    assert (work.remaining, work.expires_ns) == (D("0.003"), 0) and eng.ledger.qty("BTCUSDT") == D("0.002")
    assert eng.booked_for("s1") == "s" and eng.has_fill("s1") and not eng.has_fill("s2")
    both = part + [fill("s2", Side.BUY, "0.003", "100.5", coid="s")]
    assert eng.settle_order("s", OrderStatus.FILLED, D("0.005"), both, T0 + 1) == 1  # s1 again: booked once
    assert eng.settle_order("s", OrderStatus.FILLED, D("0.005"), both, T0 + 2) == 0
    assert eng.ledger.qty("BTCUSDT") == D("0.005") and eng.working_order("s") is None and eng.exposure == {}
    eng.track("c", "BTCUSDT", Side.SELL, D("0.004"), D("0.004"))
    assert eng.settle_order("c", OrderStatus.CANCELLED, D(0), [], T0) == 0  # terminal, no fills: ended
    assert eng.working_order("c") is None and eng.exposure == {}
    assert eng.needs_evaluation


def test_settle_order_hands_a_fill_it_cannot_book_to_on_bad_and_books_the_rest():
    eng = engine()
    eng.on_sent("s", "BTCUSDT", Side.BUY, D("0.005"), False, T0)
    bad = {**fill("b1", Side.BUY, "0.001", "100", coid="s"), "qty": "lots"}
    fills = [fill("g1", Side.BUY, "0.002", "100", coid="s"), bad, fill("g2", Side.BUY, "0.001", "100", coid="s")]
    refused = []
    assert eng.settle_order("s", OrderStatus.PARTIALLY_FILLED, D("0.004"), fills, T0,
                            lambda f, exc: refused.append((f["fill_id"], exc))) == 2
    assert [f for f, _ in refused] == ["b1"] and isinstance(refused[0][1], ValueError) and not eng.has_fill("b1")
    assert eng.ledger.qty("BTCUSDT") == D("0.003") and eng.working["s"].remaining == D("0.001")
    assert eng.book_fills([fill("g3", Side.BUY, "0.001", "100", coid="s")], T0) == 1
    assert eng.working_order("s") is None  # all of it filled
    with pytest.raises(ValueError):  # without on_bad, the error is the caller's
        eng.book_fills([bad], T0)


def test_working_order_and_cancellable_ids():
    eng = engine()
    assert eng.working_order("x") is None and eng.cancellable_ids() == [] and eng.working_count == 0
    eng.track("known", "BTCUSDT", Side.BUY, D("0.002"), D("0.002"))
    eng.on_sent("unsure", "BTCUSDT", Side.SELL, D("0.001"), False, T0)  # the broker may not have it
    eng.track("rest", "ETHUSDT", Side.SELL, D("0.003"), D("0.001"))
    assert eng.cancellable_ids() == ["known", "rest"] and eng.working_count == 3
    assert eng.working_order("rest").remaining == D("0.001") and eng.working_order("unsure").expires_ns
    eng.on_order("unsure", OrderStatus.PENDING, D(0))  # confirmed: now the broker can cancel it
    assert eng.cancellable_ids() == ["known", "unsure", "rest"]


def test_marks_are_the_last_two_sided_mids():
    eng = engine()
    assert eng.marks == {"BTCUSDT": D("100.25")}
    eng.on_book("BTCUSDT", 0.0, T0 + 1)  # one-sided: the mark stays
    eng.on_book("DOGEUSDT", 1.0, T0 + 1)  # not traded: no mark
    eng.on_book("ETHUSDT", 20.5, T0 + 1)
    assert eng.marks == {"BTCUSDT": D("100.25"), "ETHUSDT": D("20.5")}


def test_restore_legacy_takes_the_last_state_and_the_peak_equity():
    eng = RiskEngine(limits(), D("1000"))
    eng.restore_legacy(TradingState.HALTED, "HALT", "old halt", iter([D("990"), D("1010.5"), D("1001")]))
    assert (eng.state, eng.state_code, eng.state_reason, eng.peak) == (
        TradingState.HALTED, "HALT", "old halt", D("1010.5"))
    fresh = RiskEngine(limits(), D("1000"))
    fresh.restore_legacy(None, "", "", [])
    assert (fresh.state, fresh.peak, fresh.figures_changed) == (TradingState.ACTIVE, None, False)


def test_default_rules_helper():
    rules = default_rules(["btcusdt"], max_position=D(1))
    assert rules["BTCUSDT"].max_position == 1 and rules["BTCUSDT"].lot_size == D("1e-8")
