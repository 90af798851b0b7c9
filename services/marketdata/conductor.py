"""Lock-step replay, marketdata's side (`qf up --feed replay:FILE --lockstep`, QF_LOCKSTEP): the
conductor's loop. The protocol (the counters, `unmet`, the handshake) is shared/lockstep.py.

MarketDataService runs `LockstepReplay` instead of its paced replay when QF_LOCKSTEP is set: the
capture's records (ReplayFeed(stamp="recorded"), so each carries its recorded time) go into the
BookRouter one at a time, and the next is released only once strategy, risk and the broker have
reported that nothing is in flight. Before a record at `t`, each instant the broker said a
request of its falls due (`next_due`, up to `t`) is ticked as a `Clock` message, as `qf backtest`
wakes its exchange (services/backtest/engine.py, `Backtest.run`). A stepped strategy (the OFI
strategy, shared/lockstep.py) is then stepped after each quiet while it holds work (after a record,
also while its timer is due), each step followed by quiet again. So the services see the hand-offs
in the backtest's order, on the capture's time, whatever the machine's speed.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

import zmq

from shared import lockstep
from shared.bus import Publisher
from shared.errors import ConfigError
from shared.lockstep import RECORD_STEP_TOPIC, STEP_TOPIC, Conductor, LockstepClock, LockstepError, wants_step
from shared.messages import Clock

log = logging.getLogger("qf.marketdata")

CLOCK_TOPIC = "clock"


class CountingPublisher(Publisher):
    """marketdata's PUB socket in a lock-step replay: counts what goes out on `book.*` and
    `trade.*` into `published` (the conductor's `Conductor.published`, what the services' md
    counters must reach). Being a subclass, it makes BookRouter take its general path
    (`publish(topic, Book(...))`), whose bytes are the fast path's
    (tests/services/marketdata/test_fast_publish.py): a few µs more a book, against the round
    trip through three services that each record waits for."""

    def __init__(self, endpoint: str, hwm: int, published: dict[str, int] | None = None,
                 ctx: zmq.Context | None = None, curve=None) -> None:
        super().__init__(endpoint, hwm, ctx, curve)
        self.published = published if published is not None else {"books": 0, "trades": 0, "clocks": 0}

    def send_raw(self, topic: bytes, payload: bytes) -> None:
        super().send_raw(topic, payload)
        if topic.startswith(b"book."):
            self.published["books"] += 1
        elif topic.startswith(b"trade."):
            self.published["trades"] += 1


def open_conductor(endpoint: str, ctx: zmq.Context | None = None) -> Conductor:
    """The conductor's PULL bound at QF_LOCKSTEP (an ipc path's directory made first). Raises
    ConfigError (marketdata exits 2) when it cannot bind: another lock-step replay holds it."""
    if endpoint.startswith("ipc://"):
        parent = os.path.dirname(endpoint[6:])
        if parent:
            os.makedirs(parent, exist_ok=True)
    try:
        return Conductor(endpoint, ctx)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind QF_LOCKSTEP={endpoint}: {exc}") from None


class LockstepReplay:
    """Releases a capture's records into `router` one at a time under `conductor`.

    `pub` is the router's publisher (it counts books and trades into `conductor.published`, see
    CountingPublisher); `clock` is marketdata's own lock-step clock (the latest time released);
    `should_stop()` is the service's stop flag; `idle()` is called between records and every
    ~50 ms while a wait lasts (heartbeats and liveness go on). Waits give up after
    `shared.lockstep.QUIET_TIMEOUT_S` (read at each wait) or `timeout_s`, raising LockstepError.

    MarketDataService calls `handshake()`, then `run(records)`; `counts` says what went out."""

    def __init__(self, conductor: Conductor, router, pub, clock: LockstepClock,
                 should_stop: Callable[[], bool], idle: Callable[[], None] = lambda: None,
                 timeout_s: float | None = None) -> None:
        self.conductor, self.router, self.pub, self.clock = conductor, router, pub, clock
        self.should_stop, self.idle, self.timeout_s = should_stop, idle, timeout_s
        self.records = 0

    @property
    def counts(self) -> dict[str, int]:
        """Records released, and books, trades, clock ticks (and strategy steps) published."""
        return {"records": self.records, **self.conductor.published}

    def _timeout(self) -> float:
        return lockstep.QUIET_TIMEOUT_S if self.timeout_s is None else self.timeout_s

    def _waiting(self) -> bool:
        """The conductor's should_stop while it waits: also the service's chance to beat."""
        self.idle()
        return self.should_stop()

    def _hello(self) -> None:
        self.pub.publish(CLOCK_TOPIC, Clock(ts=0))

    def handshake(self) -> bool:
        """Publish the hello tick until strategy, risk and the broker said hello (their SUBs are
        connected). False if stopped first; LockstepError naming the silent ones on timeout."""
        return self.conductor.handshake(self._hello, self._waiting, self._timeout())

    def _quiet(self) -> int | None:
        return self.conductor.wait_quiet(self._waiting, self._timeout())

    def _tick(self, due: int) -> None:
        self.clock.observe(due)
        self.pub.publish(CLOCK_TOPIC, Clock(ts=due))
        self.conductor.published["clocks"] += 1

    def _broker_moved(self) -> tuple:
        rep = self.conductor.reports.get("broker", {})
        return rep.get("requests_in"), rep.get("replies_out"), rep.get("events_out")

    def _strategy_moved(self) -> tuple:
        rep = self.conductor.reports.get("strategy", {})
        return tuple(rep.get(k) for k in ("held", "next_tick", "orders_sent", "cancels_sent"))

    def _steps(self, ts: int, record: bool, due: int | None, seen: bool = True) -> int | None:
        """Step a stepped strategy at `ts` while it wants it (`shared.lockstep.wants_step`), each
        step followed by quiet; returns the broker's next due after the last (`due`: as of the
        last quiet). `seen`: whether risk and the broker have read something at `ts`; if not (a
        record that published nothing, where only the strategy's timer may act), a `clock` tick
        at `ts` comes first, so that what the strategy sends meets them at its time, as in the
        backtest. A strategy that did nothing with a step would be stepped forever: LockstepError."""
        published = self.conductor.published
        topic = RECORD_STEP_TOPIC if record else STEP_TOPIC
        if not seen and wants_step(self.conductor.reports.get("strategy"), ts, record):
            self._tick(ts)
            due = self._quiet()
        while wants_step(self.conductor.reports.get("strategy"), ts, record) and not self.should_stop():
            before = self._strategy_moved()
            self.pub.publish(topic, Clock(ts=ts))
            published["steps"] = published.get("steps", 0) + 1
            due = self._quiet()
            if self._strategy_moved() == before:
                raise LockstepError(f"lock-step: the strategy still holds work at {ts} after a step, and did nothing")
        return due

    def _ticks(self, due: int | None, until: int | None) -> int | None:
        """Tick each broker due up to `until` (None: every one left), waiting for quiet after
        each (and stepping the strategy, `_steps`); returns the next due beyond. A broker that
        still holds a due request after its tick, having done nothing with it, would be ticked
        forever: LockstepError."""
        while due is not None and (until is None or due <= until) and not self.should_stop():
            before = self._broker_moved()
            self._tick(due)
            nxt = self._steps(due, False, self._quiet())
            if nxt is not None and nxt <= due and self._broker_moved() == before:
                raise LockstepError(f"lock-step: the broker still holds a request due at {due} after the clock "
                                    "reached it, and answered nothing")
            due = nxt
        return due

    def run(self, records: Iterable) -> bool:
        """Every record, in order, each after quiet: first the broker's dues up to its time,
        then the record itself, then the strategy's steps at its time (a stepped strategy
        only). After the last, the dues left (orders still in flight reach the book, as the
        backtest's end does). True when the capture played to its end."""
        dispatch, clock, stop, idle = self.router.dispatch, self.clock, self.should_stop, self.idle
        published = self.conductor.published
        due = None  # the broker's next due request, as of the last quiet
        for rec in records:
            t = rec.recv_ns
            if due is not None and due <= t:
                due = self._ticks(due, t)
            clock.observe(t)
            md = published["books"] + published["trades"]
            dispatch(rec, t)
            self.records += 1
            due = self._steps(t, True, self._quiet(), published["books"] + published["trades"] != md)
            idle()
            if stop():
                return False
        self._ticks(due, None)
        return not stop()
