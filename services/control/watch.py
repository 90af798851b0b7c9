"""What the API hears on the bus: each service's heartbeat and each symbol's feed state.

`/api/v1/status` shows them and `/health` is 200 only while every expected service's heartbeat
is fresh and every symbol's book is synced. The database cannot say either (a dead feed or a
stuck risk leaves it as it was), so each API process subscribes to the `heartbeat.*` topics of
the four publishers (and `status.*` from marketdata): a few messages a second, filtered by the
publishers (no books reach the API). One thread per process (gunicorn forks its workers before
the app exists: the thread and its sockets are the worker's own).

Symbols split over several marketdata and strategy processes (QF_INSTANCE, `qf up` with QF_SYMBOLS
groups) beat as `marketdata.1`, `strategy.2`, ...: a service is fresh while every process of it
heard is, and a symbol's feed is synced while the process that reported it is fresh.

A fresh watcher has heard nothing: for one heartbeat period and a margin after it starts,
`snapshot(wait=True)` waits (bounded) for the first heartbeat of each expected service instead
of calling them stale."""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import zmq

from shared import curve
from shared.bus import Subscriber, context
from shared.config import Config
from shared.errors import DecodeError
from shared.messages import Heartbeat, MdStatus, RiskState
from shared.runtime import kind_of

log = logging.getLogger("qf.api")

POLL_MS = 200  # the thread's loop turn: how late close() is noticed
SYNCED = "SYNCED"


# the services whose heartbeats `/health` requires: the four that publish (either strategy kind
# beats on QF_STRATEGY_PUB); the notifier only listens
EXPECTED = ("marketdata", "strategy", "risk", "broker")


@dataclass
class Seen:
    """The newest heartbeat of one service and when it arrived (time.monotonic())."""
    at: float
    beat: Heartbeat


@dataclass
class Snapshot:
    """What the watcher knows at `now` (monotonic): heartbeats by service, feed states by symbol
    (from marketdata's heartbeat, else its `status.*`), risk's newest `risk.state`."""
    now: float
    started: float
    beats: dict[str, Seen] = field(default_factory=dict)
    feeds: dict[str, tuple[str, str]] = field(default_factory=dict)  # symbol -> (state, detail)
    risk: RiskState | None = None
    feed_from: dict[str, str] = field(default_factory=dict)  # symbol -> the marketdata process that reported it


