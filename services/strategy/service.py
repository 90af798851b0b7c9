"""Strategy shell: SUB books, run the core, send orders to risk over Lazy Pirate REQ (in a lock-step
replay: one plain REQ per symbol, reading books while orders wait)."""
from __future__ import annotations

import logging
import threading
import time

import zmq

from services.strategy import telemetry
from services.strategy.core import ImbalanceStrategy, OrderIntent, Outcome
from shared import curve, messages
from shared.bus import LazyPirateClient, NoReply, Publisher, Subscriber, connect
from shared.config import Config
from shared.enums import ControlAction, Verdict
from shared.errors import DecodeError
from shared.lockstep import Reporter
from shared.messages import Book, Clock, Control, ControlReply, Decision, OrderRequest
from shared.metrics_http import MetricsServer
from shared.money import to_decimal
from shared.runtime import HeartbeatMaker, Liveness, Ticker, identity, quiet_gc

log = logging.getLogger("qf.strategy")

SERVICE = "strategy"
# rejections after which the imbalance strategy takes risk's positions again (`_resync`)
RESYNC_CODES = frozenset({"NO_REPLY", "INSUFFICIENT_BALANCE", "BROKER_UNAVAILABLE", "BROKER_ERROR"})
RESYNC_MIN_S = 1.0
POLL_MS = 100  # the longest the loop waits before it looks at the stop flag and liveness again
DRAIN_MAX = 10_000  # books read per batch, so a flood cannot starve liveness or the stop flag


def reject(cid: str, code: str, text: str) -> Decision:
    """A local REJECTED decision: what the strategy assumes when risk cannot answer."""
    return Decision(ts=time.time_ns(), client_order_id=cid, verdict=Verdict.REJECTED,
                    reason={"code": code, "text": text})


