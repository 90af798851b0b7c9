"""Lock-step replay (`qf up --feed replay:FILE --lockstep`, QF_LOCKSTEP): the real services, over
their real sockets, in step with a capture, so that they produce what `qf backtest` of that
capture produces, fill for fill.

The conductor is marketdata. It releases one capture record at a time (or a `clock` tick: the
instant the broker's next request is due, when that is at or before the next record's time:
the broker's timer fires before a record of the same instant, as in the backtest) and waits
until the whole system is quiet before it releases the next. Every service takes its clock
from what the conductor published (a book's or trade's recorded `ts`, a `Clock` tick's `ts`):
`LockstepClock`.

Quiet is decided by counting, not by waiting: after each loop turn in which anything changed,
every service pushes its counters to the conductor (`Reporter`, a PUSH to the conductor's PULL at
QF_LOCKSTEP). Nothing is in flight between two services when what one side counted as sent the
other counted as received, channel by channel (`unmet`); an order the broker holds for its
modelled latency is not in flight (its `next_due` tells the conductor when to tick). So the
conductor never guesses how long a hop takes, and a slow machine only makes the replay slower.

Counters (all cumulative ints; `md` counts only messages with ts > 0, the handshake excluded):

    strategy: md (book.* and clock it processed), orders_sent, answers_in
    risk:     md (book.*, trade.* and clock), orders_in, answers_out (replies to orders), broker_out
              (requests sent to the broker), broker_in (its replies), events_in (fill.* and order.*),
              cancels_in, cancel_answers_out (replies to cancels), states_out (risk.state published)
    broker:   md (book.*, trade.* and clock), requests_in, replies_out, events_out (fill.* and
              order.* published), next_due (ns of its next due request, -1 for none)

Two rules keep the order of events what the backtest's loop does (broker, then risk, then the
strategy, for each record): a request whose `ts` is ahead of a service's clock waits until the
service has read the market data up to it (risk and the broker), and a strategy waiting for a
decision goes on reading books (its core ignores them while an order is in flight, as the
backtest's does).

A stepped strategy (the OFI strategy: its report says `stepped`) hears the broker's fill.* and
order.* and risk's risk.state as well as risk's answers, and decides on a record only after the
broker and risk are done with it, as the backtest's does. It holds what it reads and works only
when the conductor steps it (a `Clock` on topic STEP_TOPIC after a broker due, or
RECORD_STEP_TOPIC after a record, which also runs its timer when due), at the step's `ts`:
risk's answers first, then the broker's events, risk's states, the market data, each in the
order read, what arrived since the last step before what an earlier step left; it stops after
each request it sends (the backtest hands each request's immediate answer over before the next
thing), and reports what it still `held` and when its timer is next due (`next_tick`). After
every quiet the conductor steps it while it holds anything (or, after a record, while its timer
is due; a record that published nothing first gets a `clock` tick at its time, so that what the
timer sends meets risk and the broker at that time), each step followed by quiet. Its extra
counters: trades count in its md; cancels_sent, cancel_answers_in, events_in (the broker's
events), states_in (risk.state), steps (step ticks read), held, next_tick.

Risk reads trades (for their `ts` only: a resting order's fill is stamped with its
trade's), publishes one risk.state per state change and none on its heartbeat, and passes the
handshake tick on on its PUB, as the broker does on its own; the strategy says hello once it
heard the tick on all three PUBs and risk answered its STATE request.

Start-up: the conductor publishes `Clock(ts=0)` every HELLO_S until every service has reported
with `hello` set (its SUB is connected: ZeroMQ drops what a PUB sends before that).
"""
from __future__ import annotations

import logging
import time

import msgpack
import zmq

from shared.errors import DecodeError, FatalError

log = logging.getLogger("qf.lockstep")

SERVICES = ("strategy", "risk", "broker")
HELLO_S = 0.05
QUIET_TIMEOUT_S = 30.0  # a system not quiet this long after a release is stuck: the replay stops, named
COUNTERS = {
    "strategy": ("md", "orders_sent", "answers_in"),
    "risk": ("md", "orders_in", "answers_out", "broker_out", "broker_in", "events_in", "cancels_in",
             "cancel_answers_out", "states_out"),
    "broker": ("md", "requests_in", "replies_out", "events_out"),
}
# a stepped strategy's counters beside its COUNTERS ones (`held`, `next_tick` are its state, not counts)
STEPPED = ("cancels_sent", "cancel_answers_in", "events_in", "states_in", "steps", "held", "next_tick")
STEP_TOPIC = "step"  # a step of a stepped strategy: work on what it holds, at the tick's ts
RECORD_STEP_TOPIC = "step.record"  # the same after a record: then its timer too, when due


class LockstepError(FatalError):
    """The lock-step replay cannot go on: a service stayed busy or silent past QUIET_TIMEOUT_S
    (the message names the counters that disagree), or a report was not readable. The conductor
    stops the replay; marketdata exits with it."""


