"""Alerter: once per condition, reminders while it lasts, one `resolved`, never raising."""
from shared import messages
from shared.alerts import ALERTS, Alerter


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, s: float) -> None:
        self.ns += int(s * 1e9)


def test_a_condition_alerts_once_then_reminds_then_resolves():
    sent, clock = [], Clock()
    a = Alerter("broker", lambda topic, msg: sent.append((topic, msg)), repeat_s=60, clock=clock)
    before = ALERTS.labels("broker", "STORE_UNAVAILABLE")._value.get()
    assert a.raise_("STORE_UNAVAILABLE", "disk full") is True
    for _ in range(99):
        assert a.raise_("STORE_UNAVAILABLE", "disk full") is False
    clock.advance(61)
    assert a.raise_("STORE_UNAVAILABLE", "disk full") is True
    assert ALERTS.labels("broker", "STORE_UNAVAILABLE")._value.get() - before == 101
    assert a.resolve("STORE_UNAVAILABLE", "space is back") is True
    assert a.resolve("STORE_UNAVAILABLE", "space is back") is False
    assert [(t, m.severity, m.count) for t, m in sent] == [
        ("alert.broker", "error", 1), ("alert.broker", "error", 100), ("alert.broker", "resolved", 0)]
    assert "after 61.0s" in sent[-1][1].text
    for _, msg in sent:  # what goes on the bus decodes as an event
        assert messages.decode(messages.encode(msg, seq=1)) == msg


def test_a_failing_bus_never_turns_an_alert_into_an_exception():
    def broken(topic, msg):
        raise OSError("bus gone")
    a = Alerter("risk", broken)
    assert a.raise_("BROKER_ERROR", "x") is True
    assert a.is_active("BROKER_ERROR")
