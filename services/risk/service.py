"""Risk service shell: ROUTER for orders and control, a DEALER to the broker, SUB books and fills, PUB risk.state."""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from functools import partial
from typing import Callable

import peewee as pw
import zmq

from services.risk import limits as risk_limits
from services.risk import store
from services.risk.core import RiskEngine
from services.risk.desk import OrderDesk
from services.risk.checks import PAUSE_PREFIX
from services.risk.flatten import FLATTEN_RETRY_NS, FlattenJob
from services.risk.link import BrokerLink
from services.risk.lockstep import CountingLink, CountingServer
from services.risk.telemetry import (BAD_FRAMES, CHECK_SECONDS, DECIDE_SECONDS, FAILURES, METRICS,
                                     PAUSE_FLATTEN_FAILED, PAUSE_FLATTEN_FAILURES, STATE_CHANGES, LogLimiter,
                                     show_state)
from shared import curve, journal, messages, storage
from shared.alerts import Alerter
from shared.bus import NOBLOCK, Publisher, Server, Subscriber, readable
from shared.config import Config
from shared.db import database, init_db
from shared.enums import ControlAction
from shared.errors import DecodeError, FatalError
from shared.lockstep import QUIET_TIMEOUT_S, LockstepClock, Reporter
from shared.metrics_http import MetricsServer
from shared.metrics_http import serve as serve_metrics
from shared.messages import (Book, Cancel, Clock, Control, ControlReply, Error, Fill, OrderEvent, OrderRequest,
                             RiskState, Trade)
from shared.runtime import HeartbeatMaker, Liveness, MicrosHistogram, Ticker, quiet_gc

log = logging.getLogger("qf.risk")

POLL_MS = 100  # idle loop turn; bounds how late stop(), heartbeats and flushes can be
DRAIN_MAX = 1000  # messages per socket per turn, so a book burst cannot starve orders
FLUSH_ROWS, FLUSH_NS = 256, 100_000_000  # denial rows are written in batches, off the reply path
LOCKSTEP_PROBE = "lockstep-hello"  # the cancel that proves risk's DEALER reaches the broker (answered UNKNOWN_ORDER)
MAX_ID = 128  # longest client_order_id / strategy kept: the answer caches must stay bounded
OUTBOX_MAX = 100_000  # rows kept while the database refuses writes; older ones are dropped and counted


