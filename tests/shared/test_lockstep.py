"""shared/lockstep.py: when the conductor may call the system quiet, and the reporter's promises."""
from __future__ import annotations

import msgpack
import pytest
import zmq

from shared.lockstep import STEPPED, Conductor, LockstepClock, LockstepError, Reporter, unmet, wants_step

PUBLISHED = {"books": 3, "trades": 2, "clocks": 1}


def quiet_reports() -> dict:
    return {"strategy": {"md": 4, "orders_sent": 2, "answers_in": 1},
            "risk": {"md": 6, "orders_in": 2, "answers_out": 1, "broker_out": 1, "broker_in": 1, "events_in": 2},
            "broker": {"md": 6, "requests_in": 1, "replies_out": 1, "events_out": 2, "next_due": -1}}


def test_quiet_needs_every_channel_balanced_and_every_service_up_to_the_market_data():
    assert unmet(quiet_reports(), PUBLISHED) == []
    assert unmet({k: v for k, v in quiet_reports().items() if k != "risk"}, PUBLISHED) == ["no report from risk"]
    for service, counter, want in (("strategy", "md", "strategy md: 3 of 4"),
                                   ("broker", "md", "broker md: 5 of 6"),
                                   ("risk", "md", "risk md: 5 of 6"),  # trades too: their ts moves its clock
                                   ("risk", "orders_in", "orders strategy→risk: 1 of 2"),
                                   ("strategy", "answers_in", "answers risk→strategy: 0 of 1"),
                                   ("broker", "requests_in", "requests risk→broker: 0 of 1"),
                                   ("risk", "broker_in", "replies broker→risk: 0 of 1"),
                                   ("risk", "events_in", "events broker→risk: 1 of 2")):
        reports = quiet_reports()
        reports[service][counter] -= 1
        assert unmet(reports, PUBLISHED) == [want], (service, counter)
    # an order the broker holds for its latency is not in flight: quiet, with its due
    held = quiet_reports()
    held["risk"]["broker_out"] = held["broker"]["requests_in"] = 2
    assert unmet(held, PUBLISHED) == []


def stepped_reports() -> dict:
    """Quiet reports with a stepped (OFI) strategy: it reads trades too, sends cancels, hears the
    broker's events and risk's states, and has read every step."""
    reports = quiet_reports()
    reports["strategy"].update(md=6, stepped=True, cancels_sent=1, cancel_answers_in=1, events_in=2, states_in=1,
                               steps=3, held=0, next_tick=10)
    reports["risk"].update(cancels_in=1, cancel_answers_out=1, states_out=1)
    return reports


def test_a_stepped_strategy_adds_its_channels_to_quiet():
    published = {**PUBLISHED, "steps": 3}
    assert unmet(stepped_reports(), published) == []
    for service, counter, want in (("strategy", "md", "strategy md: 5 of 6"),  # books, trades and ticks
                                   ("risk", "cancels_in", "cancels strategy→risk: 0 of 1"),
                                   ("strategy", "cancel_answers_in", "cancel answers risk→strategy: 0 of 1"),
                                   ("strategy", "events_in", "events broker→strategy: 1 of 2"),
                                   ("strategy", "states_in", "states risk→strategy: 0 of 1"),
                                   ("strategy", "steps", "steps conductor→strategy: 2 of 3")):
        reports = stepped_reports()
        reports[service][counter] -= 1
        assert unmet(reports, published) == [want], (service, counter)
    # what it holds is not in flight: quiet, and the conductor steps it (`wants_step`)
    held = stepped_reports()
    held["strategy"]["held"] = 2
    assert unmet(held, published) == [] and wants_step(held["strategy"], 5, record=False)
    # an unstepped strategy's report is as before: its md counts no trades, no step is asked for
    assert unmet(quiet_reports(), {**PUBLISHED, "steps": 3}) == []


def test_a_stepped_strategy_is_stepped_while_it_holds_work_or_its_timer_is_due_after_a_record():
    rep = {"stepped": True, "held": 0, "next_tick": 100}
    assert not wants_step(rep, 99, record=True) and wants_step(rep, 100, record=True)
    assert not wants_step(rep, 100, record=False)  # the timer runs after records only, as the backtest's
    assert wants_step({**rep, "held": 1}, 0, record=False)
    assert not wants_step({"held": 1, "next_tick": 0}, 5, record=True)  # the imbalance strategy: never
    assert not wants_step(None, 5, record=True)


