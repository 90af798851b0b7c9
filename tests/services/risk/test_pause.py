"""The Shabbat and Yom Tov pause in the risk core (issue #14 part 2): the state in force follows the
calendar and the clock; the flatten window; SHABBAT denials but risk's own closing orders; an
operator's HALT outlasts the pause; a restart during a pause is paused at once; a checkpoint
never stores the pause."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

from services.risk.checks import Reason
from services.risk.core import MINUTE_NS, Approval, Denial, RiskEngine
from shared.enums import ControlAction, OrderKind, Side, TradingState
from shared.messages import OrderRequest
from shared.shabbat import Calendar, place
from tests.services.risk.test_core import fill, limits

CAL = Calendar(place("Jerusalem"))
# Jerusalem, Shabbat Vayeshev 5787: candle-lighting Fri 2026-12-11 15:55 IST, nightfall Sat 17:16 IST
PAUSE = CAL.at(int(datetime(2026, 12, 12, 12, 0, tzinfo=timezone.utc).timestamp()) * 10**9)
FLATTEN_NS = 15 * MINUTE_NS


def at(day: int, hour: int, minute: int, second: int = 0) -> int:
    return int(datetime(2026, 12, day, hour, minute, second, tzinfo=timezone.utc).timestamp()) * 10**9


def order(now: int, qty: str = "0.005", side: Side = Side.BUY, coid: str = "c1") -> OrderRequest:
    return OrderRequest(ts=now, client_order_id=coid, strategy="s", symbol="BTCUSDT", side=side,
                        kind=OrderKind.MARKET, qty=D(qty))


def engine(now: int) -> RiskEngine:
    eng = RiskEngine(limits(), D("1000"), calendar=CAL, flatten_ns=FLATTEN_NS)
    eng.on_book("BTCUSDT", 100.25, now)
    return eng


def test_the_pause_is_the_one_qf_calendar_prints():
    assert PAUSE is not None and PAUSE.kind == "shabbat"
    assert PAUSE.start.strftime("%a %H:%M %Z") == "Fri 15:55 IST"
    assert PAUSE.end.strftime("%a %H:%M %Z") == "Sat 17:16 IST"


def test_the_state_follows_the_calendar_minute_by_minute():
    start, end = PAUSE.start_ns, PAUSE.end_ns
    eng = engine(start - 3600 * 10**9)
    seen = []
    for now in (start - 3600 * 10**9, start - FLATTEN_NS - 1, start - FLATTEN_NS, start - 1, start,
                end - 1, end, end + 3600 * 10**9):
        eng.on_book("BTCUSDT", 100.25, now)
        eng.on_clock(now)
        seen.append(eng.state)
    A, R, P = TradingState.ACTIVE, TradingState.REDUCING, TradingState.PAUSED_SHABBAT
    assert seen == [A, A, R, R, P, P, A, A]
    changes = eng.take_changes()
    assert [(c.code, c.state, c.ts) for c in changes] == [
        ("SHABBAT_FLATTEN", R, start - FLATTEN_NS), ("SHABBAT", P, start), ("SHABBAT_END", A, end)]
    assert all(c.by == "calendar" for c in changes)
    assert "Fri 2026-12-11 15:55 IST" in changes[1].reason and "Sat 2026-12-12 17:16 IST" in changes[1].reason
    assert eng.held is A


def test_orders_before_are_accepted_entries_stop_in_the_window_and_everything_is_denied_shabbat_during():
    start = PAUSE.start_ns
    eng = engine(start - 20 * MINUTE_NS)
    now = start - 20 * MINUTE_NS
    assert type(eng.check(order(now), now)) is Approval
    assert eng.on_fill(fill("f1", Side.BUY, "0.005", "100"), now)
    now = start - FLATTEN_NS + 1
    eng.on_book("BTCUSDT", 100.25, now)
    denied = eng.check(order(now, coid="c2"), now)  # an entry in the flatten window: REDUCING
    assert type(denied) is Denial and denied.code == Reason.REDUCING
    assert type(eng.check(order(now, "0.002", Side.SELL, "c3"), now)) is Approval  # an exit still goes
    now = start + MINUTE_NS
    eng.on_book("BTCUSDT", 100.25, now)
    for o in (order(now, coid="c4"), order(now, "0.001", Side.SELL, "c5")):  # entries and exits alike
        d = eng.check(o, now)
        assert type(d) is Denial and d.code == Reason.SHABBAT and "PAUSED_SHABBAT" in d.text
    closing = eng.flatten_orders(now, f"shabbat-{now:x}")  # risk's own closing order passes
    assert [(o.side, o.qty) for o in closing] == [(Side.SELL, D("0.005"))]
    assert type(eng.check(closing[0], now)) is Approval
    assert eng.flatten_due  # a position is still held (the fill has not come yet)


def test_an_operators_halt_during_the_pause_stays_after_it_and_a_resume_waits_for_nightfall():
    start, end = PAUSE.start_ns, PAUSE.end_ns
    eng = engine(start + MINUTE_NS)
    eng.on_clock(start + MINUTE_NS)
    assert eng.state is TradingState.PAUSED_SHABBAT
    assert eng.control(ControlAction.HALT, "ops", "deploy", start + 2 * MINUTE_NS)
    assert eng.state is TradingState.HALTED  # a halt outranks the pause
    eng.on_clock(end)
    assert eng.state is TradingState.HALTED  # ... and outlasts it
    eng2 = engine(start + MINUTE_NS)
    eng2.on_clock(start + MINUTE_NS)
    assert eng2.control(ControlAction.HALT, "ops", "x", start + 2 * MINUTE_NS)
    assert eng2.control(ControlAction.RESUME, "ops", "y", start + 3 * MINUTE_NS)
    assert eng2.state is TradingState.PAUSED_SHABBAT  # resumed beneath the pause: still paused
    eng2.on_clock(end)
    assert eng2.state is TradingState.ACTIVE


def test_a_restart_during_the_pause_is_paused_at_once_and_a_checkpoint_never_stores_the_pause():
    start = PAUSE.start_ns
    eng = engine(start + 10 * MINUTE_NS)
    eng.on_clock(start + 10 * MINUTE_NS)
    assert eng.state is TradingState.PAUSED_SHABBAT
    snap = eng.snapshot()
    assert snap["state"] == "ACTIVE"  # the held state; the pause is the calendar's
    again = engine(start + 20 * MINUTE_NS)
    again.replay([], [], snap)
    again.on_clock(start + 20 * MINUTE_NS)  # what store.rebuild does
    assert again.state is TradingState.PAUSED_SHABBAT
    assert [c.code for c in again.take_changes()] == ["SHABBAT"]
    d = again.check(order(start + 20 * MINUTE_NS), start + 20 * MINUTE_NS)
    assert type(d) is Denial and d.code == Reason.SHABBAT
    legacy = engine(start + 20 * MINUTE_NS)  # a stored PAUSED_SHABBAT checkpoint is taken as ACTIVE
    legacy.restore({**snap, "state": "PAUSED_SHABBAT", "code": "SHABBAT"})
    assert legacy.held is TradingState.ACTIVE


def test_a_check_judges_the_minute_itself_without_a_clock_turn():
    start = PAUSE.start_ns
    eng = engine(start - MINUTE_NS)
    eng.on_clock(start - 20 * MINUTE_NS)
    eng.on_book("BTCUSDT", 100.25, start)
    d = eng.check(order(start), start)  # no on_clock since: check asks the calendar first
    assert type(d) is Denial and d.code == Reason.SHABBAT


def test_without_a_calendar_nothing_changes():
    eng = RiskEngine(limits(), D("1000"))
    eng.on_book("BTCUSDT", 100.25, PAUSE.start_ns)
    eng.on_clock(PAUSE.start_ns + MINUTE_NS)
    assert eng.state is TradingState.ACTIVE and eng.pause_view() is None and eng.pause_next_ns is None
    assert type(eng.check(order(PAUSE.start_ns), PAUSE.start_ns)) is Approval


def test_the_summary_and_the_view_name_the_pause():
    eng = engine(PAUSE.start_ns - 2 * 3600 * 10**9)
    eng.on_clock(PAUSE.start_ns - 2 * 3600 * 10**9)
    view = eng.pause_view()
    assert view["phase"] == "" and view["name"] == "Shabbat" and view["start"].startswith("2026-12-11T15:55")
    assert eng.summary()["pause"] == view and eng.summary()["held"] == "ACTIVE"
    assert eng.pause_next_ns == PAUSE.start_ns - FLATTEN_NS
