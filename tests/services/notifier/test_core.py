"""The notifier's core: what is worth a message, when, and how it reads. Time is an argument."""
from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifier import text
from services.notifier.core import GAP_MIN_NS, MD_GRACE_NS, NotifierCore, gap_for
from shared.enums import Liquidity, Side, TradingState
from shared.messages import Alert, Heartbeat, MdStatus
from tests.services.notifier.conftest import NS, T0, fill, risk_state

BATCH = 2 * NS


def core(**kw) -> NotifierCore:
    return NotifierCore(BATCH, **kw)


def texts(c: NotifierCore) -> list[str]:
    return [m.text for m in c.take_messages()]


# -- fills ---------------------------------------------------------------------------

def test_one_fill_reads_as_one_trade():
    c = core()
    c.on_event("fill.BTCUSDT", fill(1, Side.BUY, "61234.5", "0.00120"), T0)
    assert texts(c) == []  # the window is open
    c.poll(T0 + BATCH)
    assert texts(c) == ["🟢 Bought 0.0012 BTCUSDT @ 61,234.50\nfee 0.0612345 USDT (taker)"]


def test_a_burst_of_fills_is_one_message_with_totals():
    c = core()
    c.on_event("fill.BTCUSDT", fill(1, Side.BUY, "61234.5", "0.001", liquidity=Liquidity.MAKER), T0)
    c.on_event("fill.BTCUSDT", fill(2, Side.BUY, "61235", "0.001"), T0 + NS // 2)
    c.on_event("fill.BTCUSDT", fill(3, Side.SELL, "61240.10", "0.002"), T0 + NS)
    c.poll(T0 + BATCH - 1)
    assert texts(c) == []
    c.poll(T0 + BATCH)
    assert texts(c) == ["🔁 3 fills BTCUSDT\n"
                        "🟢 BUY 0.001 @ 61,234.50 (maker)\n"
                        "🟢 BUY 0.001 @ 61,235.00 (taker)\n"
                        "🔴 SELL 0.002 @ 61,240.10 (taker)\n"
                        "Bought 0.002 @ avg 61,234.75 · sold 0.002 @ avg 61,240.10\n"
                        "Fees 0.1837035 USDT"]


def test_symbols_batch_apart_and_a_long_burst_lists_ten():
    c = core()
    for n in range(25):
        c.on_event("fill.BTCUSDT", fill(n), T0 + n)
    c.on_event("fill.ETHUSDT", fill(100, Side.SELL, "3100.1", "0.05", symbol="ETHUSDT"), T0 + NS)
    c.poll(T0 + BATCH)
    (btc,) = texts(c)
    assert btc.startswith("🔁 25 fills BTCUSDT\n") and "… and 15 more" in btc and btc.count("🟢 BUY") == 10
    assert "Bought 0.025 @ avg 61,234.50" in btc and "Fees 1.5308625 USDT" in btc
    c.poll(T0 + NS + BATCH)
    assert texts(c) == ["🔴 Sold 0.05 ETHUSDT @ 3,100.10\nfee 0.0612345 USDT (taker)"]


def test_a_fill_heard_twice_is_told_once_and_zero_window_sends_at_once():
    c = NotifierCore(0)
    c.on_event("fill.BTCUSDT", fill(1), T0)
    c.on_event("fill.BTCUSDT", fill(1), T0)
    assert len(texts(c)) == 1 and c.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10 * NS), st.sampled_from(["BTCUSDT", "ETHUSDT", "SOLUSDT"])),
                min_size=1, max_size=60))
def test_every_fill_is_told_exactly_once_within_its_window(arrivals):
    """Whatever the arrival times: each fill is in exactly one message, of its own symbol, sent
    no later than the batch window after the first fill of that message."""
    c = core()
    arrivals = sorted(arrivals)
    told: list[tuple[int, str]] = []
    for n, (t, sym) in enumerate(arrivals):
        c.poll(t)
        told += [(t, m.text) for m in c.take_messages()]
        c.on_event(f"fill.{sym}", fill(n, symbol=sym), t)
    end = arrivals[-1][0] + BATCH
    while (d := c.next_deadline()) is not None:
        assert d <= end
        c.poll(d)
        told += [(d, m.text) for m in c.take_messages()]
    counted = {}
    for _, body in told:
        head = body.split("\n", 1)[0]
        sym = head.split()[-1] if head.startswith("🔁") else head.split()[3]
        n = int(head.split()[1]) if head.startswith("🔁") else 1
        counted[sym] = counted.get(sym, 0) + n
    want = {}
    for _, sym in arrivals:
        want[sym] = want.get(sym, 0) + 1
    assert counted == want


# -- the trading state ------------------------------------------------------------------