class BusWatch:
    """Subscribes to heartbeats, feed status and risk state on `cfg.bus`'s publishers, in a daemon
    thread started by `start()` (idempotent) and ended by `close()` (`close_all()`: every one this
    process started, e.g. after a test)."""

    _running: "weakref.WeakSet[BusWatch]" = weakref.WeakSet()

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        # it listens as the API (shared/curve.py); KeyFileError here, not in its thread
        self.curve = curve.load(cfg, "api")
        self.expected = EXPECTED
        self.stale_s = 3 * cfg.bus.heartbeat_ms / 1000  # three beats missed
        self.grace_s = cfg.bus.heartbeat_ms / 1000 + 0.5  # a new watcher waits this long for the first beats
        self._lock = threading.Lock()
        self._heard = threading.Condition(self._lock)
        self._beats: dict[str, Seen] = {}
        self._feeds: dict[str, tuple[str, str]] = {}
        self._feed_from: dict[str, str] = {}
        self._risk: RiskState | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = 0.0
        self.decode_errors = 0

    def start(self) -> "BusWatch":
        with self._lock:
            if self._thread is None:
                self._started = self.clock()
                self._thread = threading.Thread(target=self._run, name="qf-api-watch", daemon=True)
                self._thread.start()
                BusWatch._running.add(self)
        return self

    @classmethod
    def close_all(cls) -> None:
        for watch in list(cls._running):
            watch.close()
        cls._running.clear()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        bus = self.cfg.bus
        ctx = context()
        keys = self.curve
        subs = [Subscriber(bus.md_pub, ["heartbeat.", "status."], 1000, ctx=ctx, curve=keys),
                Subscriber(bus.broker_pub, ["heartbeat."], 1000, ctx=ctx, curve=keys),
                Subscriber(bus.risk_pub, ["heartbeat.", "risk.state"], 1000, ctx=ctx, curve=keys),
                Subscriber(bus.strategy_pub, ["heartbeat."], 1000, ctx=ctx, curve=keys)]
        poller = zmq.Poller()
        for sub in subs:
            poller.register(sub.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    ready = dict(poller.poll(POLL_MS))
                except zmq.ZMQError as exc:  # the context terminated under us: nothing more to hear
                    log.warning("watch_stopped", extra={"detail": str(exc)})
                    return
                for sub in subs:
                    if sub.sock in ready:
                        self._drain(sub)
        finally:
            for sub in subs:
                sub.close()

    def _drain(self, sub: Subscriber) -> None:
        for _ in range(1000):  # bounded: a flood cannot keep the loop from noticing close()
            try:
                _, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError:
                self.decode_errors += 1  # a bad frame is counted and dropped, never fatal
                continue
            self._note(msg)

    def _note(self, msg) -> None:
        now = self.clock()
        with self._heard:
            if isinstance(msg, Heartbeat):
                self._beats[msg.service] = Seen(now, msg)
                symbols = (msg.stats or {}).get("symbols") if kind_of(msg.service) == "marketdata" else None
                if isinstance(symbols, dict):
                    for symbol, state in symbols.items():
                        if isinstance(symbol, str) and isinstance(state, str):
                            old = self._feeds.get(symbol, ("", ""))
                            self._feeds[symbol] = (state, "" if state == SYNCED else old[1])
                            self._feed_from[symbol] = msg.service
                self._heard.notify_all()
            elif isinstance(msg, MdStatus):
                self._feeds[msg.symbol] = (msg.state, msg.detail)
            elif isinstance(msg, RiskState):
                self._risk = msg

    def snapshot(self, wait: bool = False) -> Snapshot:
        """What is known now. `wait`: while the watcher is younger than its grace period, first
        wait (at most until the grace period ends) for every expected service's first heartbeat
        (for a service heard as several processes, until the grace period ends)."""
        self.start()
        with self._heard:
            if wait:
                deadline = self._started + self.grace_s
                # one process of a split service heard (`marketdata.2`): how many there are is
                # known only once each has beaten, so the whole grace period is waited for
                while not set(self.expected) <= {kind_of(name) for name in self._beats} or \
                        any(name != kind_of(name) for name in self._beats):
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    self._heard.wait(left)
            return Snapshot(self.clock(), self._started, dict(self._beats), dict(self._feeds), self._risk,
                            dict(self._feed_from))


def _process_view(snap: Snapshot, name: str, stale_s: float) -> dict:
    seen = snap.beats.get(name)
    if seen is None:
        return {"status": "no heartbeat", "age_s": None, "pid": None, "started_ts": None, "fresh": False}
    age = max(0.0, snap.now - seen.at)
    return {"status": str(seen.beat.status)[:80], "age_s": round(age, 3), "pid": seen.beat.pid,
            "started_ts": seen.beat.started_ts, "fresh": age <= stale_s}


def services_view(snap: Snapshot, expected: tuple[str, ...], stale_s: float) -> dict[str, dict]:
    """Each expected service (and any other heard) as {"status", "age_s", "pid", "started_ts",
    "fresh"}: age_s None and status "no heartbeat" when none was heard. A service heard as several
    processes (`marketdata.1`, `marketdata.2`) is fresh while all of them are; its status is "ok"
    while all say so, else what the others say; `instances` has each one's view."""
    names: dict[str, list[str]] = {kind: [] for kind in expected}
    for name in sorted(snap.beats):
        names.setdefault(kind_of(name), []).append(name)
    out = {}
    for kind, procs in names.items():
        if procs == [kind] or not procs:
            out[kind] = _process_view(snap, kind, stale_s)
            continue
        views = {name: _process_view(snap, name, stale_s) for name in procs}
        troubled = [f"{name} {v['status']}" for name, v in views.items() if v["status"] != "ok"]
        out[kind] = {"status": "; ".join(troubled)[:200] if troubled else "ok",
                     "age_s": max(v["age_s"] for v in views.values()), "pid": None,
                     "started_ts": min(v["started_ts"] for v in views.values()),
                     "fresh": all(v["fresh"] for v in views.values()), "instances": views}
    return out


def feeds_view(snap: Snapshot, symbols: tuple[str, ...], stale_s: float) -> dict[str, dict]:
    """Each configured symbol's feed as {"state", "detail", "synced"}: "UNKNOWN" before marketdata
    said anything about it; never synced while the heartbeat of the marketdata process that
    reported it is stale."""
    out = {}
    for symbol in (*symbols, *sorted(set(snap.feeds) - set(symbols))):
        state, detail = snap.feeds.get(symbol, ("UNKNOWN", "marketdata has not reported this symbol"))
        fresh = _process_view(snap, snap.feed_from.get(symbol, "marketdata"), stale_s)["fresh"]
        out[symbol] = {"state": state, "detail": detail[:200], "synced": fresh and state == SYNCED}
    return out
