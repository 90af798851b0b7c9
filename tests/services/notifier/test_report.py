"""The daily report: its schedule, its exact figures from a real database read read-only, its chart."""
from __future__ import annotations

import os
import shutil
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifier import report
from services.notifier.report import (CATCH_UP_NS, DAY_NS, FillFact, Window, build_report, due_slot, first_slot,
                                      next_slot, report_text, slot_before, summarize)
from shared.db import EquitySnapshot, FillRow, database, init_db
from tests.services.notifier.conftest import NS

SLOT = 1_765_400_400 * NS - (1_765_400_400 % 86400) * NS + 21 * 3600 * NS  # Wed 2025-12-10 21:00 UTC
D = Decimal


# -- when --------------------------------------------------------------------------------

def test_slots_are_daily_at_the_utc_time():
    assert slot_before(SLOT, "21:00") == SLOT
    assert slot_before(SLOT - 1, "21:00") == SLOT - DAY_NS
    assert next_slot(SLOT + 5, "21:00") == SLOT + DAY_NS
    assert slot_before(SLOT, "00:05") == SLOT - 21 * 3600 * NS + 5 * 60 * NS


def test_a_first_start_sends_nothing_at_once_and_a_missed_report_catches_up_within_six_hours():
    last = first_slot(SLOT + 60 * NS, "21:00")
    assert last == SLOT and due_slot(SLOT + 120 * NS, "21:00", last) is None
    assert due_slot(SLOT + DAY_NS, "21:00", last) == SLOT + DAY_NS
    assert due_slot(SLOT + DAY_NS + CATCH_UP_NS, "21:00", last) == SLOT + DAY_NS
    assert due_slot(SLOT + DAY_NS + CATCH_UP_NS + 1, "21:00", last) is None  # too late: skipped


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 3 * 3600 * NS), min_size=1, max_size=80),
       st.sampled_from(["21:00", "00:05", "12:30"]))
def test_a_running_notifier_sends_each_report_exactly_once(steps, at):
    now = SLOT + 7 * NS
    last = first_slot(now, at)
    sent = []
    for step in steps:  # the pump's turns, however far apart (never more than 3 h here)
        now += step
        slot = due_slot(now, at, last)
        if slot is not None:
            sent.append(slot)
            last = slot
    expected = [s for s in range(first_slot(SLOT + 7 * NS, at) + DAY_NS, now + 1, DAY_NS)]
    assert sent == expected


# -- what ------------------------------------------------------------------------------

def facts() -> Window:
    w = Window(SLOT - DAY_NS, SLOT, equity_before=D("10000"))
    w.fills = [FillFact(SLOT - 3600 * NS, "O1", "BTCUSDT", "BUY", D("61000"), D("0.01"), D("0.61"), "USDT"),
               FillFact(SLOT - 3500 * NS, "O1", "BTCUSDT", "BUY", D("61010"), D("0.01"), D("0.6101"), "USDT"),
               FillFact(SLOT - 3000 * NS, "O2", "BTCUSDT", "SELL", D("61100"), D("0.02"), D("1.222"), "USDT")]
    w.equity = [(SLOT - 20 * 3600 * NS, D("10050")), (SLOT - 10 * 3600 * NS, D("9950")),
                (SLOT - 3600 * NS, D("10020.5")), (SLOT - 60 * NS, D("10012.34"))]
    return w


def test_summary_is_exact():
    s = summarize(facts())
    assert (s.fills, s.trades) == (3, 2)
    assert s.volume == D("2442.1") and s.fees == {"USDT": D("2.4421")}
    assert s.equity_start == D("10000") and s.equity_end == D("10012.34") and s.pnl == D("12.34")
    assert s.peak == D("10050") and s.drawdown == D("0.00995025") and s.drawdown_abs == D("100")
    assert s.symbols == {"BTCUSDT": {"trades": 2, "fills": 3, "bought": D("0.02"), "sold": D("0.02")}}


