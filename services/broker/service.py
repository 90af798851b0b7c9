"""Broker service shell: ROUTER for orders and cancels, SUB books and trades, PUB orders and fills, the loop
(and its lock-step variant: QF_LOCKSTEP, shared/lockstep.py)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import msgpack
import zmq

from services.broker import store
from services.broker.core import Order
from services.broker.desk import READ_ERRORS, BrokerDesk, Events, OrderIds, SeededIds, Waiter, rebuild
from services.broker.keeper import STORE_UNAVAILABLE, StoreKeeper
from services.broker.telemetry import (ACK_SECONDS, BAD_FRAMES, BAD_MD, FAILURES, METRICS, JournalCollector, QuietLog,
                                       labelled)
from shared import curve, journal, messages, storage
from shared.alerts import Alerter
from shared.bus import NOBLOCK, Publisher, Server, Subscriber, readable
from shared.config import Config
from shared.db import OrderRow, database, init_db, record_session
from shared.errors import ConfigError, DecodeError, FatalError, StoreUnavailable
from shared.lockstep import LockstepClock, Reporter
from shared.messages import Book, Cancel, Clock, Error, OrderRequest, Trade
from shared.journal import Journal, JournalBusy
from shared.metrics_http import MetricsServer
from shared.metrics_http import serve as serve_metrics
from shared.runtime import HeartbeatMaker, Liveness, MicrosHistogram, Ticker, quiet_gc

# importable from here as before: the desk's and the keeper's names
__all__ = ["BrokerService", "OrderIds", "StoreUnavailable", "STORE_UNAVAILABLE", "Events", "Waiter"]

log = logging.getLogger("qf.broker")

POLL_MS = 100  # longest loop turn; bounds how long stop() takes
IDLE_MS = 1  # a turn this long without a message is idle: the deferred log lines are written then
DRAIN_MAX = 1000  # messages per socket per turn, so one busy socket cannot starve the other
# Risk's start-up recovery holds the journal for milliseconds; a broker started beside it (as `qf up`
# and compose do) waits that long before it concludes another broker runs (exit 2, not restarted).
JOURNAL_BUSY_WAIT_S = 3.0


class BrokerService:
    """The paper broker. `BrokerService(cfg)` opens the journal and the database, rebuilds cash,
    positions and open orders from them and binds its sockets; `run()` blocks until `stop()`;
    then sockets and the database are closed.

    The shell reads requests and market data and runs the loop; the desk (services/broker/desk.py)
    decides and answers, the keeper (services/broker/keeper.py) stores the journal into SQLite
    and meets storage outages. Replies are deferred: an order is answered once it has reached
    the simulated exchange and been matched (after the entry latency), with the fills it got
    there, after they are durable; a cancel once it took effect.

    Lock-step replay (cfg.bus.lockstep set, shared/lockstep.py): the clock is a `LockstepClock`
    (made here unless one is given) moved only by what marketdata, the conductor, publishes
    (books', trades' and `clock` ticks' ts); the timer fires only on `clock` ticks (no poll
    timeout from the next due request); a request stamped ahead of the clock waits until the
    market data up to its ts has been read; order ids come from `SeededIds(QF_BROKER_SEED)`; and
    `reporter` pushes the counters to the conductor at the end of every loop turn. So the fills
    are those `qf backtest` makes of the same capture."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        # its key pair and the public keys of those it serves, before anything is opened: a
        # missing key file stops the start with one line (KeyFileError, a ConfigError)
        self.curve = curve.load(cfg, "broker")
        self.lockstep: LockstepClock | None = None
        if cfg.bus.lockstep:
            if clock is time.time_ns:
                clock = LockstepClock()
            elif not isinstance(clock, LockstepClock):
                raise ConfigError("QF_LOCKSTEP: the broker's clock must be a LockstepClock")
            self.lockstep = clock
        self.clock = clock
        self.stats = {"orders": 0, "fills": 0, "rejects": 0, "decode_errors": 0, "commit_failures": 0,
                      "store_failures": 0, "snapshot_failures": 0, "store_refused": 0}
        self.ack_us = MicrosHistogram()  # request read to reply sent (simulated latency included), for heartbeats
        self.quiet = QuietLog(log)  # lines about bad market data
        self._stop = threading.Event()
        self._closed = False
        try:
            self.journal = Journal(journal.journal_path(cfg.common.db, cfg.common.run_dir), wait_s=JOURNAL_BUSY_WAIT_S)
        except JournalBusy as exc:
            raise ConfigError(f"{exc}: one broker per database (QF_DB)") from None
        try:
            try:
                init_db(cfg.common.db)
                model, account, aggregates, known, self.stats["fills"] = rebuild(cfg, self.journal)
                held = self.lockstep is not None and OrderRow.select().exists()
            except READ_ERRORS as exc:  # e.g. a full disk refusing what the journal holds: `qf up` retries
                raise FatalError(f"cannot bring {cfg.common.db} up to date: "
                                 f"{storage.problem(exc, cfg.common.db)}") from None
            if held:  # seeded order ids start over: they would collide with the stored ones
                raise ConfigError(f"a lock-step replay needs a database of its own: {cfg.common.db} already "
                                  "holds orders")
            try:  # the session's settings, for `qf parity`; a refusal must not stop the broker
                record_session("broker", cfg.effective(), clock())
            except Exception as exc:
                log.warning("session_not_recorded", extra={"error": storage.problem(exc, cfg.common.db)})
            database.close()  # run() may be on another thread; it opens its own connection
            self.liveness = Liveness(cfg.common.run_dir, "broker")
        except BaseException:
            self.journal.close()
            raise
        self.server = Server(cfg.bus.broker_rep, ctx, self.curve)  # with CURVE: risk's key only
        self.md = Subscriber(cfg.bus.md_pub, ["book.", "trade.", "clock"] if self.lockstep else ["book.", "trade."],
                             cfg.bus.hwm, ctx, self.curve)
        self.pub = Publisher(cfg.bus.broker_pub, cfg.bus.hwm, ctx, self.curve)
        self.reporter: Reporter | None = None
        if self.lockstep is not None:
            self.reporter = Reporter(cfg.bus.lockstep, "broker", ctx)
            self.counters = self.reporter.counters
        self.alerts = Alerter("broker", self.pub.publish)
        self.checkpointer = store.Checkpointer(cfg.common.db)
        self.keeper = StoreKeeper(self.journal, cfg.common.db, self.alerts, self.stats,
                                  reopened=self._reopened)
        self.health = self.keeper.health
        if self.lockstep is None:
            self.desk = BrokerDesk(model, account, known, self.keeper, self.stats, clock, self._reply, self._publish,
                                   aggregates=aggregates)
        else:
            self.desk = BrokerDesk(model, account, known, self.keeper, self.stats, clock, self._reply_counted,
                                   self._publish_counted, SeededIds(cfg.broker.seed), aggregates)
        self.heartbeat = HeartbeatMaker("broker")
        self.ticker = Ticker(cfg.bus.heartbeat_ms)
        self.equity_ticker = Ticker(int(cfg.broker.equity_s * 1000))
        self.metrics: MetricsServer | None = None  # /metrics on QF_BROKER_METRICS_BIND while run() runs

    @property
    def books(self) -> dict[str, Book]:
        """The latest book per symbol."""
        return {s: m.book for s, m in self.desk.model.markets.items()}

    @property
    def open(self) -> dict[str, Order]:
        """Open orders that have reached the book, by client_order_id."""
        return {c: w.order for c, w in self.desk.model.working.items() if w.arrival_ts is not None}

    def _reload(self) -> None:
        """After a freeze, when the storage takes writes again (StoreKeeper.probe): the desk's
        state rebuilt. Raises like `rebuild` (the frozen model stays; the next probe tries again)."""
        model, account, aggregates, known, self.stats["fills"] = rebuild(self.cfg, self.journal)
        self.desk.restore(model, account, aggregates, known)

    def _reopened(self) -> None:
        """The loop's connection is on a database file the keeper put back: no automatic
        checkpoint on it either, and the checkpointer's connection onto it too."""
        database.execute_sql("PRAGMA wal_autocheckpoint=0")
        self.checkpointer.reopen()

    def request(self, envelope: list, payload: bytes) -> None:
        """One request: answered now (an error, a repeat, a bad order) or when the
        simulated exchange has processed it. Never raises for a bad request."""
        now = self.clock()
        waiter = (envelope, time.perf_counter())
        try:
            req = messages.decode(payload, messages.REQUESTS)
        except DecodeError as exc:
            self.stats["decode_errors"] += 1
            BAD_FRAMES.labels("request").inc()
            log.warning("bad_request", extra={"code": exc.reason, "detail": exc.detail})
            return self.desk.reply(waiter, Error(ts=now, code=exc.reason, text=exc.detail))
        if isinstance(req, OrderRequest):
            self.desk.place(waiter, req, now)
        elif isinstance(req, Cancel):
            self.desk.cancel(waiter, req.client_order_id, now)
        else:
            self.stats["decode_errors"] += 1
            BAD_FRAMES.labels("request").inc()
            self.desk.reply(waiter, Error(ts=now, code="unexpected_type", text=req.TYPE))

    # -- loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); closes sockets and the database on the way out."""
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        poller.register(self.md.sock, zmq.POLLIN)
        quiet_gc()  # shared/runtime.py: the cycle collector off the per-message path
        try:
            bind = self.cfg.broker.metrics_bind
            if bind:  # MetricsBindError (a FatalError) when it cannot be bound
                self.metrics = serve_metrics(bind, "QF_BROKER_METRICS_BIND",
                                             (*METRICS, JournalCollector(self.journal)), self.liveness.path)
                log.info("metrics listening", extra={"bind": bind, "port": self.metrics.port})
            database.connect(reuse_if_open=True)
            self.keeper.opened()  # the file it writes, watched for deletion or replacement
            self.checkpointer.start()
            if self.lockstep is None:
                self._loop(poller.poll)
            else:
                self._loop_lockstep(poller.poll)
        finally:
            self.close()
            log.info("stopped", extra={"orders": self.stats["orders"], "fills": self.stats["fills"]})

    def _loop(self, poll) -> None:
        keeper, desk = self.keeper, self.desk
        while not self._stop.is_set():
            ready = dict(poll(self._timeout_ms()))
            if not ready:
                self._guarded(lambda: keeper.store(idle=True))
                desk.later.flush()
            if self.md.sock in ready:
                self._drain_md()
            if self.server.sock in ready:
                self._drain_requests()
            self._guarded(lambda: desk.advance(self.clock()))
            self._chores()

    def _chores(self) -> None:
        """The end of a loop turn: store what the journal holds, probe a storage outage, the
        equity snapshot and the heartbeat when due (wall-time tickers, both loops)."""
        health, keeper = self.health, self.keeper
        now = time.monotonic()
        keeper.check_file(now)  # the file at QF_DB still the one written? one os.stat per FILE_CHECK_S
        if self.journal.pending:
            self._guarded(keeper.store)
        if health.down and health.probe_due(now):
            self._guarded(lambda: keeper.probe(self._reload))
        if self.equity_ticker.due() and not health.down:
            self._guarded(lambda: keeper.snapshot(self.clock(), self.desk.account, self.desk.model.marks()))
        if self.ticker.due():
            self._beat()
        if self.desk.later.due():  # a loop never idle still writes its lines, at most MAX_AGE_S late
            self.desk.later.flush()

    def _timeout_ms(self) -> int:
        wait = min(self.keeper.wait_ms(POLL_MS), IDLE_MS if self.desk.later.pending else POLL_MS)
        due = self.desk.model.next_due()
        if due is None:
            return wait
        return max(0, min(wait, -(-(due - self.clock()) // 1_000_000)))

    def _drain_md(self) -> None:
        # Everything waiting is applied first and committed once (group commit): a
        # burst costs one transaction, and nothing is published before it is durable.
        desk, updates = self.desk, []
        for msg in self._md_messages(check_readable=True):
            if isinstance(msg, Book):
                self._guarded(lambda: updates.extend(desk.model.on_book(msg, self.clock())))
            elif isinstance(msg, Trade):
                self._guarded(lambda: updates.extend(desk.model.on_trade(msg, self.clock())))
        self._guarded(lambda: desk.process(updates))
        self._note_refusals()

    def _md_messages(self, check_readable: bool):
        """Up to DRAIN_MAX decoded messages waiting on the md SUB; a frame that is not a message
        is counted and logged (quietly) and skipped. `check_readable`: after the first, look at
        the socket's flag before each receive (cheaper than a failing recv when it is empty)."""
        md = self.md
        for i in range(DRAIN_MAX):
            if check_readable and i == 1 and not readable(md.sock):
                return
            try:
                _topic, msg = md.recv(NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("md").inc()
                self.quiet.warn("bad_md_frame", exc.reason, exc.detail)
                continue
            yield msg

    def _note_refusals(self) -> None:
        """Books and trades the model refused since the last call: counted and logged (quietly)."""
        refused, last = self.desk.model.refusals()
        if refused:
            for reason, n in refused.items():
                labelled(BAD_MD, reason).inc(n)
            self.stats["bad_market_data"] = self.stats.get("bad_market_data", 0) + sum(refused.values())
            self.quiet.warn("market_data_refused", last.reason, last.detail)

    def _drain_requests(self) -> None:
        for i in range(DRAIN_MAX):
            if i == 1 and not readable(self.server.sock):
                break
            try:
                envelope, payload = self.server.recv(NOBLOCK)
            except zmq.Again:
                break
            if payload is None:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("envelope").inc()
                continue
            if not self._guarded(lambda: self.request(envelope, payload)):
                self._reply((envelope, time.perf_counter()),
                            Error(ts=self.clock(), code="internal", text="broker failure"))
        # zero latency: the requests just read are answered in this turn, with one commit for all
        self._guarded(lambda: self.desk.advance(self.clock()))

    # -- lock-step loop (QF_LOCKSTEP) ----------------------------------------------------------

    def _loop_lockstep(self, poll) -> None:
        """The loop in lock-step: time moves only with what the conductor publishes, so the poll
        waits only for storage's sake (never for the next due request: the conductor ticks
        `clock` at it), and nothing is advanced but by a book, a trade or a tick. The counters
        go to the conductor at the end of every turn, `next_due` updated just before."""
        reporter, counters = self.reporter, self.counters
        while not self._stop.is_set():
            ready = dict(poll(self.keeper.wait_ms(POLL_MS)))
            if not ready:
                self._guarded(lambda: self.keeper.store(idle=True))
            if self.md.sock in ready:
                self._drain_md_lockstep()
            if self.server.sock in ready:
                self._drain_requests_lockstep()
            self._chores()
            self.desk.later.flush()  # the replay's pace is the conductor's: nothing to wait for
            due = self.desk.model.next_due()
            counters["next_due"] = -1 if due is None else due
            reporter.report()

    def _drain_md_lockstep(self) -> None:
        """What the md SUB holds, one message at a time in the backtest's order: a book or a
        trade moves the clock to its ts and meets the model at that ts (what is due before it
        first, as FillModel.on_book does), committed and answered before the next; a `clock`
        tick with ts > 0 moves the clock and fires the timer (`desk.advance(ts)`); ts 0 is the
        handshake (hello). Counted as `md` once processed; a frame that cannot be decoded is
        not (the conductor then names the broker's md as unmet: a replay that lost a book is
        not the capture's)."""
        desk, lockstep, counters = self.desk, self.lockstep, self.counters
        for msg in self._md_messages(check_readable=False):
            kind, ts = type(msg), msg.ts
            if kind is Clock:
                self.reporter.on_clock(ts)
                if ts == 0:  # the handshake: passed on, so risk learns its SUB hears this PUB
                    self._guarded(lambda: self.pub.publish("clock", msg))
                if ts > 0:
                    lockstep.observe(ts)
                    self._guarded(lambda: desk.advance(ts))
                continue
            if kind is Book:
                lockstep.observe(ts)
                self._guarded(lambda: desk.process(desk.model.on_book(msg, ts)))
            elif kind is Trade:
                lockstep.observe(ts)
                self._guarded(lambda: desk.process(desk.model.on_trade(msg, ts)))
            else:
                continue
            if ts > 0:
                counters["md"] += 1
        self._note_refusals()

    def _drain_requests_lockstep(self) -> None:
        """Requests in the order they came, each after the market data already here (a
        record's books reach the broker before the orders they caused, as in the backtest)
        and, when stamped ahead of the clock, after the market data up to its ts (`_await_md`):
        then it meets the model at the clock's time (== its ts). No advance here: an order due
        at once waits for the conductor's tick, as the backtest's waits for its timer."""
        counters = self.counters
        for _ in range(DRAIN_MAX):
            try:
                envelope, payload = self.server.recv(NOBLOCK)
            except zmq.Again:
                break
            counters["requests_in"] += 1
            if payload is None:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("envelope").inc()
                continue
            self._drain_md_lockstep()
            ts = _stamp(payload)
            if ts > self.lockstep.now:
                self._await_md(ts)
            if not self._guarded(lambda: self.request(envelope, payload)):
                self._reply_counted((envelope, time.perf_counter()),
                                    Error(ts=self.clock(), code="internal", text="broker failure"))

    def _await_md(self, ts: int) -> None:
        """Read market data (blocking polls of at most POLL_MS, until stop()) until the clock
        reached `ts`. Nothing is reported meanwhile, so the conductor, which published that
        market data before the request could be made, waits for the broker."""
        sock = self.md.sock
        while self.lockstep.now < ts and not self._stop.is_set():
            if sock.poll(POLL_MS):
                self._drain_md_lockstep()

    def _reply_counted(self, waiter: Waiter, msg: messages.Message) -> None:
        """`_reply`, counted as `replies_out` (lock-step)."""
        self._reply(waiter, msg)
        self.counters["replies_out"] += 1

    def _publish_counted(self, events: Events) -> None:
        """`_publish`, counted as `events_out` (lock-step): every fill.* and order.* event."""
        self._publish(events)
        self.counters["events_out"] += len(events)

    def _guarded(self, fn: Callable[[], object]) -> bool:
        # A bug on one message must not stop the broker; nothing was committed, so nothing was announced.
        try:
            fn()
            return True
        except FatalError:
            raise
        except Exception:
            FAILURES.inc()
            log.exception("message_failed")
            return False

    def _reply(self, waiter: Waiter, msg: messages.Message) -> None:
        """The desk's `reply`: send `msg` to the waiting client and time the request."""
        self.server.reply(waiter[0], messages.encode(msg))
        took = time.perf_counter() - waiter[1]
        ACK_SECONDS.observe(took)
        self.ack_us.record_ns(int(took * 1e9))

    def _publish(self, events: Events) -> None:
        """The desk's `publish`: fill.* and order.* events, once they are durable."""
        pub = self.pub
        for topic, msg, wire in events:
            if wire is None:
                pub.publish(topic, msg)
            else:  # what publish() sends, from the wire map made for the ack
                pub.send_raw(topic.encode(), msgpack.packb({**wire, "seq": pub.next_seq(topic)}, use_bin_type=True))

    def _beat(self) -> None:
        model = self.desk.model
        stats = {**self.stats, "open": len(self.open), "in_flight": model.pending, **self.keeper.describe(),
                 "checkpoint_failures": self.checkpointer.failures,
                 "feed_lag_ms": model.latency.describe()["feed_lag_ms"],
                 "equity": str(self.desk.account.equity(model.marks())), **self.ack_us.stats("ack")}
        if self.curve is not None:  # handshakes refused by its sockets' key lists (shared/curve.py)
            stats["curve_refused"] = curve.refused_total()
        self.pub.publish("heartbeat.broker", self.heartbeat.make(
            "store_unavailable" if self.health.down else "ok", stats))
        self.liveness.touch()  # never raises: a full disk must not stop the loop

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Close sockets and this thread's database connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.metrics is not None:
            self.metrics.close()
        self._guarded(lambda: self.keeper.store(force=True))  # what is left stays in the journal
        self.desk.later.flush()
        self.checkpointer.stop()
        for sock in (self.server, self.md, self.pub):
            sock.close()
        if self.reporter is not None:
            self.reporter.close()
        database.close()
        self.journal.close()


def _stamp(payload: bytes) -> int:
    """A request's `ts` as sent (0 when the frame has none readable: `request` answers it)."""
    if len(payload) > messages.MAX_FRAME:
        return 0
    try:
        ts = msgpack.unpackb(payload, raw=False).get("ts")
    except Exception:  # not a map, not msgpack: no ts
        return 0
    return ts if type(ts) is int else 0