SHABBAT = "Shabbat: from Fri 2026-12-11 15:55 IST to Sat 2026-12-12 17:16 IST"
FLATTEN = "Shabbat starts at Fri 2026-12-11 15:55 IST: entries stop, working orders are cancelled, positions closed"


def test_one_message_per_state_change_and_a_shabbat_pause_reads_naturally():
    c = core()
    c.on_event("risk.state", risk_state(TradingState.ACTIVE), T0)  # the first, and usual: no news
    c.on_event("risk.state", risk_state(TradingState.ACTIVE), T0 + NS)  # repeated every heartbeat
    assert texts(c) == []
    for _ in range(3):
        c.on_event("risk.state", risk_state(TradingState.REDUCING, FLATTEN, "10012.345"), T0)
    for _ in range(3):
        c.on_event("risk.state", risk_state(TradingState.PAUSED_SHABBAT, SHABBAT, "10012.345"), T0)
    c.on_event("risk.state", risk_state(TradingState.ACTIVE, "Shabbat ended at Sat 2026-12-12 17:16 IST"), T0)
    assert texts(c) == [
        # 10,012.345 → 10,012.34: half-even
        "🕯 Shabbat at Fri 15:55 IST: closing positions, no new entries\nEquity 10,012.34 · drawdown 0.00%",
        "🕯 Paused for Shabbat until Sat 17:16 IST\nNo trading from Fri 15:55 IST; it resumes by itself.",
        "✅ Shabbat is over: trading resumed (Sat 17:16 IST)\nEquity 10,000.00 · drawdown 0.00%",
    ]


def test_a_halt_and_a_resume_carry_their_reason_and_figures():
    c = core()
    c.on_event("risk.state", risk_state(TradingState.ACTIVE), T0)
    c.on_event("risk.state", risk_state(TradingState.HALTED, "equity 9790.12, day start 10000, peak 10000",
                                        "9790.1234", "0.02098766"), T0)
    c.on_event("risk.state", risk_state(TradingState.ACTIVE, "back to work [by api]"), T0)
    assert texts(c) == [
        "⛔ Trading halted (was ACTIVE)\nequity 9790.12, day start 10000, peak 10000\n"
        "Equity 9,790.12 · drawdown 2.10%",
        "✅ Trading active again (was HALTED)\nback to work [by api]\nEquity 10,000.00 · drawdown 0.00%",
    ]


def test_the_first_state_heard_is_news_when_not_active_and_memory_survives_a_restart():
    c = core()
    c.on_event("risk.state", risk_state(TradingState.HALTED, "manual stop [by api]"), T0)
    assert texts(c)[0].startswith("⛔ Trading halted\nmanual stop [by api]")
    memory = c.take_memory()
    assert c.take_memory() is None  # handed over once per change
    again = core(memory=memory)  # the notifier restarted: risk still HALTED, nothing new to say
    again.on_event("risk.state", risk_state(TradingState.HALTED, "manual stop [by api]"), T0 + NS)
    assert texts(again) == []
    assert core(memory={"state": "NOPE", "services": 3}).state is None  # another version's memory: ignored


# -- alerts, restarts, silences, the feed ------------------------------------------------

def test_alerts_raised_and_resolved():
    c = core()
    c.on_event("alert.broker", Alert(ts=T0, service="broker", code="STORE_UNAVAILABLE", severity="error",
                                     text="broker: the database refuses writes (disk full)"), T0)
    c.on_event("alert.marketdata", Alert(ts=T0, service="marketdata", code="BOOK_STALLED", severity="warning",
                                         text="BTCUSDT: frames but no book for 10.0s"), T0)
    c.on_event("alert.broker", Alert(ts=T0, service="broker", code="STORE_UNAVAILABLE", severity="resolved",
                                     text="broker: storing again (after 42.0s)"), T0)
    assert texts(c) == ["🚨 broker: STORE_UNAVAILABLE\nbroker: the database refuses writes (disk full)",
                        "⚠️ marketdata: BOOK_STALLED\nBTCUSDT: frames but no book for 10.0s",
                        "✅ Resolved: broker STORE_UNAVAILABLE\nbroker: storing again (after 42.0s)"]


def beat(service: str, pid: int, started: int) -> Heartbeat:
    return Heartbeat(ts=T0, service=service, pid=pid, started_ts=started, status="ok")


