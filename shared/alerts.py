"""Operator alerts: one `alert.{service}` event per condition while it lasts, a counter, a log line.

A failing disk or a lying peer repeats itself thousands of times a second; a person
wants to hear of it once, be reminded while it lasts, and hear when it ends. So an
alert goes out when its code is first raised, again at most every `repeat_s` while it
is still being raised (with the count of what was held back), and once as `resolved`.
The notifier (Telegram) and Prometheus (`qf_alerts_total`) read the same events.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import Counter

from shared.messages import Alert

log = logging.getLogger("qf.alert")

ALERTS = Counter("qf_alerts_total", "Alert conditions raised (every occurrence, sent or held back)",
                 ["service", "code"])
REPEAT_S = 300.0  # while a condition lasts, a reminder at most this often
Publish = Callable[[str, Alert], None]  # (topic, message): a Publisher's publish


@dataclass(slots=True)
class _Active:
    since_ns: int
    sent_ns: int
    held: int  # occurrences since the last alert went out
    text: str


class Alerter:
    """Raises and resolves one service's alerts. `publish` may be None (no bus: log and count
    only); a failing publish is logged, never raised, so an alert cannot take a service down."""

    def __init__(self, service: str, publish: Publish | None = None, repeat_s: float = REPEAT_S,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.service, self.publish, self.clock = service, publish, clock
        self.repeat_ns = int(repeat_s * 1e9)
        self.active: dict[str, _Active] = {}
        self.sent = 0  # alerts published (reminders and resolutions included)

    def raise_(self, code: str, text: str, severity: str = "error") -> bool:
        """Note one occurrence of `code`; returns True when an alert went out for it (the first
        occurrence, or a reminder `repeat_s` after the last one)."""
        now = self.clock()
        ALERTS.labels(self.service, code).inc()
        a = self.active.get(code)
        if a is None:
            self.active[code] = _Active(now, now, 0, text)
            self._send(code, severity, text, 1)
            return True
        a.held += 1
        a.text = text
        if now - a.sent_ns < self.repeat_ns:
            return False
        count, a.held, a.sent_ns = a.held, 0, now
        self._send(code, severity, f"{text} (still; {count} times since the last alert)", count)
        return True

    def resolve(self, code: str, text: str) -> bool:
        """The condition `code` ended; returns True when it had been raised (one `resolved` alert)."""
        a = self.active.pop(code, None)
        if a is None:
            return False
        lasted = (self.clock() - a.since_ns) / 1e9
        self._send(code, "resolved", f"{text} (after {lasted:.1f}s)", a.held)
        return True

    def is_active(self, code: str) -> bool:
        return code in self.active

    def _send(self, code: str, severity: str, text: str, count: int) -> None:
        self.sent += 1
        level = logging.INFO if severity == "resolved" else logging.ERROR if severity == "error" else logging.WARNING
        log.log(level, "alert", extra={"service": self.service, "code": code, "severity": severity,
                                       "text": text[:300], "count": count})
        if self.publish is None:
            return
        try:
            self.publish(f"alert.{self.service}", Alert(ts=self.clock(), service=self.service, code=code,
                                                        severity=severity, text=text[:1000], count=count))
        except Exception:  # a bus that fails must not turn an alert into an outage
            log.exception("alert_publish_failed", extra={"code": code})
