"""The pause's Prometheus gauges (the pause itself: services/control/pause.py `PauseView`)."""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client.core import GaugeMetricFamily

from services.control.pause import PauseView
from shared.shabbat import FLATTEN, PAUSED

NS_PER_S = 1_000_000_000

Clock = Callable[[], int]  # ns since the epoch (time.time_ns)


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