class RiskService:
    """Risk in front of the broker. `RiskService(cfg)` prints its limits, rebuilds positions,
    working orders, trading state, peak and day-start equity from the database and binds its
    sockets; `run()` blocks until `stop()`; then sockets and the database are closed.

    Orders wait for the broker without blocking anything else: risk keeps checking other
    orders, reading books and fills and answering control while the broker works.

    Lock-step replay (QF_LOCKSTEP, shared/lockstep.py): `clock` is a LockstepClock (made here
    when not given) moved by the `ts` of every book and `clock` tick risk reads; a request,
    broker reply or broker event stamped after it waits until risk has read the market data up
    to its stamp (`_catch_up`), in its place; risk's counters go to the conductor at the end of
    every loop turn. The methods that do this are bound in place of the usual ones, so a
    normal run does not pay for them."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        self.cfg = cfg
        lockstep = cfg.bus.lockstep
        if clock is None:
            clock = LockstepClock() if lockstep else time.time_ns
        elif lockstep and not isinstance(clock, LockstepClock):
            raise TypeError("a lock-step risk takes its time from the conductor: its clock is a LockstepClock")
        self.clock = clock
        self.curve = curve.load(cfg, "risk")  # KeyFileError (one line, exit 2) before anything is opened
        self.limits = risk_limits.from_config(cfg)
        for line in risk_limits.describe(self.limits):
            log.info("limits", extra=line)
        self.engine = RiskEngine.from_config(self.limits, cfg)  # QF_START_CASH/_BALANCES, the broker's fees
        forwarded = store.Forwarded()
        self.stats = {"approved": 0, "adjusted": 0, "rejected": 0, "broker_rejected": 0, "decode_errors": 0,
                      "books": 0, "bad_books": 0, "fills": 0, "events_lost": 0, "store_failures": 0, "forbidden": 0}
        self.outbox = store.Outbox(OUTBOX_MAX, self.stats)  # bounded, backs off, alerts while writes fail
        self.check_us, self.serve_us = MicrosHistogram(), MicrosHistogram()
        self.quiet = LogLimiter(log)
        self._stop = threading.Event()
        self._closed = False
        self._later: list[Callable[[], object]] = []
        # Subscribe before reading the database: fills committed meanwhile wait
        # in the queue instead of being lost, and the ledger drops the overlap.
        # lock-step: trades too, only for their `ts` (a resting order's fill is stamped with its trade's)
        self.md = Subscriber(cfg.bus.md_pub, ["book.", "trade.", "clock"] if lockstep else ["book."], cfg.bus.hwm, ctx,
                             self.curve)
        self.broker_events = Subscriber(cfg.bus.broker_pub, ["fill.", "order.", "clock"] if lockstep
                                        else ["fill.", "order."], cfg.bus.hwm, ctx, self.curve)
        try:
            init_db(cfg.common.db)
        except (pw.PeeweeException, sqlite3.Error, OSError) as exc:  # e.g. a full disk: one line, `qf up` retries
            raise FatalError(f"cannot open {cfg.common.db}: {storage.problem(exc, cfg.common.db)}") from None
        try:
            # What the broker made durable but has not stored yet is in its journal: stored first
            # (its broker died) or waited for (it runs), so the rebuild reads everything it told.
            stored = journal.recover(journal.journal_path(cfg.common.db, cfg.common.run_dir))
            found = {**store.rebuild(self.engine, forwarded, self.clock()), **stored}
        except (pw.PeeweeException, sqlite3.Error, OSError) as exc:  # one line, and `qf up` retries
            raise FatalError(f"cannot rebuild risk's state from {cfg.common.db}: "
                             f"{storage.problem(exc, cfg.common.db)}") from None
        else:
            try:  # a full disk must not keep risk from deciding (fail-closed needs no disk): rows wait
                store.prune_checkpoints()
                self.outbox.flush(self.engine, self.clock())  # a new day or peak seen at start is kept
            except Exception as exc:
                log.warning("start_rows_not_written", extra={"problem": storage.problem(exc, cfg.common.db)})
        finally:
            database.close()  # run() may be on another thread; it opens its own connection
        log.info("rebuilt", extra={**found, "positions": self.engine.position_map(),
                                   "balances": {a: v["free"] for a, v in self.engine.balances.view().items()},
                                   "peak_equity": self.engine.peak, "day_start_equity": self.engine.day_start})
        self.reporter: Reporter | None = None
        if lockstep:
            self.reporter = Reporter(lockstep, "risk", ctx)
            self.server = CountingServer(cfg.bus.risk_rep, self.reporter, ctx, self.curve)
            self.broker = CountingLink(cfg.bus.broker_rep, cfg.risk.broker_timeout_ms, self.reporter,
                                       self._catch_up, ctx, self.curve)
            self._links = {"broker_pub": False, "probe": ""}  # what `_hello` waits for
            self.handle = self._handle_lockstep  # type: ignore[method-assign]
            self._drain = self._drain_lockstep  # type: ignore[method-assign]
        else:
            # with CURVE: the strategies' and the API's keys; who may send what is checked in handle()
            self.server = Server(cfg.bus.risk_rep, ctx, self.curve)
            self.broker = BrokerLink(cfg.bus.broker_rep, cfg.risk.broker_timeout_ms, ctx, self.curve)
        self.pub = Publisher(cfg.bus.risk_pub, cfg.bus.hwm, ctx, self.curve)
        self.alerts = Alerter("risk", self.pub.publish, clock=self.clock)
        self.outbox.attach(self.alerts)
        self.desk = OrderDesk(self.engine, self.broker, self.outbox, forwarded, self.stats, self.clock, self.quiet,
                              self.alerts)
        self._flattening: FlattenJob | None = None  # the pause's flatten in progress
        self._flatten_retry_ns = 0
        self.liveness = Liveness(cfg.common.run_dir, "risk")
        self.heartbeat = HeartbeatMaker("risk")
        self.ticker = Ticker(cfg.bus.heartbeat_ms)
        self.metrics: MetricsServer | None = None  # /metrics on QF_RISK_METRICS_BIND while run() runs

    # -- requests -----------------------------------------------------------------------

    def handle(self, envelope: list[bytes], payload: bytes, received_ns: int) -> bytes | None:
        """One request → its reply payload, or None when the reply is sent later (an order or
        cancel waiting for the broker, a FLATTEN in progress). Times what it does (`_reply`)."""
        now = self.clock()
        try:
            req = messages.decode(payload, messages.REQUESTS)
        except DecodeError as exc:
            return self._bad_request(now, exc.reason, exc.detail)
        decoded = time.perf_counter_ns()
        kind = type(req)
        peer = self.server.peer  # None without CURVE: then every client may send anything
        if peer is not None:
            why = curve.refusal(peer, req.TYPE, req.action.value if kind is Control else "")
            if why is not None:
                return self._forbidden(now, peer, why)
        if (kind is OrderRequest or kind is Cancel) and not 0 < len(req.client_order_id) <= MAX_ID:
            return self._bad_request(now, "bad_field", f"client_order_id: 1 to {MAX_ID} characters")
        if kind is OrderRequest:
            if len(req.strategy) > MAX_ID:
                return self._bad_request(now, "bad_field", f"strategy: at most {MAX_ID} characters")
            self.desk.submit_order(req, payload, now, partial(self._answer, envelope, received_ns, decoded), decoded)
            return None
        later = (lambda raw: self.server.reply(envelope, raw))  # after broker hops: not timed
        if kind is Cancel:
            self.desk.submit_cancel(req.client_order_id, now, later)
            return None
        if kind is Control:
            reply = self.control(req, now, later)
            if reply is not None:
                self._reply(envelope, reply, received_ns, decoded, 0, decoded)
            return None
        return self._bad_request(now, "unexpected_type", req.TYPE)

    def _bad_request(self, now: int, code: str, detail: str) -> bytes:
        self.stats["decode_errors"] += 1
        BAD_FRAMES.labels("request").inc()
        self.quiet.log_event(logging.WARNING, "bad_request", code, {"code": code, "detail": detail[:200]})
        return messages.encode(Error(ts=now, code=code, text=detail[:500]))

    def _forbidden(self, now: int, peer: str, why: str) -> bytes:
        """The `error` FORBIDDEN answering a request its sender's key may not make (a strategy's
        HALT, the API's order), counted and logged (rate-limited) like a bad frame."""
        self.stats["forbidden"] += 1
        BAD_FRAMES.labels("forbidden").inc()
        self.quiet.log_event(logging.WARNING, "forbidden", peer, {"peer": peer, "detail": why})
        return messages.encode(Error(ts=now, code="FORBIDDEN", text=why))

    def _answer(self, envelope: list[bytes], received_ns: int, decoded_ns: int, payload: bytes, spent_ns: int,
                since_ns: int) -> None:
        """An order's answer (the desk's Notify, its first three arguments bound with partial: a
        cheaper object to make on every order than a closure)."""
        self._reply(envelope, payload, received_ns, decoded_ns, spent_ns, since_ns)

    def _reply(self, envelope: list[bytes], reply: bytes, received_ns: int, decoded_ns: int, spent_ns: int,
               since_ns: int) -> None:
        """Send `reply` and time the request: `check_us` from request decoded to reply encoded,
        the broker hop excluded (`spent_ns` before it, then since `since_ns`); `serve_us` from
        frame received to reply sent, the hop excluded (ZeroMQ's own costs included)."""
        encoded = time.perf_counter_ns()
        self.server.reply(envelope, reply)
        inside = spent_ns + encoded - since_ns
        self.check_us.record_ns(inside)
        CHECK_SECONDS.observe(inside / 1e9)
        DECIDE_SECONDS.observe((encoded - decoded_ns) / 1e9)  # the broker's round trip included
        hop = since_ns - decoded_ns - spent_ns
        self.serve_us.record_ns(time.perf_counter_ns() - received_ns - hop)

    def control(self, req: Control, now: int, reply: Callable[[bytes], None]) -> bytes | None:
        """HALT/RESUME/FLATTEN/STATE → the ControlReply payload (FLATTEN: None, and `reply` gets
        it once its cancels and closing orders are answered). A state change is committed
        before anyone is told of it."""
        changed = self.engine.control(req.action, req.by, req.reason, now)
        self._settle(now)
        if changed:
            log.warning("trading_state", extra={"state": self.engine.state.value, "action": req.action.value,
                                                "by": req.by, "reason": req.reason})
        if req.action is not ControlAction.FLATTEN:
            return self._control_reply(now, changed, [])

        def done(results: list[dict]) -> None:
            reply(self._control_reply(self.clock(), changed, results))
        FlattenJob(self.engine, self.desk.submit_order, self.desk.submit_cancel, self.later, now, done).start()
        return None

    def _control_reply(self, now: int, changed: bool, flatten: list[dict]) -> bytes:
        self._settle(now)
        self._flush(now)  # what the reply reports is stored before it is told
        return messages.encode(ControlReply(
            ts=now, state=self.engine.state, reason=self.engine.state_reason,
            positions=self.engine.position_map(), equity=self.engine.equity(),
            detail={**self.engine.summary(), "changed": changed, "flatten": flatten}))

    # -- events -----------------------------------------------------------------------------

    def on_event(self, msg: messages.Message, now: int) -> None:
        """A book, a fill or an order event from the bus."""
        if isinstance(msg, Book):
            why = messages.book_problem(msg)
            if why is not None:  # neither a mark nor a fresh book: counted and logged (rate-limited)
                self.stats["bad_books"] += 1
                BAD_FRAMES.labels("book").inc()
                self.quiet.log_event(logging.WARNING, "book_refused", why, {"symbol": msg.symbol, "detail": why})
                return
            self.stats["books"] += 1
            self.engine.on_book(msg.symbol, msg.mid, now)
        elif isinstance(msg, Fill):
            if not self.engine.has_fill(msg.fill_id):  # the usual case: booked from the broker's answer
                self.desk.on_fill_event(msg.to_wire(), now)  # vetted like an ack's fills
        elif isinstance(msg, OrderEvent):
            self.desk.on_order_event(msg)

    def _settle(self, now: int) -> None:
        """Store, then publish, the state changes the engine made."""
        if not self.engine.has_changes:
            return
        changes = self.engine.take_changes()
        for change in changes:
            self.outbox.state_change(change)
            STATE_CHANGES.labels(change.code).inc()
            log.warning("state_change", extra={"state": change.state.value, "previous": change.previous.value,
                                               "code": change.code, "by": change.by, "reason": change.reason})
        self._flush(now)
        if self.reporter is None:
            self._publish_state(now)
        else:  # lock-step: one risk.state per change, as the backtest hands each change to the strategy
            for change in changes:
                self._publish_state(now, change)

    def _publish_state(self, now: int, change=None) -> None:
        """risk.state: the trading state now (or as `change` left it; counted as `states_out` in
        a lock-step run)."""
        equity = self.engine.equity()
        state, reason = (self.engine.state, self.engine.state_reason) if change is None else (change.state,
                                                                                              change.reason)
        drawdown = self.engine.drawdown(equity)
        show_state(state, equity, drawdown)  # the gauges of /metrics (QF_RISK_METRICS_BIND)
        self.pub.publish("risk.state", RiskState(ts=now, state=state, reason=reason,
                                                 equity=equity, drawdown=drawdown))
        if self.reporter is not None:
            self.reporter.counters["states_out"] += 1

    def _flush(self, now: int) -> None:
        try:
            self.outbox.flush(self.engine, now)
        except Exception:
            FAILURES.inc()
            log.exception("risk_rows_not_written", extra={"rows": len(self.outbox)})
            lost = len(self.outbox) - OUTBOX_MAX
            if lost > 0:
                del self.outbox.events[:lost]
                self.stats["events_lost"] += lost

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); closes sockets and the database on the way out."""
        poller = zmq.Poller()
        for sock in (self.server.sock, self.md.sock, self.broker_events.sock, self.broker.sock):
            poller.register(sock, zmq.POLLIN)

        def reopened(old: zmq.Socket, new: zmq.Socket) -> None:
            poller.unregister(old)
            poller.register(new, zmq.POLLIN)
        self.broker.on_reopen = reopened
        quiet_gc()  # shared/runtime.py: the cycle collector off the per-message path
        spin_ns, spin_until = self.cfg.risk.spin_us * 1000, 0
        reporter = self.reporter
        try:
            if self.cfg.risk.metrics_bind:  # MetricsBindError (a FatalError) when it cannot be bound
                self.metrics = serve_metrics(self.cfg.risk.metrics_bind, "QF_RISK_METRICS_BIND", METRICS,
                                             self.liveness.path)
                log.info("metrics listening", extra={"bind": self.cfg.risk.metrics_bind, "port": self.metrics.port})
            while not self._stop.is_set():
                busy = time.perf_counter_ns() < spin_until
                ready = dict(poller.poll(0 if busy else self.broker.wait_ms(POLL_MS)))
                if busy and not ready:
                    # Spinning keeps this core awake and its caches warm (a check after 2 ms
                    # asleep costs 2-3x one on a warm core), but gives the core to any other
                    # runnable thread first: on 2 cores the broker and the strategy need it.
                    os.sched_yield()
                if ready:
                    if self.broker.sock in ready:
                        self._guard(self.broker.receive)
                    for sub in (self.md, self.broker_events):
                        if sub.sock in ready:
                            self._drain(sub)
                    self._evaluate()  # once per batch of marks and fills, before the next order
                    if self.server.sock in ready:
                        self._serve()
                    spin_until = time.perf_counter_ns() + spin_ns
                if self.broker.pending:
                    self._guard(self.broker.expire)
                while self._later:
                    self._guard(self._later.pop(0))
                self._evaluate()
                if self.engine.calendar is not None:
                    self._guard(self._pause_turn)
                if self.engine.has_changes:
                    self._settle(self.clock())
                if self.outbox.events and (len(self.outbox) >= FLUSH_ROWS
                                           or self.clock() - self.outbox.oldest_ns >= FLUSH_NS):
                    self._flush(self.clock())
                if self.ticker.due():
                    self._guard(self._beat)  # a beat that fails must not take risk down with it
                if reporter is not None:  # lock-step: what this turn counted, to the conductor
                    self._guard(reporter.report)
        finally:
            self.close()
            log.info("stopped", extra={**self.stats, **self.check_us.stats("check"), **self.serve_us.stats("serve"),
                                       **self.desk.broker_us.stats("broker")})

    def later(self, fn: Callable[[], object]) -> None:
        """Run `fn` at the end of this loop turn, after what is being handled now."""
        self._later.append(fn)

    def _evaluate(self) -> None:
        """Let the engine judge the marks and fills of this batch (after each one, off the reply path)."""
        if self.engine.needs_evaluation:  # the usual turn: nothing moved, no clock read, no closure made
            self._guard(lambda: self.engine.evaluate_due(self.clock()))

    def _pause_turn(self) -> None:
        """The Shabbat and Yom Tov pauses (RiskEngine.on_clock): the state changes at the window's
        and the pause's minute, whatever else happens, and a flatten runs while one is due (the
        flatten window, or a pause that began with a position or an order left), one at a time,
        again every FLATTEN_RETRY_NS while it leaves something."""
        now = self.clock()
        engine = self.engine
        engine.on_clock(now)
        if engine.has_changes:
            self._settle(now)
        if self._flattening is None and now >= self._flatten_retry_ns and engine.flatten_due:
            self._pause_flatten(now)

    def _pause_flatten(self, now: int) -> None:
        engine, pause = self.engine, self.engine.pause
        self.stats["pause_flattens"] = self.stats.get("pause_flattens", 0) + 1
        log.warning("pause_flatten", extra={"pause": pause.name, "start": pause.start.isoformat(),
                                            "positions": engine.position_map(), "working": len(engine.working)})

        def done(results: list[dict]) -> None:
            self._flattening = None
            self._flatten_retry_ns = self.clock() + FLATTEN_RETRY_NS
            left = engine.held_positions()
            refused = [r for r in results if r.get("action") == "CLOSE"
                       and (r.get("verdict") != "APPROVED" or r.get("status") != "FILLED")]
            if left or refused or engine.working:
                PAUSE_FLATTEN_FAILURES.inc()
                self.stats["pause_flatten_failures"] = self.stats.get("pause_flatten_failures", 0) + 1
                text = (f"risk: the flatten before {pause.name} ({pause.start:%a %H:%M %Z}) left positions "
                        f"{left or 'none'} and {len(engine.working)} working orders; trading stays paused; "
                        f"closing again in {FLATTEN_RETRY_NS // 1_000_000_000} s")
                log.error("pause_flatten_failed", extra={"pause": pause.name, "positions": left,
                                                         "working": len(engine.working), "results": results})
                self.alerts.raise_(PAUSE_FLATTEN_FAILED, text)
            else:
                log.warning("pause_flattened", extra={"pause": pause.name, "results": results})
                self.alerts.resolve(PAUSE_FLATTEN_FAILED, f"risk: flat for {pause.name}")
        self._flattening = FlattenJob(engine, self.desk.submit_order, self.desk.submit_cancel, self.later, now, done,
                                      id_prefix=f"{PAUSE_PREFIX}{now:x}")
        self._flattening.start()

    def _guard(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # a bug on one message must not stop risk
            FAILURES.inc()
            log.exception("loop_step_failed")

    def _messages(self, sub: Subscriber, check_readable: bool = True):
        """Up to DRAIN_MAX decoded messages waiting on `sub`; a frame that is not a message is
        counted and logged (quietly) and skipped. `check_readable`: after the first, look at the
        socket's flag before each receive (cheaper than a failing recv when it is empty)."""
        for i in range(DRAIN_MAX):
            if check_readable and i == 1 and not readable(sub.sock):
                return
            try:
                _topic, msg = sub.recv(NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self._bad_event(exc)
                continue
            yield msg

    def _drain(self, sub: Subscriber) -> None:
        for msg in self._messages(sub):
            try:
                self.on_event(msg, self.clock())
            except Exception:
                FAILURES.inc()
                log.exception("event_failed")

    def _bad_event(self, exc: DecodeError) -> None:
        self.stats["decode_errors"] += 1
        BAD_FRAMES.labels("sub").inc()
        self.quiet.log_event(logging.WARNING, "bad_event", exc.reason, {"code": exc.reason, "detail": exc.detail[:200]})

    # -- lock-step replay (bound in place of `handle` and `_drain` when QF_LOCKSTEP is set) ------

    def _handle_lockstep(self, envelope: list[bytes], payload: bytes, received_ns: int) -> bytes | None:
        """`handle` in a lock-step run: an order counts as `orders_in` (its reply as `answers_out`,
        CountingServer). Before an order or cancel, risk marks the market data already waiting
        (the rest of the record the strategy decided on: the backtest marks a record's books
        before the strategy sees one), and one stamped after risk's clock waits until risk has
        read the market data up to its stamp (`_catch_up`: the strategy decided on a book risk
        must have marked first). Risk reads nothing else meanwhile, so requests keep their order."""
        try:
            req = messages.decode(payload, messages.REQUESTS)
        except DecodeError:
            req = None  # `handle` answers it with its error
        kind = type(req)
        if kind is OrderRequest:
            self.reporter.counters["orders_in"] += 1
            self.server.expect(envelope)
        elif kind is Cancel:  # the OFI strategy's (its reply counts as cancel_answers_out)
            self.reporter.counters["cancels_in"] += 1
            self.server.expect(envelope, "cancel_answers_out")
        if kind is OrderRequest or kind is Cancel:
            if readable(self.md.sock):  # the rest of the record the strategy decided on: marked first
                self._drain_lockstep(self.md)
                self._evaluate()
            self._catch_up(req.ts)
            received_ns = time.perf_counter_ns()  # the wait is the replay's, not risk's work
        return RiskService.handle(self, envelope, payload, received_ns)

    def _hello(self) -> None:
        """The conductor's handshake tick came: say hello once every link risk has in the replay is
        up — the md SUB (this tick), the SUB to the broker's PUB (the broker passes each tick on:
        ZeroMQ drops what a PUB sends before a SUB is connected, and a fill event lost would stall
        the replay), and the DEALER to the broker (a probe cancel answered: an order sent before
        the connection is up would be denied BROKER_UNAVAILABLE, which the backtest never is).
        Each tick is passed on on risk's PUB too: the OFI strategy's SUB to it learns so that it
        hears risk.state."""
        self.pub.publish("clock", Clock(ts=0))
        links = self._links
        if self.reporter.hello:
            return
        if links["broker_pub"] and links["probe"] == "answered":
            self.reporter.on_clock(0)
            return
        if links["probe"] == "":
            def answered(raw: bytes | None) -> None:
                links["probe"] = "answered" if raw is not None else ""
            if self.broker.send(messages.encode(Cancel(ts=0, client_order_id=LOCKSTEP_PROBE)), answered):
                links["probe"] = "sent"

    def _drain_lockstep(self, sub: Subscriber) -> None:
        """`_drain` in a lock-step run. Market data: a book's, trade's or tick's `ts` moves the
        clock before the book is marked (a trade only moves it: a maker fill is stamped with its
        trade's time); books, trades and ticks (not the handshake, ts 0) count as `md`.
        Broker events: counted as `events_in`, and one stamped after the clock waits for the
        market data up to it (`_catch_up`). An unreadable frame counts as nothing: the
        conductor then names the channel that disagrees."""
        counters, clock, reporter = self.reporter.counters, self.clock, self.reporter
        md = sub is self.md
        for msg in self._messages(sub, check_readable=False):
            kind = type(msg)
            if md:
                if kind is Clock:
                    clock.observe(msg.ts)
                    if msg.ts:
                        reporter.on_clock(msg.ts)
                    else:
                        self._hello()
                    continue
                if kind is Book:
                    clock.observe(msg.ts)
                    counters["md"] += 1
                elif kind is Trade:
                    clock.observe(msg.ts)
                    counters["md"] += 1
                    continue
            elif kind is Fill or kind is OrderEvent:
                counters["events_in"] += 1
                self._catch_up(msg.ts)
            elif kind is Clock:  # the broker passing the handshake on: this SUB hears its PUB
                self._links["broker_pub"] = True
                continue
            try:
                self.on_event(msg, clock())
            except Exception:
                FAILURES.inc()
                log.exception("event_failed")

    def _catch_up(self, ts: int) -> None:
        """The lock-step ordering rule: before risk handles something stamped `ts` (a request,
        the broker's reply or event) while its clock is behind `ts`, it blocks on the
        market-data SUB (POLL_MS at a time; stop() and heartbeats still heard), reading, until
        the conductor's release that `ts` came from reaches it; then the engine judges the new
        marks. Past QUIET_TIMEOUT_S it goes on, logged (the conductor has given up by then)."""
        clock, md = self.clock, self.md
        if clock.now >= ts:
            return
        deadline = time.monotonic() + QUIET_TIMEOUT_S
        while clock.now < ts and not self._stop.is_set():
            if time.monotonic() > deadline:
                log.warning("lockstep_behind", extra={"ts": ts, "clock": clock.now})
                break
            if md.sock.poll(POLL_MS):
                self._drain_lockstep(md)
            if self.ticker.due():
                self._guard(self._beat)
        self._evaluate()

    def _serve(self) -> None:
        for i in range(DRAIN_MAX):
            if i == 1 and not readable(self.server.sock):
                return
            try:
                envelope, payload = self.server.recv(NOBLOCK)
            except zmq.Again:
                return
            started = time.perf_counter_ns()
            if payload is None:  # not a REQ envelope: no reply can reach it
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("envelope").inc()
                continue
            try:
                reply = self.handle(envelope, payload, started)
            except Exception:
                # A bug or a storage failure must not stop risk; the client still gets an answer.
                FAILURES.inc()
                log.exception("request_failed")
                reply = messages.encode(Error(ts=self.clock(), code="internal", text="risk failure"))
            if reply is not None:  # unreadable, or risk failed: timed from the frame's arrival
                self._reply(envelope, reply, started, started, 0, started)

    def _beat(self) -> None:
        now = self.clock()
        self.engine.expire(now)
        self.desk.tick(now)
        self._flush(now)  # the peak a risk.state implies is stored before it is published
        if self.reporter is None:  # lock-step: only changes (a beat's would come at a wall-clock moment)
            self._publish_state(now)
        stats = {**self.stats, "state": self.engine.state.value, "pause": self.engine.pause_view(),
                 "equity": str(self.engine.equity()),
                 "md_missed": self.md.missed, "broker_missed": self.broker_events.missed,
                 "inflight": len(self.desk.inflight), **self.broker.stats,
                 **self.check_us.stats("check"), **self.serve_us.stats("serve"),
                 **self.desk.broker_us.stats("broker")}
        if self.curve is not None:  # handshakes refused by its sockets' key lists (shared/curve.py)
            stats["curve_refused"] = curve.refused_total()
        self.pub.publish("heartbeat.risk", self.heartbeat.make("ok", stats))
        self.liveness.touch()

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Answer what is in flight (BROKER_UNAVAILABLE), write what waits to be written, close
        sockets and this thread's database connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.metrics is not None:
            self.metrics.close()
        self._guard(self.broker.close)
        self._flush(self.clock())
        for sock in (self.server, self.md, self.broker_events, self.pub):
            sock.close()
        if self.reporter is not None:
            self.reporter.close()
        database.close()
