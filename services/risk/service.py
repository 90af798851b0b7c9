"""Risk service shell: ROUTER for orders and control, Lazy Pirate to the broker, SUB books and fills, PUB risk.state."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from decimal import Decimal
from typing import Callable

import zmq
from prometheus_client import Counter, Histogram

from services.risk.core import Denial, Reason, RiskEngine
from shared import messages
from shared.bus import LazyPirateClient, NoReply, Publisher, Server, Subscriber
from shared.config import Config
from shared.db import EquitySnapshot, FillRow, OrderRow, RiskEvent, database, init_db
from shared.enums import OPEN_STATUSES, TERMINAL_STATUSES, OrderStatus, Side, TradingState, Verdict
from shared.errors import DecodeError
from shared.messages import (Ack, Book, Cancel, Control, ControlReply, Decision, Error, Fill, OrderEvent,
                             OrderRequest, RiskState)
from shared.runtime import HeartbeatMaker, Liveness, Ticker

log = logging.getLogger("qf.risk")

DECISIONS = Counter("qf_risk_decisions_total", "Order decisions, by verdict and reason code", ["verdict", "code"])
BAD_FRAMES = Counter("qf_risk_decode_errors_total", "Frames that were not valid messages", ["source"])
FAILURES = Counter("qf_risk_failures_total", "Messages whose handling failed inside risk")
DECIDE_SECONDS = Histogram("qf_risk_decision_seconds", "Time to decide one order, broker round trip included",
                           buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0))

POLL_MS = 100  # loop turn; bounds how long stop() takes
DRAIN_MAX = 1000  # messages per socket per turn, so a book burst cannot starve orders
DECISION_CACHE_MAX = 4096  # answers kept so a retried client_order_id gets the same one


class RiskService:
    """Risk in front of the broker. `RiskService(cfg)` rebuilds positions, working
    orders, trading state and peak equity from the database and binds its sockets;
    `run()` blocks until `stop()`; then sockets and the database are closed."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        self.clock = clock
        self.start_cash = cfg.broker.start_cash
        self.engine = RiskEngine.from_config(cfg)
        self.decisions: OrderedDict[str, Decision] = OrderedDict()
        self.stats = {"approved": 0, "rejected": 0, "broker_rejected": 0, "decode_errors": 0}
        self._events: list[dict] = []  # denials to store after the reply is sent
        self._stop = threading.Event()
        self._closed = False
        # Subscribe before reading the database: fills committed meanwhile wait
        # in the queue instead of being lost, and on_fill drops the overlap.
        self.md = Subscriber(cfg.bus.md_pub, ["book."], cfg.bus.hwm, ctx)
        self.broker_events = Subscriber(cfg.bus.broker_pub, ["fill.", "order."], cfg.bus.hwm, ctx)
        init_db(cfg.common.db)
        self._rebuild()
        database.close()  # run() may be on another thread; it opens its own connection
        self.server = Server(cfg.bus.risk_rep, ctx)
        self.broker = LazyPirateClient(cfg.bus.broker_rep, cfg.risk.broker_timeout_ms, retries=1, ctx=ctx)
        self.pub = Publisher(cfg.bus.risk_pub, cfg.bus.hwm, ctx)
        self.liveness = Liveness(cfg.common.run_dir, "risk")
        self.heartbeat = HeartbeatMaker("risk")
        self.ticker = Ticker(cfg.bus.heartbeat_ms)

    def _rebuild(self) -> None:
        fills = 0
        for row in FillRow.select().order_by(FillRow.ts, FillRow.fill_id):
            fills += self.engine.on_fill({"fill_id": row.fill_id, "client_order_id": row.client_order_id,
                                          "symbol": row.symbol, "side": row.side, "price": row.price,
                                          "qty": row.qty, "fee": row.fee})
        open_values = [s.value for s in OPEN_STATUSES]
        for row in OrderRow.select().where(OrderRow.status.in_(open_values)):
            self.engine.track(row.client_order_id, row.symbol, Side(row.side), row.qty - row.filled_qty)
        last = (RiskEvent.select().where(RiskEvent.kind == "STATE")
                .order_by(RiskEvent.ts.desc(), RiskEvent.id.desc()).first())
        if last is not None:
            # A halt survives a restart: coming back ACTIVE by default would fail open.
            self.engine.state, self.engine.state_reason = TradingState(last.state), last.text
        for (equity,) in EquitySnapshot.select(EquitySnapshot.equity).tuples().iterator():
            self.engine.observe_equity(Decimal(equity))
        log.info("rebuilt", extra={"fills": fills, "working": len(self.engine.working),
                                   "state": self.engine.state.value, "positions": self.engine.position_map()})

    # -- requests -----------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes:
        """One request payload -> reply payload: Decision for an order, the broker's
        reply for a cancel, ControlReply for control, Error for anything unreadable."""
        now = self.clock()
        try:
            req = messages.decode(payload, messages.REQUESTS)
        except DecodeError as exc:
            self.stats["decode_errors"] += 1
            BAD_FRAMES.labels("request").inc()
            log.warning("bad_request", extra={"code": exc.reason, "detail": exc.detail})
            return messages.encode(Error(ts=now, code=exc.reason, text=exc.detail))
        if isinstance(req, OrderRequest):
            return messages.encode(self.decide(req, now))
        if isinstance(req, Cancel):
            return self.cancel(req, payload, now)
        if isinstance(req, Control):
            return messages.encode(self.control(req, now))
        self.stats["decode_errors"] += 1
        BAD_FRAMES.labels("request").inc()
        return messages.encode(Error(ts=now, code="unexpected_type", text=req.TYPE))

    def decide(self, req: OrderRequest, now: int) -> Decision:
        """Check `req`; forward it to the broker when it passes. A retried
        client_order_id gets the answer it got before."""
        cached = self.decisions.get(req.client_order_id)
        if cached is not None:
            return cached
        denial = self.engine.check(req, now)
        if denial is not None and not self._broker_has(req.client_order_id):
            return self._deny(req, denial, now, remember=True)
        return self._forward(req, now)

    def _broker_has(self, client_order_id: str) -> bool:
        # Only on the denial path: a retry of an order the broker already took
        # (e.g. across a risk restart) must get the broker's answer, not a new denial.
        try:
            return OrderRow.get_or_none(OrderRow.client_order_id == client_order_id) is not None
        except Exception:
            log.exception("db_lookup_failed")
            return False

    def _forward(self, req: OrderRequest, now: int) -> Decision:
        try:
            raw = self.broker.request(messages.encode(req))
        except NoReply as exc:
            # Not remembered: the broker may have taken the order, and a retry will ask it again.
            return self._deny(req, Denial(Reason.BROKER_UNAVAILABLE, str(exc)), now, remember=False)
        try:
            reply = messages.decode(raw, messages.REQUESTS)
        except DecodeError as exc:
            return self._deny(req, Denial(Reason.BROKER_ERROR, str(exc)), now, remember=False)
        if not isinstance(reply, Ack):
            text = f"{reply.code}: {reply.text}" if isinstance(reply, Error) else reply.TYPE
            return self._deny(req, Denial(Reason.BROKER_ERROR, text), now, remember=False)
        self._apply_fills(reply.fills)
        if reply.status in OPEN_STATUSES:
            self.engine.track(req.client_order_id, req.symbol, req.side, req.qty - reply.filled_qty)
        # Risk's verdict is APPROVED once the broker answered (docs/CONTRACTS-DRAFT.md);
        # the broker's own outcome, a REJECTED status with its reason included, is in `order`.
        decision = Decision(ts=now, client_order_id=req.client_order_id, verdict=Verdict.APPROVED,
                            qty=req.qty, order=reply.as_dict())
        self.stats["approved"] += 1
        code = ""
        if reply.status is OrderStatus.REJECTED:
            code = reply.reason or "BROKER_REJECTED"
            self.stats["broker_rejected"] += 1
            log.info("broker_rejected", extra={"client_order_id": req.client_order_id, "code": code})
        DECISIONS.labels(decision.verdict.value, code).inc()
        self._remember(decision)
        return decision

    def _deny(self, req: OrderRequest, denial: Denial, now: int, remember: bool) -> Decision:
        decision = Decision(ts=now, client_order_id=req.client_order_id, verdict=Verdict.REJECTED,
                            reason=denial.as_reason())
        self.stats["rejected"] += 1
        DECISIONS.labels(Verdict.REJECTED.value, denial.code).inc()
        self._events.append(dict(ts=now, kind="DENIED", code=denial.code, text=denial.text[:500],
                                 client_order_id=req.client_order_id, symbol=req.symbol,
                                 state=self.engine.state.value))
        log.info("denied", extra={"client_order_id": req.client_order_id, "code": denial.code})
        if remember:
            self._remember(decision)
        return decision

    def _remember(self, decision: Decision) -> None:
        self.decisions[decision.client_order_id] = decision
        if len(self.decisions) > DECISION_CACHE_MAX:
            self.decisions.popitem(last=False)

    def _apply_fills(self, fills) -> None:
        for fill in fills:
            try:
                self.engine.on_fill(fill)
            except ValueError as exc:
                BAD_FRAMES.labels("fill").inc()
                log.warning("bad_fill", extra={"detail": str(exc)})

    def cancel(self, req: Cancel, payload: bytes, now: int) -> bytes:
        """Pass a cancel to the broker (always allowed, even HALTED); returns its reply bytes."""
        try:
            raw = self.broker.request(payload)
        except NoReply as exc:
            return messages.encode(Error(ts=now, code=Reason.BROKER_UNAVAILABLE, text=str(exc)))
        try:
            reply = messages.decode(raw, messages.REQUESTS)
        except DecodeError:
            return raw
        if isinstance(reply, Ack):
            self._apply_fills(reply.fills)
            if reply.status in TERMINAL_STATUSES:
                self.engine.untrack(req.client_order_id)
        return raw

    def control(self, req: Control, now: int) -> ControlReply:
        """HALT/RESUME/FLATTEN/STATE. A state change is committed before the reply, then published."""
        if self.engine.control(req.action, req.reason):
            RiskEvent.create(ts=now, kind="STATE", code=req.action.value, text=req.reason[:500],
                             state=self.engine.state.value)
            log.warning("trading_state", extra={"state": self.engine.state.value, "by": req.by,
                                                "reason": req.reason})
            self._publish_state(now)
        return ControlReply(ts=now, state=self.engine.state, reason=self.engine.state_reason,
                            positions=self.engine.position_map(), equity=self.engine.equity(self.start_cash))

    # -- events -----------------------------------------------------------------------------

    def on_event(self, msg: messages.Message, now: int) -> None:
        """A book, a fill or an order event from the bus."""
        if isinstance(msg, Book):
            self.engine.on_book(msg.symbol, msg.mid, now)
        elif isinstance(msg, Fill):
            self._apply_fills([msg.to_wire()])
        elif isinstance(msg, OrderEvent) and msg.status in TERMINAL_STATUSES:
            self.engine.untrack(msg.client_order_id)

    def _publish_state(self, now: int) -> None:
        equity = self.engine.equity(self.start_cash)
        drawdown = self.engine.observe_equity(equity)
        self.pub.publish("risk.state", RiskState(ts=now, state=self.engine.state,
                                                 reason=self.engine.state_reason, equity=equity,
                                                 drawdown=drawdown))

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); closes sockets and the database on the way out."""
        poller = zmq.Poller()
        for sock in (self.server.sock, self.md.sock, self.broker_events.sock):
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(POLL_MS))
                for sub in (self.md, self.broker_events):
                    if sub.sock in ready:
                        self._drain(sub)
                if self.server.sock in ready:
                    self._serve()
                if self._events:
                    self._flush()
                if self.ticker.due():
                    self._beat()
        finally:
            self.close()
            log.info("stopped", extra=dict(self.stats))

    def _drain(self, sub: Subscriber) -> None:
        for _ in range(DRAIN_MAX):
            try:
                _topic, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("sub").inc()
                log.warning("bad_event", extra={"code": exc.reason, "detail": exc.detail})
                continue
            try:
                self.on_event(msg, self.clock())
            except Exception:
                FAILURES.inc()
                log.exception("event_failed")

    def _serve(self) -> None:
        for _ in range(DRAIN_MAX):
            try:
                envelope, payload = self.server.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if payload is None:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("envelope").inc()
                continue
            started = time.perf_counter()
            try:
                reply = self.handle(payload)
            except Exception:
                # A bug or a storage failure must not stop risk; the client still gets an answer.
                FAILURES.inc()
                log.exception("request_failed")
                reply = messages.encode(Error(ts=self.clock(), code="internal", text="risk failure"))
            self.server.reply(envelope, reply)
            DECIDE_SECONDS.observe(time.perf_counter() - started)

    def _flush(self) -> None:
        rows, self._events = self._events, []
        try:
            with database.atomic():
                RiskEvent.insert_many(rows).execute()
        except Exception:
            FAILURES.inc()
            log.exception("risk_events_lost", extra={"rows": len(rows)})

    def _beat(self) -> None:
        now = self.clock()
        self._publish_state(now)
        stats = {**self.stats, "state": self.engine.state.value,
                 "equity": str(self.engine.equity(self.start_cash))}
        self.pub.publish("heartbeat.risk", self.heartbeat.make("ok", stats))
        self.liveness.touch()

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Close sockets and this thread's database connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._events:
            self._flush()
        for sock in (self.server, self.md, self.broker_events, self.pub, self.broker):
            sock.close()
        database.close()
