"""StoreHealth: one outage at a time, new orders refused while nothing can be made durable, probes backed off."""
from __future__ import annotations

from services.broker.outage import StoreHealth


def test_an_outage_starts_once_backs_off_and_ends():
    h = StoreHealth(first_s=0.05, max_s=1.0, pending_max=3)
    assert h.refusal(0) is None and not h.probe_due(0.0)
    assert h.fail("cannot store the journal: database or disk is full", 10.0) is True
    assert h.fail("again", 10.01) is False and h.outages == 1
    assert h.refusal(2) is None  # the journal still takes records: orders are durable
    assert "3 journal records" in h.refusal(3)  # but not without bound
    assert not h.probe_due(10.04) and h.probe_due(10.05)
    waits = []
    now = 10.05
    for _ in range(7):
        h.probe_failed("no room", now)
        waits.append(round(h.next_probe - now, 3))
        now = h.next_probe
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0] and h.why == "no room"
    assert h.fail("cannot write the journal: no space left on device", now, frozen=True) is False
    assert h.frozen and "cannot make orders durable" in h.refusal(0)
    assert h.recover(now + 0.5) == now + 0.5 - 10.0
    assert not h.down and not h.frozen and h.refusal(10) is None and h.down_s(now + 1) == 0.0
    assert h.fail("full again", 100.0) is True and h.next_probe == 100.05 and h.outages == 2  # backoff starts over
