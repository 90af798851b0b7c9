"""Issue #12, marketdata's side of the lock-step replay (services/marketdata/conductor.py): the
conductor loop of a real MarketDataService over real sockets, with the test playing strategy, risk
and the broker (real SUBs on QF_MD_PUB, real `Reporter` PUSH sockets to QF_LOCKSTEP, honest
counts). No other service runs."""
from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from services.marketdata.capture import iter_capture
from services.marketdata.conductor import CountingPublisher, LockstepReplay
from services.marketdata.service import MarketDataService
from shared import config as qfconfig
from shared import lockstep, messages
from shared.errors import ConfigError
from shared.lockstep import SERVICES, LockstepError, Reporter
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, free_port, tcp_env, wait_for
from tests.fakes.harness import ServiceThread
from tests.services.marketdata.test_service import replay_through_router

TOPICS = {"strategy": ("book.", "clock"), "risk": ("book.", "trade.", "clock"), "broker": ("book.", "trade.", "clock")}
STEPPED_TOPICS = ("book.", "trade.", "clock", "step")  # a stepped (OFI) strategy's
TICK_NS = 50_000_000  # a stepped strategy's timer (the OFI strategy's TICK_NS)
RECORDS = 400  # of the spot capture: its snapshot, 18 depth events (16 books), 69 trades, 1.7 s of its time


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    """The spot capture's first RECORDS records."""
    import orjson
    path = tmp_path_factory.mktemp("conductor") / "short.jsonl"
    recs = list(itertools.islice(iter_capture(SPOT_CAPTURE), RECORDS))
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def lockstep_config(tmp_path, capture: Path, **extra: str) -> qfconfig.Config:
    return qfconfig.load(tcp_env(tmp_path, QF_FEED=f"replay:{capture}",
                                 QF_LOCKSTEP=f"tcp://127.0.0.1:{free_port()}", **extra))