class LockstepClock:
    """A service's clock in lock-step: the latest time the conductor published. Callable like
    `time.time_ns`, so it replaces it where a service takes a clock."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def observe(self, ts: int) -> None:
        if ts > self.now:
            self.now = ts


class Reporter:
    """A service's side: `counters[name] += 1` as things happen, then `report()` at the end of each
    loop turn pushes them when they changed (and once with `hello` when the handshake tick came)."""

    def __init__(self, endpoint: str, service: str, ctx: zmq.Context | None = None, stepped: bool = False) -> None:
        if service not in COUNTERS:
            raise ValueError(f"no lock-step counters for {service!r}")
        if stepped and service != "strategy":
            raise ValueError("only the strategy is stepped")
        self.service = service
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS[service], 0)
        if service == "broker":
            self.counters["next_due"] = -1
        self.stepped = stepped
        if stepped:
            self.counters.update(dict.fromkeys(STEPPED, 0))
        self.hello = False
        self._sent: dict | None = None
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop a report
        self.sock.connect(endpoint)

    def bump(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def on_clock(self, ts: int) -> None:
        """A `clock` message arrived: ts 0 is the handshake (say hello), else count it as md."""
        if ts == 0:
            self.hello = True
        else:
            self.counters["md"] += 1

    def report(self) -> None:
        state = {**self.counters, "hello": self.hello}
        if self.stepped:
            state["stepped"] = True
        if state == self._sent:
            return
        try:
            self.sock.send(msgpack.packb({"service": self.service, **state}), zmq.NOBLOCK)
        except zmq.Again:
            return  # not sent: the next turn tries again (the state is not marked as told)
        self._sent = state

    def close(self) -> None:
        self.sock.close(0)


def unmet(reports: dict[str, dict], published: dict[str, int]) -> list[str]:
    """The conditions of quiet that do not hold (empty: quiet), for the conductor's wait and its
    error message. `published`: books, trades, clocks the conductor has sent (ts > 0), and `steps`
    (absent: none)."""
    missing = [s for s in SERVICES if s not in reports]
    if missing:
        return [f"no report from {', '.join(missing)}"]
    st, rk, br = reports["strategy"], reports["risk"], reports["broker"]
    books, trades, clocks = published["books"], published["trades"], published["clocks"]
    stepped = st.get("stepped") is True
    checks = [("broker md", br["md"], books + trades + clocks), ("risk md", rk["md"], books + trades + clocks),
              ("strategy md", st["md"], books + clocks + (trades if stepped else 0)),
              ("orders strategy→risk", rk["orders_in"], st["orders_sent"]),
              ("answers risk→strategy", st["answers_in"], rk["answers_out"]),
              ("requests risk→broker", br["requests_in"], rk["broker_out"]),
              ("replies broker→risk", rk["broker_in"], br["replies_out"]),
              ("events broker→risk", rk["events_in"], br["events_out"])]
    if stepped:
        checks += [("cancels strategy→risk", rk.get("cancels_in", 0), st["cancels_sent"]),
                   ("cancel answers risk→strategy", st["cancel_answers_in"], rk.get("cancel_answers_out", 0)),
                   ("events broker→strategy", st["events_in"], br["events_out"]),
                   ("states risk→strategy", st["states_in"], rk.get("states_out", 0)),
                   ("steps conductor→strategy", st["steps"], published.get("steps", 0))]
    return [f"{name}: {got} of {want}" for name, got, want in checks if got != want]


def wants_step(report: dict | None, ts: int, record: bool) -> bool:
    """Whether a quiet system must step the strategy of `report` at `ts` (`record`: after a
    record, when its timer counts too): a stepped strategy holding work, or one whose timer is
    due."""
    if not report or report.get("stepped") is not True:
        return False
    return report.get("held", 0) > 0 or (record and report.get("next_tick", 0) <= ts)


class Conductor:
    """The conductor's side (marketdata): a PULL bound at QF_LOCKSTEP, the latest report of each
    service, and the waits."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None) -> None:
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.reports: dict[str, dict] = {}
        self.published = {"books": 0, "trades": 0, "clocks": 0}

    def _read(self, timeout_ms: int) -> bool:
        if not self.sock.poll(timeout_ms):
            return False
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                rep = msgpack.unpackb(raw, raw=False)
                service = rep["service"]
                keys = COUNTERS.get(service, ())
                if rep.get("stepped") is True:
                    keys = (*keys, *STEPPED)
                if service not in COUNTERS or any(type(rep.get(k)) is not int for k in keys):
                    raise DecodeError("bad_report", str(rep)[:200])
            except (ValueError, TypeError, KeyError, msgpack.UnpackException, DecodeError) as exc:
                raise LockstepError(f"unreadable lock-step report: {exc}"[:300]) from None
            self.reports[service] = rep

    def handshake(self, publish_hello, should_stop, timeout_s: float | None = None) -> bool:
        """Publish the hello tick (`publish_hello()`) every HELLO_S until every service said hello.
        False if `should_stop()` came first; LockstepError after `timeout_s` (QUIET_TIMEOUT_S)."""
        timeout_s = QUIET_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not all(self.reports.get(s, {}).get("hello") for s in SERVICES):
            if should_stop():
                return False
            if time.monotonic() > deadline:
                missing = [s for s in SERVICES if not self.reports.get(s, {}).get("hello")]
                raise LockstepError(f"lock-step: no hello from {', '.join(missing)} within {timeout_s:.0f} s")
            publish_hello()
            self._read(int(HELLO_S * 1000))
        return True

    def wait_quiet(self, should_stop, timeout_s: float | None = None) -> int | None:
        """Block until the reports say nothing is in flight; returns the broker's next due time
        (None: nothing held), or None at once if `should_stop()`. LockstepError after `timeout_s`
        without quiet (QUIET_TIMEOUT_S), naming what disagrees."""
        timeout_s = QUIET_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while unmet(self.reports, self.published):
            if should_stop():
                return None
            if time.monotonic() > deadline:
                raise LockstepError("lock-step: not quiet after {:.0f} s: {}".format(
                    timeout_s, "; ".join(unmet(self.reports, self.published))))
            self._read(50)
        due = self.reports["broker"].get("next_due", -1)
        return due if type(due) is int and due >= 0 else None

    def close(self) -> None:
        self.sock.close(0)