class StrategyService:
    """Runs `ImbalanceStrategy` live. `run()` blocks until `stop()` is called.

    REQ is synchronous: while an order waits for risk no book is read, and
    afterwards only the newest queued book of each symbol is acted on.

    Lock-step replay (QF_LOCKSTEP, shared/lockstep.py; `_run_lockstep`): the core gets every
    book, in order, at the book's own `ts` (the capture's time), as `qf backtest` feeds it,
    also while orders wait for risk (one REQ per symbol, so an order of one symbol never holds
    back another's, as in the backtest); orders are named as the backtest names them; the
    counters go to the conductor after every loop turn and every order sent."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.curve = curve.load(cfg, "strategy")  # KeyFileError (one line, exit 2) before anything runs
        self.start_ns = time.time_ns()
        # start time in the prefix keeps client_order_id unique across restarts; a lock-step
        # replay names its orders as `qf backtest` of the capture does (services/backtest/engine.py)
        prefix = (f"{cfg.strategy.name}-r{cfg.broker.seed}" if cfg.bus.lockstep
                  else f"{cfg.strategy.name}-{self.start_ns:x}")
        self.core = ImbalanceStrategy(cfg.strategy, cfg.md.symbols, id_prefix=prefix)
        self._stop = threading.Event()
        self.stats = {"books": 0, "stale_books": 0, "other_symbols": 0, "decode_errors": 0, "orders": 0,
                      "approved": 0, "rejected": 0, "no_reply": 0, "errors": 0, "resyncs": 0,
                      "resync_failures": 0}
        self._resynced = -RESYNC_MIN_S  # monotonic time of the last resync
        # newest unprocessed book per symbol the core trades; refilled before each book is handled,
        # so a book that went stale while an order waited for risk is overwritten. Books of other
        # symbols never enter it: a flood of made-up symbols cannot grow it.
        self.pending: dict[str, Book] = {}
        self.reporter: Reporter | None = None  # lock-step only: the counters the conductor reads
        self.metrics: MetricsServer | None = None  # /metrics on QF_STRATEGY_METRICS_BIND while run() runs

    def stop(self) -> None:
        """Ask `run()` to return; safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> None:
        """Subscribe to `book.*`, trade until stopped, then close every socket; /metrics beside the
        loop while it runs when QF_STRATEGY_METRICS_BIND is set (MetricsBindError when it cannot be bound)."""
        keys = [s.upper() for s in self.cfg.md.symbols]
        core = self.core
        collector = telemetry.StrategyCollector(
            self.stats, positions=lambda: {k: core.position(k) for k in keys})
        telemetry.serve_while(self, collector, self._run_lockstep if self.cfg.bus.lockstep else self._run_live)

    def _run_live(self) -> None:
        cfg = self.cfg
        sub = Subscriber(cfg.bus.md_pub, ["book."], cfg.bus.hwm, ctx=self.ctx, curve=self.curve)
        client = LazyPirateClient(cfg.bus.risk_rep, cfg.strategy.timeout_ms, cfg.strategy.retries, ctx=self.ctx,
                                  curve=self.curve)
        beat = HeartbeatMaker(identity(SERVICE, cfg.common.instance))
        liveness = Liveness(cfg.common.run_dir, beat.service)
        ticker = Ticker(cfg.bus.heartbeat_ms)
        # heartbeat.strategy on QF_STRATEGY_PUB, as the OFI strategy's: /health and the status
        # line hear every service, whichever strategy runs
        pub = Publisher(cfg.bus.strategy_pub, cfg.bus.hwm, self.ctx, self.curve)
        poller = zmq.Poller()
        poller.register(sub.sock, zmq.POLLIN)
        log.info("started", extra={"md_pub": cfg.bus.md_pub, "risk_rep": cfg.bus.risk_rep,
                                   "strategy_pub": cfg.bus.strategy_pub, "symbols": ",".join(cfg.md.symbols),
                                   "prefix": self.core.id_prefix})
        pending = self.pending
        quiet_gc()  # shared/runtime.py: the cycle collector off the per-book path
        try:
            while not self._stop.is_set():
                if ticker.due():
                    liveness.touch()
                    pub.publish(beat.topic, beat.make("ok", {k: self.stats[k] for k in (
                        "books", "orders", "approved", "rejected", "no_reply", "errors")}))
                if not pending and not poller.poll(POLL_MS):
                    continue
                self._drain(sub, pending)
                if pending:
                    symbol = next(iter(pending))
                    self._on_book(pending.pop(symbol), client, liveness, ticker)
        finally:
            client.close()
            sub.close()
            pub.close()
            liveness.remove()
            log.info("stopped", extra=dict(self.stats, missed=sub.missed, refused_books=self.core.refused_books))

    def _drain(self, sub: Subscriber, pending: dict[str, Book]) -> None:
        """Read every waiting book into `pending`, keeping only the newest per symbol."""
        for _ in range(DRAIN_MAX):
            try:
                _, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                log.warning("bad_frame", extra={"reason": exc.reason, "detail": exc.detail})
                continue
            if not isinstance(msg, Book):
                continue
            if not self.core.trades(msg.symbol):
                self.stats["other_symbols"] += 1
                continue
            self.stats["books"] += 1
            if msg.symbol in pending:
                self.stats["stale_books"] += 1
            pending[msg.symbol] = msg

    def _on_book(self, book: Book, client: LazyPirateClient, liveness: Liveness, ticker: Ticker) -> None:
        intent = None
        try:
            intent = self.core.on_book(book, time.time_ns())
            if intent is not None:
                self._execute(intent, client, liveness, ticker)
        except Exception:  # a bug in one event must not stop the service
            self.stats["errors"] += 1
            log.exception("book_failed", extra={"symbol": book.symbol, "update_id": book.update_id})
            if intent is not None and self.core.in_flight(intent.symbol) is intent:
                # never leave a symbol blocked behind an order whose answer will not come
                self.core.on_decision(reject(intent.client_order_id, "INTERNAL", "strategy error"))

    def _execute(self, intent: OrderIntent, client: LazyPirateClient, liveness: Liveness,
                 ticker: Ticker) -> None:
        """Send one order and apply the answer; silence after every retry counts as a rejection."""
        self.stats["orders"] += 1
        req = self._request(intent, time.time_ns())
        decision = self._ask(messages.encode(req), intent.client_order_id, client, liveness, ticker)
        self._apply(intent, req, decision, time.time_ns() - req.ts)
        code = (decision.reason or {}).get("code") if decision.verdict is Verdict.REJECTED else None
        if code in RESYNC_CODES:
            self._resync(client, code)

    def _resync(self, client: LazyPirateClient, why: str) -> None:
        """Take risk's positions as the core's after an answer that says the core's may be wrong:
        an order whose fate it never heard (NO_REPLY, a broker that did not answer risk) may have
        filled, and a SELL refused INSUFFICIENT_BALANCE sells what the account does not hold. This
        strategy does not follow the broker's fills; risk does. One STATE request, one attempt, at
        most once per RESYNC_MIN_S: an unanswered one is tried again after the next such answer."""
        now = time.monotonic()
        if now - self._resynced < RESYNC_MIN_S:
            return
        self._resynced = now
        try:
            raw = client.request(messages.encode(Control(ts=time.time_ns(), action=ControlAction.STATE,
                                                         by=SERVICE, reason=f"resync after {why}")), retries=1)
            reply = messages.decode(raw, messages.REQUESTS)
            if not isinstance(reply, ControlReply):
                raise DecodeError("unexpected_type", type(reply).__name__)
            changed = self.core.sync({s: to_decimal(q, f"positions.{s}") for s, q in (reply.positions or {}).items()})
        except (NoReply, DecodeError, ValueError) as exc:
            self.stats["resync_failures"] += 1
            log.warning("resync_failed", extra={"why": why, "error": str(exc)[:200]})
            return
        self.stats["resyncs"] += 1
        if changed:
            log.warning("position_resynced", extra={"why": why, **{f"position_{s}": q for s, q in changed.items()}})

    def _request(self, intent: OrderIntent, now_ns: int) -> OrderRequest:
        return OrderRequest(ts=now_ns, client_order_id=intent.client_order_id, strategy=self.cfg.strategy.name,
                            symbol=intent.symbol, side=intent.side, kind=intent.kind, qty=intent.qty,
                            confidence=intent.confidence, signal_ts=intent.signal_ts)

    def _apply(self, intent: OrderIntent, req: OrderRequest, decision: Decision, rtt_ns: int,
               tick_to_trade_ns: int | None = None) -> None:
        """Risk's answer (or the local rejection standing for it) to the core, then the result line."""
        try:
            outcome = self.core.on_decision(decision)
        except ValueError as exc:
            self.stats["errors"] += 1
            log.error("bad_ack", extra={"cid": intent.client_order_id, "detail": str(exc)})
            outcome = None
        self._log_result(intent, decision, outcome, req.ts - intent.signal_ts, rtt_ns, tick_to_trade_ns)

    def _ask(self, payload: bytes, cid: str, client: LazyPirateClient, liveness: Liveness,
             ticker: Ticker) -> Decision:
        """Lazy Pirate with the retry loop here rather than in the client, so the
        stop flag and liveness are looked at between attempts; the payload (and
        its client_order_id) is the same on every attempt."""
        attempts = self.cfg.strategy.retries
        for attempt in range(1, attempts + 1):
            try:
                raw = client.request(payload, retries=1)
                break
            except NoReply:
                if ticker.due():
                    liveness.touch()
                if attempt == attempts or self._stop.is_set():
                    self.stats["no_reply"] += 1
                    log.warning("risk_no_reply", extra={"cid": cid, "attempts": attempt})
                    return reject(cid, "NO_REPLY", f"risk silent after {attempt} attempt(s) "
                                                   f"of {client.timeout_ms} ms")
                log.warning("risk_retry", extra={"cid": cid, "attempt": attempt})
        return self._decision(raw, cid)

    @staticmethod
    def _decision(raw: bytes, cid: str) -> Decision:
        """Risk's reply to order `cid` as a Decision; anything else is a local rejection."""
        try:
            reply = messages.decode(raw, messages.REQUESTS)
        except DecodeError as exc:
            return reject(cid, "BAD_REPLY", f"{exc.reason}: {exc.detail}")
        if isinstance(reply, messages.Error):
            return reject(cid, reply.code, reply.text)
        if not isinstance(reply, Decision) or reply.client_order_id != cid:
            return reject(cid, "BAD_REPLY", f"unexpected {reply.TYPE} reply")
        return reply

    # -- lock-step replay ---------------------------------------------------------------------

    def _run_lockstep(self) -> None:
        """`run` in a lock-step replay. One loop over the SUB (books and `clock` ticks) and a REQ
        per symbol with an order out: each turn takes risk's answers first (applied before any
        later book, as the conductor releases nothing while one is due), then every book in
        order, each to the core at its `ts`, its order sent at once. No retry: risk answers
        when the replay lets the broker, however long that takes on the wall clock; stop()
        ends the wait."""
        cfg = self.cfg
        sub = Subscriber(cfg.bus.md_pub, ["book.", "clock"], cfg.bus.hwm, ctx=self.ctx, curve=self.curve)
        reporter = Reporter(cfg.bus.lockstep, SERVICE, self.ctx)
        self.reporter = reporter
        reqs: dict[str, zmq.Socket] = {}  # symbol -> its REQ to risk
        # REQs waiting for an answer: the order, and when it was sent (perf_counter_ns)
        asked: dict[zmq.Socket, tuple[OrderIntent, OrderRequest, int]] = {}
        poller = zmq.Poller()
        poller.register(sub.sock, zmq.POLLIN)
        try:
            liveness = Liveness(cfg.common.run_dir, identity(SERVICE, cfg.common.instance))
            ticker = Ticker(cfg.bus.heartbeat_ms)
            log.info("started", extra={"md_pub": cfg.bus.md_pub, "risk_rep": cfg.bus.risk_rep, "lockstep": True,
                                       "symbols": ",".join(cfg.md.symbols), "prefix": self.core.id_prefix})
            try:
                while not self._stop.is_set():
                    if ticker.due():
                        liveness.touch()
                    ready = dict(poller.poll(POLL_MS))
                    for sock in [s for s in asked if s in ready]:
                        self._answered_lockstep(sock, asked.pop(sock), reporter)
                    if sub.sock in ready:
                        self._drain_lockstep(sub, reqs, asked, poller, reporter)
                    self._report(reporter)
            finally:
                liveness.remove()
        finally:
            for sock in reqs.values():
                sock.close(linger=0)
            sub.close()
            reporter.close()
            log.info("stopped", extra=dict(self.stats, missed=sub.missed, refused_books=self.core.refused_books,
                                           **reporter.counters))

    def _drain_lockstep(self, sub: Subscriber, reqs: dict, asked: dict, poller: zmq.Poller,
                        reporter: Reporter) -> None:
        """Every waiting book to the core, in order (none coalesced, none skipped while orders
        wait: the backtest calls on_book for each), counted as `md` once handled; ticks count
        too (the handshake says hello)."""
        counters = reporter.counters
        for _ in range(DRAIN_MAX):
            try:
                _, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:  # counts as nothing: the conductor names the channel behind
                self.stats["decode_errors"] += 1
                log.warning("bad_frame", extra={"reason": exc.reason, "detail": exc.detail})
                continue
            kind = type(msg)
            if kind is Clock:
                reporter.on_clock(msg.ts)
            elif kind is Book:
                if self.core.trades(msg.symbol):
                    self.stats["books"] += 1
                else:
                    self.stats["other_symbols"] += 1
                self._on_book_lockstep(msg, reqs, asked, poller, reporter)
                counters["md"] += 1

    def _on_book_lockstep(self, book: Book, reqs: dict, asked: dict, poller: zmq.Poller,
                          reporter: Reporter) -> None:
        """The core decides on `book` at its `ts`; an order goes to risk at once, stamped with that
        time, on its symbol's REQ (free: the core keeps one order per symbol in flight), and the
        conductor hears of it before anything else happens here."""
        intent = None
        try:
            intent = self.core.on_book(book, book.ts)
            if intent is None:
                return
            sock = reqs.get(intent.symbol)
            if sock is None:
                sock = reqs[intent.symbol] = (self.ctx or zmq.Context.instance()).socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                connect(sock, self.cfg.bus.risk_rep, self.curve)
                poller.register(sock, zmq.POLLIN)
            if sock in asked:
                raise RuntimeError(f"{intent.symbol}: an order while {asked[sock][0].client_order_id} waits")
            req = self._request(intent, book.ts)
            sock.send(messages.encode(req))
            asked[sock] = (intent, req, time.perf_counter_ns())
            self.stats["orders"] += 1
            reporter.counters["orders_sent"] += 1
            self._report(reporter)
        except Exception:  # a bug in one event must not stop the service
            self.stats["errors"] += 1
            log.exception("book_failed", extra={"symbol": book.symbol, "update_id": book.update_id})
            if intent is not None and self.core.in_flight(intent.symbol) is intent \
                    and not any(a[0] is intent for a in asked.values()):
                self.core.on_decision(reject(intent.client_order_id, "INTERNAL", "strategy error"))

    def _answered_lockstep(self, sock: zmq.Socket, asked: tuple[OrderIntent, OrderRequest, int],
                           reporter: Reporter) -> None:
        intent, req, sent_ns = asked
        raw = sock.recv()
        reporter.counters["answers_in"] += 1
        try:
            # times on the capture's clock stand still while risk works: the round trip is wall time
            rtt_ns = time.perf_counter_ns() - sent_ns
            self._apply(intent, req, self._decision(raw, intent.client_order_id), rtt_ns,
                        req.ts - intent.signal_ts + rtt_ns)
        except Exception:
            self.stats["errors"] += 1
            log.exception("answer_failed", extra={"cid": intent.client_order_id})
            if self.core.in_flight(intent.symbol) is intent:  # never leave the symbol blocked
                self.core.on_decision(reject(intent.client_order_id, "INTERNAL", "strategy error"))

    @staticmethod
    def _report(reporter: Reporter) -> None:
        """Push the counters if they changed; a failed push is logged, never fatal."""
        try:
            reporter.report()
        except zmq.ZMQError as exc:
            log.warning("lockstep_report_failed", extra={"error": str(exc)})

    def _log_result(self, intent: OrderIntent, decision: Decision, outcome: Outcome | None,
                    signal_ns: int, rtt_ns: int, tick_to_trade_ns: int | None = None) -> None:
        approved = decision.verdict is not Verdict.REJECTED
        self.stats["approved" if approved else "rejected"] += 1
        ack = decision.order
        # risk's reason when it refused; the broker's when it took the order but did not fill it
        reason = (decision.reason or {}).get("code") or (ack.reason if ack else "")
        extra = {"cid": intent.client_order_id, "symbol": intent.symbol, "side": intent.side.value,
                 "qty": intent.qty, "verdict": decision.verdict.value, "reason": reason,
                 "status": ack.status.value if ack else "",
                 "filled_qty": outcome.filled_qty if outcome else 0,
                 "avg_price": outcome.avg_price if outcome and outcome.avg_price is not None else "",
                 "position": self.core.position(intent.symbol),
                 # where the time went: book receipt → order sent, then the round trip to risk
                 "signal_us": signal_ns // 1000, "risk_rtt_us": rtt_ns // 1000,
                 # the benchmark parses this key: keep its name and unit
                 "tick_to_trade_us": (time.time_ns() - intent.signal_ts if tick_to_trade_ns is None
                                      else tick_to_trade_ns) // 1000}
        log.info("order_result", extra=extra)