def test_a_restart_is_a_new_pid_or_start_time_and_a_gap_is_told_once():
    c = core(gap_ns=gap_for(1000))
    assert gap_for(1000) == GAP_MIN_NS and gap_for(5000) == 25 * NS
    c.on_event("heartbeat.broker", beat("broker", 100, T0 - 60 * NS), T0)
    c.on_event("heartbeat.broker", beat("broker", 100, T0 - 60 * NS), T0 + NS)
    assert texts(c) == []
    c.poll(T0 + NS + GAP_MIN_NS - 1)
    assert texts(c) == []
    c.poll(T0 + NS + GAP_MIN_NS)
    c.poll(T0 + 30 * NS)  # told once, not once per poll
    assert texts(c) == ["🔇 broker is silent: no heartbeat for 10s (last at 20:53:21 UTC)"]
    c.on_event("heartbeat.broker", beat("broker", 131, T0 + 33 * NS), T0 + 34 * NS)
    assert texts(c) == ["🔄 broker restarted after 33s of silence (pid 100 → 131, up since 20:53:53 UTC)"]
    c.on_event("heartbeat.broker", beat("broker", 131, T0 + 36 * NS), T0 + 36 * NS)  # same pid, new start
    assert texts(c) == ["🔄 broker restarted (pid 131, up since 20:53:56 UTC)"]


def test_a_silence_that_ends_in_the_same_process_and_a_restart_across_a_notifier_restart():
    c = core()
    c.on_event("heartbeat.risk", beat("risk", 7, T0), T0)
    c.poll(T0 + 12 * NS)
    c.on_event("heartbeat.risk", beat("risk", 7, T0), T0 + 20 * NS)
    assert texts(c)[1] == "🔊 risk is back after 20s without a heartbeat (same process)"
    memory = c.take_memory()
    again = core(memory=memory, started_ns=T0 + 300 * NS)  # the notifier restarted; risk long before it
    again.on_event("heartbeat.risk", beat("risk", 8, T0 + 50 * NS), T0 + 310 * NS)
    assert texts(again) == ["🔄 risk restarted (pid 7 → 8, up since 20:54:10 UTC)"]
    together = core(memory=memory, started_ns=T0 + 300 * NS)  # `qf up` again: the stack started together
    together.on_event("heartbeat.risk", beat("risk", 9, T0 + 302 * NS), T0 + 303 * NS)
    together.on_event("heartbeat.risk", beat("risk", 10, T0 + 330 * NS), T0 + 331 * NS)
    assert texts(together) == ["🔄 risk restarted (pid 9 → 10, up since 20:58:50 UTC)"]  # then news again


def test_a_feed_outage_is_told_after_the_grace_and_its_end_too():
    c = core()
    c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="DISCONNECTED",
                                          detail="connection closed (1006)"), T0)
    c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="SYNCING",
                                          detail="no book for 5.0s: snapshot #2 in 1.0s (backoff)"), T0 + 5 * NS)
    c.poll(T0 + MD_GRACE_NS - 1)
    assert texts(c) == []
    c.poll(T0 + MD_GRACE_NS)
    c.poll(T0 + MD_GRACE_NS + NS)
    c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="SYNCED"), T0 + 65 * NS)
    assert texts(c) == ["📡 Market data BTCUSDT: no order book for 30s\n"
                        "SYNCING: no book for 5.0s: snapshot #2 in 1.0s (backoff)",
                        "📡 Market data BTCUSDT is back: book in sync after 1m05s without one"]


def test_a_short_reconnect_is_no_news_and_a_replay_end_is_told_once():
    c = core()
    c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="DISCONNECTED"), T0)
    c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="SYNCED"), T0 + 3 * NS)
    c.poll(T0 + 60 * NS)
    for i in range(5):  # marketdata repeats a state that is not SYNCED with every heartbeat
        c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="REPLAY_DONE"), T0 + i * NS)
    c.poll(T0 + 120 * NS)
    assert texts(c) == ["🏁 Replay finished for BTCUSDT: no more market data from the capture"]


def test_a_replay_that_could_not_read_its_capture_is_told_once_as_a_failure():
    c = core()
    detail = "capture unreadable: /data/cut.jsonl.gz: damaged or truncated after line 700"
    for i in range(5):
        c.on_event("status.BTCUSDT", MdStatus(ts=T0, symbol="BTCUSDT", state="REPLAY_FAILED", detail=detail),
                   T0 + i * NS)
    c.poll(T0 + 120 * NS)  # past the grace a book may be away: still told once, and not as "not in sync"
    assert texts(c) == [f"🚨 Replay stopped for BTCUSDT: {detail}"]


# -- text helpers ----------------------------------------------------------------------

def test_numbers_durations_and_clipping():
    assert text.number(Decimal("1234567.8900")) == "1,234,567.89"
    assert text.price(Decimal("61234.5")) == "61,234.50" and text.price(Decimal("0.000123")) == "0.000123"
    assert text.signed(Decimal("-12.345")) == "-12.34" and text.signed(Decimal("0")) == "+0.00"
    assert text.percent(Decimal("0.02098766")) == "2.10%"
    assert [text.duration(s) for s in (0, 59, 65, 3725, 90000)] == ["0s", "59s", "1m05s", "1h02m", "1d01h"]
    long = "\n".join(f"line {i}" for i in range(2000))
    clipped = text.clip(long)
    assert len(clipped) <= text.MAX_TEXT and clipped.endswith("\n…")