def test_report_text_reads_well():
    assert report_text(summarize(facts()), "USDT") == (
        "📊 Daily report · 24 h to Wed 10 Dec 21:00 UTC\n"
        "Net P&L +12.34 USDT (+0.12%)\n"
        "Equity 10,012.34 USDT (from 10,000.00)\n"
        "Max drawdown 1.00% (-100.00 USDT)\n"
        "Trades 2 · fills 3 · volume 2,442.10 USDT\n"
        "Fees 2.4421 USDT\n"
        "BTCUSDT: 2 trades, bought 0.02, sold 0.02")
    quiet = Window(SLOT - DAY_NS, SLOT)
    assert report_text(summarize(quiet)) == ("📊 Daily report · 24 h to Wed 10 Dec 21:00 UTC\n"
                                             "No equity recorded yet (has the broker run?)\n"
                                             "No trades in these 24 h")


# -- from a real database, read-only --------------------------------------------------------

def make_db(path) -> str:
    db = init_db(str(path))
    w = facts()
    for i, f in enumerate(w.fills):
        FillRow.create(fill_id=f"F{i}", order_id=f.order_id, client_order_id=f"c{f.order_id}", symbol=f.symbol,
                       side=f.side, price=f.price, qty=f.qty, fee=f.fee, fee_asset=f.fee_asset, liquidity="TAKER",
                       exch_ts=f.ts // 1_000_000, ts=f.ts)
    FillRow.create(fill_id="OLD", order_id="O0", client_order_id="c0", symbol="BTCUSDT", side="BUY",
                   price=D("60000"), qty=D("1"), fee=D("60"), fee_asset="USDT", liquidity="TAKER", exch_ts=0,
                   ts=SLOT - DAY_NS - NS)  # the day before: not in this report
    EquitySnapshot.create(ts=SLOT - 2 * DAY_NS, equity=D("9000"), cash=D("9000"))
    EquitySnapshot.create(ts=SLOT - DAY_NS - 60 * NS, equity=D("10000"), cash=D("10000"))
    for t, e in w.equity:
        EquitySnapshot.create(ts=t, equity=e, cash=e)
    # a busier curve for the chart: a snapshot every 10 minutes
    for k in range(1, 140):
        t = SLOT - DAY_NS + k * 600 * NS
        EquitySnapshot.create(ts=t, equity=D(10000) + D(k % 37) - D(k // 9), cash=D(10000))
    db.close()
    database.initialize(None)
    return str(path)


def test_build_report_reads_the_day_and_draws_the_chart(tmp_path):
    path = make_db(tmp_path / "qf.db")
    before = os.stat(path).st_mtime_ns
    out = build_report(path, SLOT, "USDT")
    assert out.kind == "report"
    assert out.text.startswith("📊 Daily report · 24 h to Wed 10 Dec 21:00 UTC\nNet P&L +12.34 USDT")
    assert "Trades 2 · fills 3 · volume 2,442.10 USDT" in out.text and "60,000" not in out.text
    assert out.photo[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(out.photo) < 400_000
    assert os.stat(path).st_mtime_ns == before  # read-only: nothing written
    os.makedirs("build/notifier", exist_ok=True)  # for a person to look at
    with open("build/notifier/report-chart.png", "wb") as fh:
        fh.write(out.photo)


def test_no_database_yet_is_said_in_the_report_and_nothing_is_created(tmp_path):
    missing = tmp_path / "nope" / "qf.db"
    out = build_report(str(missing), SLOT)
    assert "Not available: no database at" in out.text and out.photo is None
    assert not missing.parent.exists()
    empty = tmp_path / "empty.db"
    shutil.copy(make_db(tmp_path / "x.db"), empty)
    empty.write_bytes(b"")  # a file without the broker's tables
    assert "Not available: the database cannot be read" in build_report(str(empty), SLOT).text


def test_a_window_with_one_point_has_no_chart():
    w = Window(SLOT - DAY_NS, SLOT, equity=[(SLOT - NS, D("10000"))])
    assert report.equity_png(w, summarize(w)) is None