class Player:
    """Strategy, risk and the broker as the conductor sees them, on one thread: each has a SUB
    on the topics its service reads and its own Reporter, and counts and reports honestly.

    - `orders`: {n: latency_ns}: when the broker reads the n-th book (from 1), an order goes
      strategy → risk → broker, due at that book's ts + latency; at a clock tick reaching it the
      broker answers and fills it, and risk answers the strategy.
    - `hello_after`: {service: n}: that service says hello only at the n-th hello tick.
    - `mute`: services that never report; `silent_after_hello`: ones that only say hello.
    - `stuck`: the broker never acts on a tick (its next_due stays).
    - `stepped`: the strategy is a stepped one (shared/lockstep.py): it reads trades too, holds
      the market data until a step, and its timer wants a record's step every TICK_NS.

    `log[service]` is what each read, in order: (topic, msg, payload bytes); `reported[service]`
    is the state it last pushed (set before the push, so the conductor can never have read a
    report this does not show)."""

    def __init__(self, cfg: qfconfig.Config, orders: dict[int, int] | None = None,
                 hello_after: dict[str, int] | None = None, mute: tuple = (), silent_after_hello: tuple = (),
                 stuck: bool = False, stepped: bool = False) -> None:
        self.orders, self.hello_after = orders or {}, hello_after or {}
        self.mute, self.silent, self.stuck, self.stepped = mute, silent_after_hello, stuck, stepped
        ctx = zmq.Context.instance()
        self.subs, self.reps = {}, {}
        for s in SERVICES:
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            for t in (STEPPED_TOPICS if stepped and s == "strategy" else TOPICS[s]):
                sock.setsockopt(zmq.SUBSCRIBE, t.encode())
            sock.connect(cfg.bus.md_pub)
            self.subs[s] = sock
            self.reps[s] = Reporter(cfg.bus.lockstep, s, stepped=stepped and s == "strategy")
        self.log: dict[str, list] = {s: [] for s in SERVICES}
        self.reported: dict[str, dict] = {}
        self.hellos = dict.fromkeys(SERVICES, 0)
        self.books = 0
        self.dues: list[int] = []
        self.due_at: list[int] = []  # each new next_due the broker reported, in order
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="player")

    def __enter__(self) -> Player:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the player did not stop"
        for s in SERVICES:
            self.subs[s].close(0)
            self.reps[s].close()

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self.subs.values():
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                service = next(s for s, x in self.subs.items() if x is sock)
                topic, payload = sock.recv_multipart()
                self._on(service, topic.decode(), payload)

    def _report(self, *services: str) -> None:
        for s in services:
            if s in self.mute or (s in self.silent and self.reps[s].hello and self.reported.get(s, {}).get("hello")):
                continue
            rep = self.reps[s]
            with self.lock:
                self.reported[s] = {**rep.counters, "hello": rep.hello, **({"stepped": True} if rep.stepped else {})}
            rep.report()

    def _on(self, service: str, topic: str, payload: bytes) -> None:
        msg = messages.decode(payload)
        rep = self.reps[service]
        if topic == "clock" and msg.ts == 0:
            self.hellos[service] += 1
            if self.hellos[service] >= self.hello_after.get(service, 1):
                rep.on_clock(0)
            return self._report(service)
        with self.lock:
            self.log[service].append((topic, msg, payload))
        if topic.startswith("step"):  # a stepped strategy works on what it holds, then its timer
            rep.bump("steps")
            rep.counters["held"] = 0
            if topic == "step.record" and msg.ts >= rep.counters["next_tick"]:
                rep.counters["next_tick"] = msg.ts + TICK_NS
            return self._report(service)
        if topic == "clock":
            rep.on_clock(msg.ts)
        else:
            rep.bump("md")
            if rep.stepped:
                rep.bump("held")
        touched = [service]
        if service == "broker":
            if topic.startswith("book."):
                self.books += 1
                latency = self.orders.get(self.books)
                if latency is not None:  # the strategy's order, through risk, reaches the broker
                    self.reps["strategy"].bump("orders_sent")
                    self.reps["risk"].bump("orders_in")
                    self.reps["risk"].bump("broker_out")
                    rep.bump("requests_in")
                    self.dues.append(msg.ts + latency)
                    touched = list(SERVICES)
            elif topic == "clock" and not self.stuck:
                done = [d for d in self.dues if d <= msg.ts]
                self.dues = [d for d in self.dues if d > msg.ts]
                for _ in done:  # the order reaches the book: acked and filled
                    rep.bump("replies_out")
                    rep.bump("events_out")
                    self.reps["risk"].bump("broker_in")
                    self.reps["risk"].bump("events_in")
                    self.reps["risk"].bump("answers_out")
                    self.reps["strategy"].bump("answers_in")
                    if self.stepped:  # it hears the broker's event too, and holds both until a step
                        self.reps["strategy"].bump("events_in")
                        self.reps["strategy"].bump("held", 2)
                if done:
                    touched = list(SERVICES)
            due = min(self.dues) if self.dues else -1
            if due != rep.counters["next_due"] and due >= 0:
                self.due_at.append(due)
            rep.counters["next_due"] = due
        self._report(*touched)

    def accounted(self, published: dict[str, int]) -> list[str]:
        """What the reports sent so far leave unaccounted of `published` (shared.lockstep.unmet)."""
        with self.lock:
            reported = {s: dict(r) for s, r in self.reported.items()}
        missing_hello = [s for s in SERVICES if not reported.get(s, {}).get("hello")]
        return [f"no hello from {s}" for s in missing_hello] + lockstep.unmet(reported, published)


def checked(svc: MarketDataService, player: Player, monkeypatch) -> list[str]:
    """Make every release of the conductor (a record into the router, a clock tick) note what the
    player's reports did not yet account for: nothing, if it waits as it should."""
    problems: list[str] = []
    dispatch = svc.router.dispatch

    def release(rec, now_ns, now=None):
        problems.extend(f"record at {now_ns}: {p}" for p in player.accounted(svc.conductor.published))
        dispatch(rec, now_ns, now)
    svc.router.dispatch = release
    tick = LockstepReplay._tick

    def checked_tick(self, due):
        problems.extend(f"tick at {due}: {p}" for p in player.accounted(self.conductor.published))
        tick(self, due)
    monkeypatch.setattr(LockstepReplay, "_tick", checked_tick)
    return problems


