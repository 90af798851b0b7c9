"""BookGuard: per-symbol snapshot backoff and stall escalation, on a clock the test moves."""
import pytest

from services.marketdata.guard import SNAPSHOT_HEALTHY_S, Action, BookGuard


def test_snapshots_of_a_symbol_that_does_not_sync_are_spaced_out_up_to_half_the_timeout():
    g = BookGuard(["BTCUSDT", "ETHUSDT"], timeout_s=10)
    sent, now = [], 0.0
    while now < 60:
        if g.snapshot_wait("BTCUSDT", now) == 0:
            g.snapshot_sent("BTCUSDT", now)
            sent.append(now)
        now = round(now + 0.05, 2)
    gaps = [round(b - a, 2) for a, b in zip(sent, sent[1:])]
    assert gaps[:6] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0] and set(gaps[5:]) == {5.0}
    assert len(sent) == 16  # a lying stream: one snapshot per 5 s, 50 × 12 = 600 weight a minute
    assert g.snapshot_wait("ETHUSDT", now) == 0  # per symbol


def test_a_book_that_held_resets_its_backoff_and_a_short_one_does_not():
    g = BookGuard(["BTCUSDT"], timeout_s=10)
    for t in (0, 1, 2, 3):
        g.snapshot_sent("BTCUSDT", t)
    assert g.attempts("BTCUSDT") == 4
    g.synced("BTCUSDT", 4)
    g.unsynced("BTCUSDT", 4.5)  # lost after 0.5 s: the next snapshot still waits
    assert g.snapshot_wait("BTCUSDT", 4.5) == 0.5 and g.attempts("BTCUSDT") == 4
    g.synced("BTCUSDT", 10)
    g.unsynced("BTCUSDT", 10 + SNAPSHOT_HEALTHY_S)
    assert g.snapshot_wait("BTCUSDT", 10 + SNAPSHOT_HEALTHY_S) == 0 and g.attempts("BTCUSDT") == 0


def test_frames_without_a_book_escalate_resnapshot_then_reconnect_and_a_book_ends_it():
    g = BookGuard(["BTCUSDT", "ETHUSDT"], timeout_s=2)
    frames, books = 0, 0
    log = []
    t = 0.0
    while t <= 10:
        frames += 5  # frames keep arriving; ETHUSDT's books keep coming, BTCUSDT's stop at t=1
        if t < 1:
            books += 1
        acts, rec = g.check(t, {"BTCUSDT": (frames, books), "ETHUSDT": (frames, int(t * 10))})
        log += [(round(t, 1), a.kind, a.key) for a in acts] + [(round(t, 1), "recovered", k) for k in rec]
        if acts and acts[-1].kind == "reconnect":
            g.disconnected("BTCUSDT")  # the connection went; the next one starts the clock again
        t = round(t + 0.1, 1)
    # books stop after the check at 0.9; frames without one are seen from 1.0
    assert log == [(3.0, "resnapshot", "BTCUSDT"), (5.0, "reconnect", "BTCUSDT"),
                   (7.1, "resnapshot", "BTCUSDT"), (9.1, "reconnect", "BTCUSDT")]
    assert g.stalls == {"BTCUSDT": 1, "ETHUSDT": 0} and g.is_stalled("BTCUSDT")
    acts, rec = g.check(10.1, {"BTCUSDT": (frames, books + 1), "ETHUSDT": (frames, 101)})
    assert acts == [] and rec == ["BTCUSDT"] and g.recoveries["BTCUSDT"] == 1 and not g.is_stalled("BTCUSDT")


def test_no_frames_is_no_stall_and_the_waited_time_is_reported():
    g = BookGuard(["BTCUSDT"], timeout_s=1)
    assert g.check(0, {"BTCUSDT": (0, 0)}) == ([], [])
    assert g.check(100, {"BTCUSDT": (0, 0)}) == ([], [])  # a quiet symbol (or a dead link: the watchdog's)
    g.check(100.5, {"BTCUSDT": (1, 0)})
    acts, _ = g.check(101.7, {"BTCUSDT": (1, 0)})  # one frame, then nothing: no book still
    assert acts == [Action("resnapshot", "BTCUSDT", pytest.approx(1.2))]
    assert g.stalled_since("BTCUSDT") == 100.5
    with pytest.raises(ValueError):
        BookGuard(["X"], timeout_s=0)
