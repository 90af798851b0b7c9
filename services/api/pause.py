"""The Shabbat and Yom Tov pause as the API shows it: from the calendar and a clock, as risk decides it.

The API does not ask risk: it computes the phase from the same QF_SHABBAT_* settings and
shared/shabbat.py `phase_at` that risk enforces, so `/api/v1/status` and `/metrics` answer
while risk is down. The calendar memoises (a bisection per call after the first of a period),
so every request and scrape asks it afresh."""
from __future__ import annotations

import threading
import time
from datetime import timedelta, timezone
from typing import Callable

from prometheus_client.core import GaugeMetricFamily

from shared.config import ShabbatConfig
from shared.shabbat import FLATTEN, PAUSED, Pause, calendar_from, phase_at

NS_PER_S = 1_000_000_000
MINUTE_NS = 60 * NS_PER_S

Clock = Callable[[], int]  # ns since the epoch (time.time_ns)


class PauseView:
    """The pause at an instant, for one set of QF_SHABBAT_* settings (`cfg.pause` false: none)."""

    def __init__(self, cfg: ShabbatConfig) -> None:
        self.calendar = calendar_from(cfg) if cfg.pause else None
        self.flatten_ns = cfg.flatten_min * MINUTE_NS
        self._lock = threading.Lock()  # the calendar's memo is not safe to extend from two threads at once

    def phase(self, now_ns: int) -> tuple[str, Pause | None, Pause | None]:
        """(phase, current, next) at `now_ns`: phase "", "flatten" or "paused"; the pause in force
        (phase "paused") or None; the next pause to start after `now_ns` or None (none kept)."""
        if self.calendar is None:
            return "", None, None
        with self._lock:
            phase, pause, _ = phase_at(self.calendar, now_ns, self.flatten_ns)
            if phase == PAUSED:
                return phase, pause, self.calendar.next_after(now_ns)
        return phase, None, pause

    def status(self, now_ns: int) -> dict:
        """`/api/v1/status`'s "pause": {"enabled", "phase", "current", "next" (`Pause.to_json()` or
        None), "flatten_from" (when the flatten window before "next" opens: ISO-8601, local time
        with its offset, or None)}."""
        phase, current, nxt = self.phase(now_ns)
        flatten_from = None
        if nxt is not None:  # through UTC: an aware datetime's own arithmetic is wall-clock time
            opens = nxt.start.astimezone(timezone.utc) - timedelta(microseconds=self.flatten_ns // 1000)
            flatten_from = opens.astimezone(nxt.start.tzinfo).isoformat()
        return {"enabled": self.calendar is not None, "phase": phase,
                "current": None if current is None else current.to_json(),
                "next": None if nxt is None else nxt.to_json(), "flatten_from": flatten_from}


class PauseCollector:
    """Prometheus gauges of the pause at `clock()` per scrape: `qf_trading_paused{reason="shabbat"}`,
    `qf_shabbat_flattening`, and the current or next pause's start and end (UNIX seconds; absent
    when no pause is kept)."""

    def __init__(self, view: PauseView, clock: Clock = time.time_ns) -> None:
        self.view, self.clock = view, clock

    def collect(self):
        phase, current, nxt = self.view.phase(self.clock())
        paused = GaugeMetricFamily("qf_trading_paused", "1 while trading is paused, by reason (the Shabbat "
                                   "and Yom Tov calendar, QF_SHABBAT_*).", labels=["reason"])
        paused.add_metric(["shabbat"], 1 if phase == PAUSED else 0)
        yield paused
        yield GaugeMetricFamily("qf_shabbat_flattening", "1 in the flatten window before a Shabbat or Yom Tov "
                                "pause (QF_SHABBAT_FLATTEN_MIN).", value=1 if phase == FLATTEN else 0)
        pause = current or nxt
        if pause is not None:
            yield GaugeMetricFamily("qf_shabbat_next_start_timestamp_seconds", "Start (candle-lighting) of "
                                    "the current or next pause, UNIX seconds.", value=pause.start_ns / NS_PER_S)
            yield GaugeMetricFamily("qf_shabbat_next_end_timestamp_seconds", "End (nightfall) of the current "
                                    "or next pause, UNIX seconds.", value=pause.end_ns / NS_PER_S)