def run_to_end(cfg, player: Player, monkeypatch) -> tuple[MarketDataService, list[str]]:
    """Play the capture under the conductor to REPLAY_DONE (a conductor's error is raised)."""
    runner = ServiceThread(cfg)
    with player, runner as svc:
        problems = checked(svc, player, monkeypatch)
        wait_for(lambda: svc.router.state["BTCUSDT"] == "REPLAY_DONE" or not runner.thread.is_alive(), 30,
                 "the lock-step replay to finish")
    return svc, problems


def md_log(player: Player, service: str = "broker") -> list[tuple[str, int]]:
    return [(topic, msg.ts) for topic, msg, _ in player.log[service]]


# -- releases ------------------------------------------------------------------------------------

def test_each_record_is_released_only_once_the_reports_account_for_the_last(tmp_path, capture, monkeypatch,
                                                                            caplog):
    cfg = lockstep_config(tmp_path, capture)
    player = Player(cfg, orders={3: 150_000_000, 9: 40_000_000})
    with caplog.at_level(logging.INFO, logger="qf.marketdata"):
        svc, problems = run_to_end(cfg, player, monkeypatch)
    assert problems == []
    published = svc.conductor.published  # closed, but the counts stay
    ref_router, ref = replay_through_router(capture)
    books = [m for t, m in ref if t.startswith("book.")]
    trades = [m for t, m in ref if t.startswith("trade.")]
    assert len(books) == 16 and len(trades) == 69
    assert published == {"books": 16, "trades": 69, "clocks": 2}
    # every service read everything, one release at a time, in the capture's order
    for s in SERVICES:
        seen = [m.ts for t, m, _ in player.log[s] if t != "clock"]
        assert seen == sorted(seen)
    assert len(player.log["broker"]) == 16 + 69 + 2 and len(player.log["risk"]) == 16 + 69 + 2
    done = [r for r in caplog.records if r.getMessage() == "lockstep done"]
    counts = (done[0].records, done[0].books, done[0].trades, done[0].clocks)
    assert len(done) == 1 and counts == (RECORDS + 1, 16, 69, 2)  # + the feed's RouteOpened


def test_a_stepped_strategy_is_stepped_after_what_it_holds_and_when_its_timer_is_due(tmp_path, capture,
                                                                                     monkeypatch):
    """The OFI strategy decides on a record only after broker and risk are done with it: each book
    or trade it read is followed by a step at its time before any later record is released (the
    release checks in `checked` count the steps too); a record whose time reaches the strategy's
    timer gets a record step even if it published nothing, after a clock tick at its time (so
    what the timer sends meets risk and the broker at that time)."""
    cfg = lockstep_config(tmp_path, capture)
    player = Player(cfg, orders={3: 150_000_000}, stepped=True)
    svc, problems = run_to_end(cfg, player, monkeypatch)
    assert problems == []
    seen = [(topic, msg.ts) for topic, msg, _ in player.log["strategy"]]
    held = []
    for topic, ts in seen:
        if topic.startswith(("book.", "trade.")):
            assert not held or held[-1] == ts, f"a record at {ts} released before the step at {held[-1]}"
            held.append(ts)
        elif topic.startswith("step"):
            assert all(t == ts for t in held)
            held = []
    assert held == []
    steps = [(topic, ts) for topic, ts in seen if topic.startswith("step")]
    assert svc.conductor.published["steps"] == len(steps) == player.reps["strategy"].counters["steps"]
    record_times = {ts for topic, ts in seen if topic.startswith(("book.", "trade."))}
    timer_only = [ts for topic, ts in steps if topic == "step.record" and ts not in record_times]
    assert timer_only
    for ts in timer_only:  # a clock tick at its time came first: risk and the broker stand there
        assert ("clock", ts) in seen[:seen.index(("step.record", ts))]
        assert ("clock", ts) in [(t, m.ts) for t, m, _ in player.log["risk"]]
    gaps = sorted(ts for topic, ts in steps if topic == "step.record")
    assert all(b - a >= TICK_NS for a, b in zip(timer_only, timer_only[1:]))
    assert gaps[0] == min(record_times | set(timer_only))  # the timer is due at the first record
    # the broker's due (the 3rd book's order): its answer and event held, so a (plain) step at it
    due = player.due_at[0]
    assert [ts for topic, ts in steps if topic == "step"] == [due]
    assert seen.index(("clock", due)) < seen.index(("step", due))


