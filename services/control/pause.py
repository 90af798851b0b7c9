"""The Shabbat and Yom Tov pause at an instant, from the calendar and a clock, as risk decides it.

The control layer does not ask risk for it: it computes the phase from the same QF_SHABBAT_*
settings and shared/shabbat.py `phase_at` that risk enforces, so the status answers while risk
is down. The calendar memoises (a bisection per call after the first of a period)."""
from __future__ import annotations

import threading
from datetime import timedelta, timezone

from shared.config import ShabbatConfig
from shared.shabbat import PAUSED, Pause, calendar_from, phase_at

MINUTE_NS = 60 * 1_000_000_000


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
