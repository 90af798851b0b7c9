"""`qf up`'s status line names risk's Shabbat pause from risk's heartbeat: its end while paused, its
start while flattening or when it comes within a day, in the pauses' local time; nothing without one."""
from __future__ import annotations

import zoneinfo
from datetime import datetime

import pytest

from services.supervisor import StatusMonitor
from shared import config as qfconfig
from shared.shabbat import calendar_from, phase_at
from tests.conftest import tcp_env

IST = zoneinfo.ZoneInfo("Asia/Jerusalem")
SHABBAT = {"start": "2026-12-11T15:55:00+02:00", "end": "2026-12-12T17:16:00+02:00", "kind": "shabbat",
           "name": "Shabbat"}  # Jerusalem (`qf calendar --from 2026-12-07 --to 2026-12-20`)
BASE = "services 5/5 up | feed no heartbeat yet | book 0.0/s | orders 3 | fills 2 | equity 10,000.00 | "


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=IST).timestamp()) * 10**9


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def monitor(tmp_path):
    """A monitor of the default place (Jerusalem) whose heartbeats the test writes itself."""
    m = StatusMonitor(qfconfig.load(tcp_env(tmp_path)), clock=Clock(ns("2026-12-10T12:00")))
    m.stats["broker"] = {"orders": 3, "fills": 2}
    yield m
    m.close()


def line(m: StatusMonitor, state: str, phase: str | None, at: str, pause: dict = SHABBAT) -> str:
    m.stats["risk"] = {"state": state, "equity": "10000"}
    if phase is not None:
        m.stats["risk"]["pause"] = {**pause, "phase": phase}
    m.clock.now = ns(at)
    return m.line(5, 5)


def test_paused_the_line_gives_the_end_in_local_time(monitor):
    assert line(monitor, "PAUSED_SHABBAT", "paused", "2026-12-12T12:00") == (
        BASE + "risk PAUSED_SHABBAT until Sat 17:16 IST (Shabbat)")


def test_flattening_the_line_gives_the_start(monitor):
    assert line(monitor, "REDUCING", "flatten", "2026-12-11T15:45") == (
        BASE + "risk REDUCING: Shabbat at Fri 15:55 IST, flattening")


def test_a_pause_within_a_day_is_announced_and_a_later_one_is_not(monitor):
    assert line(monitor, "ACTIVE", "", "2026-12-10T16:00") == BASE + "risk ACTIVE | next pause Fri 15:55 IST"
    assert line(monitor, "ACTIVE", "", "2026-12-10T15:54") == BASE + "risk ACTIVE"  # 24 h 1 min ahead


def test_without_a_pause_the_line_is_as_before(monitor):
    assert line(monitor, "HALTED", None, "2026-12-12T12:00") == BASE + "risk HALTED"
    monitor.stats["risk"] = {"state": "ACTIVE", "equity": "10000", "pause": None}
    assert monitor.line(5, 5) == BASE + "risk ACTIVE"


def test_a_halt_during_a_pause_is_not_shown_as_ending_with_it(monitor):
    assert line(monitor, "HALTED", "paused", "2026-12-12T12:00") == BASE + "risk HALTED; Shabbat until Sat 17:16 IST"
    assert line(monitor, "HALTED", "flatten", "2026-12-11T15:45") == BASE + "risk HALTED; Shabbat at Fri 15:55 IST"


def test_a_pause_it_cannot_read_is_left_out(monitor):
    for bad in ({"start": "Friday", "end": SHABBAT["end"]}, {"start": 5, "end": 6}, {"start": "2026-12-11T15:55"},
                {"end": SHABBAT["end"]}):
        assert line(monitor, "ACTIVE", "", "2026-12-11T12:00", pause=bad) == BASE + "risk ACTIVE"


def test_a_pause_of_another_zone_keeps_its_own_offset(monitor):
    ny = {"start": "2026-12-11T16:10:00-05:00", "end": "2026-12-12T17:15:00-05:00", "kind": "shabbat",
          "name": "Shabbat"}
    assert line(monitor, "PAUSED_SHABBAT", "paused", "2026-12-12T12:00", pause=ny) == (
        BASE + "risk PAUSED_SHABBAT until Sat 17:15 UTC-05:00 (Shabbat)")


def test_the_line_for_what_risk_computes_from_the_calendar(tmp_path):
    """Risk's heartbeat carries Pause.to_json() plus the phase; the line reads that shape (New York)."""
    cfg = qfconfig.load(tcp_env(tmp_path, QF_SHABBAT_LOCATION="new york"))
    cal, now = calendar_from(cfg.shabbat), ns("2026-12-12T05:00")  # Fri 22:00 EST
    phase, pause, _ = phase_at(cal, now, cfg.shabbat.flatten_min * 60 * 10**9)
    m = StatusMonitor(cfg, clock=Clock(now))
    try:
        m.stats["risk"] = {"state": "PAUSED_SHABBAT", "pause": {**pause.to_json(), "phase": phase}}
        assert m.line(5, 5).endswith("| risk PAUSED_SHABBAT until Sat 17:15 EST (Shabbat)")
    finally:
        m.close()