def test_the_books_and_trades_are_the_backtests_byte_for_byte(tmp_path, capture, monkeypatch):
    """The conductor publishes through the router's general path (a Publisher subclass counts):
    the same bytes, stamped with the recorded times, as a router driven the backtest's way."""
    cfg = lockstep_config(tmp_path, capture)
    player = Player(cfg)
    run_to_end(cfg, player, monkeypatch)
    _, ref = replay_through_router(capture)
    seqs: dict[str, int] = {}
    want = []
    for topic, msg in ref:
        if topic.startswith(("book.", "trade.")):
            seqs[topic] = seqs.get(topic, 0) + 1
            want.append((topic, messages.encode(msg, seqs[topic])))
    got = [(t, payload) for t, _, payload in player.log["broker"] if t != "clock"]
    assert got == want


def test_a_clock_tick_comes_at_the_brokers_next_due_before_any_later_record(tmp_path, capture, monkeypatch):
    cfg = lockstep_config(tmp_path, capture)
    latency = 150_000_000  # 1.5 depth intervals: records of the capture lie between the order and its due
    player = Player(cfg, orders={3: latency})
    svc, problems = run_to_end(cfg, player, monkeypatch)
    assert problems == []
    seen = md_log(player)
    third_book = [ts for t, ts in seen if t.startswith("book.")][2]
    due = third_book + latency
    assert player.due_at[0] == due
    ticks = [i for i, (t, _) in enumerate(seen) if t == "clock"]
    assert [seen[i][1] for i in ticks] == [due]
    before, after = seen[:ticks[0]], seen[ticks[0] + 1:]
    assert all(ts < due for _, ts in before) and all(ts >= due for _, ts in after)
    assert any(ts > third_book for _, ts in before)  # the order waited out its latency: records went by
    assert after  # and the capture went on after it
    assert svc.conductor.published["clocks"] == 1


def test_dues_left_at_the_end_are_ticked_after_the_last_record(tmp_path, capture, monkeypatch):
    cfg = lockstep_config(tmp_path, capture)
    player = Player(cfg, orders={5: 60 * 10**9})  # due a minute later: past the capture's 1.7 s
    svc, problems = run_to_end(cfg, player, monkeypatch)
    assert problems == []
    seen = md_log(player)
    assert seen[-1][0] == "clock" and seen[-1][1] == player.due_at[0]
    assert [t for t, _ in seen].count("clock") == 1
    assert player.reps["strategy"].counters["answers_in"] == 1  # answered before REPLAY_DONE
    assert svc.router.state["BTCUSDT"] == "REPLAY_DONE"


# -- the handshake -----------------------------------------------------------------------------

def test_the_handshake_waits_for_all_three_hellos(tmp_path, capture, monkeypatch):
    cfg = lockstep_config(tmp_path, capture)
    player = Player(cfg, hello_after={"broker": 4, "risk": 2})
    svc, problems = run_to_end(cfg, player, monkeypatch)
    assert problems == []  # the first record was released after every hello, and each after the last
    assert player.hellos["broker"] >= 4 and player.hellos["risk"] >= 2
    assert svc.router.state["BTCUSDT"] == "REPLAY_DONE"