def test_a_stepped_reporter_says_so_and_the_conductor_checks_its_counters(tmp_path):
    endpoint = f"ipc://{tmp_path}/st.sock"
    conductor = Conductor(endpoint)
    reporter = Reporter(endpoint, "strategy", stepped=True)
    try:
        assert set(STEPPED) <= set(reporter.counters)
        reporter.counters["held"] = 3
        reporter.on_clock(0)
        for _ in range(100):  # bounded: the PUSH connects within milliseconds
            reporter.report()
            if conductor._read(50) and "strategy" in conductor.reports:
                break
        rep = conductor.reports["strategy"]
        assert rep["stepped"] is True and rep["held"] == 3 and rep["hello"] is True
        with pytest.raises(ValueError, match="only the strategy"):
            Reporter(endpoint, "risk", stepped=True)
    finally:
        reporter.close()
        conductor.close()
    push_bad = Conductor(f"ipc://{tmp_path}/bad2.sock")
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{tmp_path}/bad2.sock")
    try:  # a stepped report without its counters is not readable
        sock.send(msgpack.packb({"service": "strategy", "md": 0, "orders_sent": 0, "answers_in": 0,
                                 "stepped": True}))
        with pytest.raises(LockstepError, match="unreadable"):
            push_bad.wait_quiet(lambda: False, timeout_s=5)
    finally:
        sock.close(0)
        push_bad.close()


def test_the_clock_only_moves_forward():
    clock = LockstepClock()
    clock.observe(5)
    clock.observe(3)
    assert clock() == clock.now == 5


def test_a_report_is_sent_when_something_changed_and_the_conductor_returns_the_due(tmp_path):
    endpoint = f"ipc://{tmp_path}/ls.sock"
    conductor = Conductor(endpoint)
    reporters = {s: Reporter(endpoint, s) for s in ("strategy", "risk", "broker")}
    try:
        for r in reporters.values():
            r.on_clock(0)
            r.report()
        conductor.handshake(lambda: None, lambda: False, timeout_s=5)
        conductor.published.update(books=1)
        for name in ("strategy", "risk", "broker"):
            reporters[name].bump("md")
        reporters["broker"].counters["next_due"] = 42
        for r in reporters.values():
            r.report()
        assert conductor.wait_quiet(lambda: False, timeout_s=5) == 42
        with pytest.raises(LockstepError, match="broker md: 1 of 2"):
            conductor.published["books"] += 1
            reporters["strategy"].bump("md")
            reporters["risk"].bump("md")
            for r in reporters.values():
                r.report()
            conductor.wait_quiet(lambda: False, timeout_s=0.3)
    finally:
        conductor.close()
        for r in reporters.values():
            r.close()


def test_an_unreadable_report_stops_the_conductor(tmp_path):
    endpoint = f"ipc://{tmp_path}/bad.sock"
    conductor = Conductor(endpoint)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    try:
        push.send(msgpack.packb({"service": "broker", "md": "lots"}))
        with pytest.raises(LockstepError, match="unreadable"):
            conductor.wait_quiet(lambda: False, timeout_s=5)
    finally:
        push.close(0)
        conductor.close()


def test_a_report_that_could_not_go_out_goes_out_at_the_next_turn(tmp_path):
    """No conductor yet (nothing to PUSH to): report() neither raises nor counts the state as told."""
    endpoint = f"ipc://{tmp_path}/late.sock"
    reporter = Reporter(endpoint, "strategy")
    conductor = None
    try:
        reporter.on_clock(0)
        reporter.report()  # zmq.Again inside: not told
        conductor = Conductor(endpoint)
        for _ in range(100):  # bounded: the reconnect takes a few ms
            reporter.report()
            if conductor._read(50) and "strategy" in conductor.reports:
                break
        assert conductor.reports["strategy"]["hello"] is True
    finally:
        reporter.close()
        if conductor is not None:
            conductor.close()