def error_of(cfg, player: Player, timeout_s: float, monkeypatch) -> BaseException:
    monkeypatch.setattr(lockstep, "QUIET_TIMEOUT_S", timeout_s)
    with player:
        runner = ServiceThread(cfg)
        runner.thread.start()
        runner.thread.join(timeout_s + 15)
        assert not runner.thread.is_alive(), "the conductor did not give up"
    assert runner.error is not None
    return runner.error


def test_a_service_that_never_says_hello_is_named(tmp_path, capture, monkeypatch):
    cfg = lockstep_config(tmp_path, capture)
    err = error_of(cfg, Player(cfg, mute=("broker",)), 0.5, monkeypatch)
    assert isinstance(err, LockstepError)
    assert "no hello from broker within" in str(err)
    assert "strategy" not in str(err) and "risk" not in str(err)


def test_a_service_that_stops_reporting_is_named_with_its_counts(tmp_path, capture, monkeypatch):
    cfg = lockstep_config(tmp_path, capture)
    err = error_of(cfg, Player(cfg, silent_after_hello=("risk",)), 1.0, monkeypatch)
    assert isinstance(err, LockstepError)
    assert "not quiet" in str(err) and "risk md: 0 of 1" in str(err)
    assert "broker md" not in str(err) and "strategy md" not in str(err)


def test_a_broker_that_keeps_a_due_request_after_its_tick_stops_the_replay(tmp_path, capture, monkeypatch):
    cfg = lockstep_config(tmp_path, capture)
    err = error_of(cfg, Player(cfg, orders={2: 1}, stuck=True), 5.0, monkeypatch)
    assert isinstance(err, LockstepError) and "still holds a request due" in str(err)


def test_a_stop_during_the_handshake_ends_the_service_cleanly(tmp_path, capture):
    cfg = lockstep_config(tmp_path, capture)
    with ServiceThread(cfg) as svc:  # no service: it waits for their hellos
        wait_for(lambda: svc.conductor is not None, 10, "the conductor to bind")
    assert svc.router.state["BTCUSDT"] == "CONNECTING"


# -- settings and exits ------------------------------------------------------------------------

def test_lockstep_needs_a_replay_feed(tmp_path):
    cfg = qfconfig.load(tcp_env(tmp_path, QF_LOCKSTEP=f"tcp://127.0.0.1:{free_port()}"))
    with pytest.raises(ConfigError, match="QF_LOCKSTEP .* needs QF_FEED=replay"):
        MarketDataService(cfg)


def test_the_counting_publisher_counts_books_and_trades_only(tmp_path):
    pub = CountingPublisher(f"tcp://127.0.0.1:{free_port()}", 1000)
    try:
        pub.publish("clock", messages.Clock(ts=5))
        pub.publish("status.BTCUSDT", messages.MdStatus(ts=5, symbol="BTCUSDT", state="SYNCED"))
        pub.send_raw(b"book.BTCUSDT", b"x")
        pub.send_raw(b"trade.BTCUSDT", b"x")
        pub.send_raw(b"trade.USDM:BTCUSDT", b"x")
    finally:
        pub.close()
    assert pub.published == {"books": 1, "trades": 2, "clocks": 0}


def test_qf_marketdata_exits_2_with_one_line_when_the_lockstep_is_stuck(tmp_path, capture):
    """A stuck lock-step is not restarted by `qf up` (exit status 2) and says what it waited for."""
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{capture}", QF_LOCKSTEP=f"tcp://127.0.0.1:{free_port()}")
    code = ("import sys, shared.lockstep as l; l.QUIET_TIMEOUT_S = 1.0; "
            "from services.cli import main; sys.exit(main(['marketdata']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean_environ(), **settings},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "qf marketdata: lock-step: no hello from strategy, risk, broker within 1 s"]
    assert not os.path.exists(os.path.join(settings["QF_RUN_DIR"], "marketdata.alive"))
