"""The OFI strategy's live shell (QF_STRATEGY_KIND=ofi): sockets around `OfiStrategy`.

What it reads, in this order each loop turn (the answers first, so the core's view of its own
orders is as fresh as it can be before it decides on market data):

- risk's answers on a DEALER (`AsyncClient`: many requests in flight, none blocking the loop):
  decisions to orders, acks/errors to cancels, the control reply to a STATE request;
- the broker's `fill.*` and `order.*` (its PUB): the strategy's position and working orders
  follow these, so a lost answer or a restart cannot leave them wrong;
- risk's `risk.state`: REDUCING/HALTED stop entries;
- marketdata's `book.*` and `trade.*`: every one goes to the features, in order (OFI sums every
  book's change: none may be skipped); the core decides on each book, and what it returns is
  sent at once.

Risk silent: a request that got no answer after every retry makes risk unreachable for the core
(no orders at all) and the shell asks for STATE every heartbeat until risk answers; then the
core takes risk's positions (`sync`) and trades again. The same STATE request at start: nothing
is sent before risk has said what the strategy holds.

It publishes `signal.{SYMBOL}` (the core's signals: side changes and every order's reason) and
`heartbeat.strategy` on QF_STRATEGY_PUB, and stores the signals in the `signals` table from a
writer thread (services/strategy/signals.py) that never holds up the loop.

Lock-step replay (QF_LOCKSTEP, shared/lockstep.py; `_run_lockstep`): a stepped strategy. It reads
as above but decides nothing on arrival: what it reads waits (`fresh`, `work`) until the
conductor steps it, once broker and risk are done with a record or a due request, and then goes
to the core in `qf backtest`'s order (services/backtest/engine.py): risk's answers, the broker's
events, risk's states, then the record's trades and books, then `tick` (every TICK_NS of the
capture's time, after a record) — all at the step's `ts`, the capture's time. Each request goes
out alone: the step ends after it, and the next one starts with what came of it (risk's or the
broker's immediate answer), as the backtest hands those over at once. Orders are named as the
backtest names them (`{name}-r{QF_BROKER_SEED}-n`); the core is reachable from the start, as the
backtest's is (the STATE request is answered before the strategy says hello).
"""
from __future__ import annotations

import logging
import threading
import time
from decimal import Decimal

import zmq

from collections import deque

from services.risk import limits as risk_limits
from services.strategy import telemetry
from services.strategy.core import OrderIntent
from services.strategy.ofi import CancelIntent, OfiStrategy, Signal
from services.strategy.signals import SignalWriter
from shared import curve, messages
from shared.bus import AsyncClient, Publisher, Subscriber
from shared.config import Config
from shared.enums import ControlAction, TradingState, Verdict
from shared.errors import DecodeError
from shared.lockstep import RECORD_STEP_TOPIC, STEP_TOPIC, LockstepClock, Reporter
from shared.messages import (Ack, Book, Cancel, Clock, Control, ControlReply, Decision, Error, Fill, OrderEvent,
                             OrderRequest, RiskState, SignalEvent, Trade)
from shared.metrics_http import MetricsServer
from shared.money import to_decimal
from shared.runtime import HeartbeatMaker, Liveness, MicrosHistogram, Ticker, identity, quiet_gc

log = logging.getLogger("qf.strategy")

SERVICE = "strategy"
POLL_MS = 50  # the longest the loop waits before it looks at timers, the stop flag and liveness
DRAIN_MAX = 10_000  # events read per socket per turn, so a flood cannot starve the rest
TICK_NS = 50_000_000  # how often the core's time rules (time stop, stale orders) run without a book
STATE_KEY = "control:STATE"


def local_reject(cid: str, code: str, text: str) -> Decision:
    """A REJECTED decision standing for an answer that did not come (the core treats it as risk's)."""
    return Decision(ts=time.time_ns(), client_order_id=cid, verdict=Verdict.REJECTED,
                    reason={"code": code, "text": text})


def signal_event(sig: Signal) -> SignalEvent:
    return SignalEvent(ts=sig.ts, symbol=sig.symbol, side=sig.side.value if sig.side is not None else "FLAT",
                       confidence=sig.confidence, score=sig.score, features=dict(sig.features),
                       update_id=sig.update_id, recv_ts=sig.recv_ts, client_order_id=sig.client_order_id,
                       action=sig.action)


class OfiService:
    """Runs `OfiStrategy` live. `run()` blocks until `stop()`."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.curve = curve.load(cfg, "strategy")  # KeyFileError (one line, exit 2) before anything runs
        self.start_ns = time.time_ns()
        rules = risk_limits.from_config(cfg).rules
        # start time in the prefix keeps client_order_id unique across restarts; a lock-step
        # replay names its orders as `qf backtest` of the capture does (services/backtest/engine.py)
        prefix = (f"{cfg.strategy.name}-r{cfg.broker.seed}" if cfg.bus.lockstep
                  else f"{cfg.strategy.name}-{self.start_ns:x}")
        self.core = OfiStrategy(cfg.strategy, cfg.md.symbols, rules, id_prefix=prefix)
        # the time of what is sent: the wall clock, or in lock-step the step's (the capture's)
        self.clock = LockstepClock() if cfg.bus.lockstep else time.time_ns
        self.reporter: Reporter | None = None  # lock-step only: the counters the conductor reads
        # lock-step only: what was read since the last step (risk's answers, the broker's events,
        # risk's states, market data), and the work a step left (a request sent ends a step)
        self.fresh: tuple[list, list, list, list] = ([], [], [], [])
        self.work: deque = deque()
        self.next_tick = 0
        self._links: dict[str, bool] = {}
        self._stop = threading.Event()
        self.stats = {"books": 0, "trades": 0, "fills": 0, "order_events": 0, "other_symbols": 0,
                      "decode_errors": 0, "orders": 0, "cancels": 0, "approved": 0, "rejected": 0,
                      "no_reply": 0, "errors": 0, "signals": 0, "risk_silent": 0, "state_syncs": 0}
        self.decision_us = MicrosHistogram()  # features + decision per book, in this process (wall time)
        # the same on this thread's CPU clock: what the decision costs, without the time the machine
        # gave other processes meanwhile (on 2 shared cores the wall figure's tail is mostly that)
        self.decision_cpu_us = MicrosHistogram()
        self.writer: SignalWriter | None = None
        self.asked: dict[str, tuple[str, object, int]] = {}  # key -> (kind, intent, sent perf ns)
        self.reachable = False
        self.synced = False
        self._told_state = TradingState.ACTIVE  # the last risk state `_risk_state` spoke of
        self.status = "starting"
        self._poller: zmq.Poller | None = None
        self._polled: zmq.Socket | None = None
        self.metrics: MetricsServer | None = None  # /metrics on QF_STRATEGY_METRICS_BIND while run() runs

    def stop(self) -> None:
        self._stop.set()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Until stop(): the live loop, or the lock-step one (QF_LOCKSTEP); /metrics beside either
        while it runs when QF_STRATEGY_METRICS_BIND is set (MetricsBindError when it cannot be bound)."""
        keys = [s.upper() for s in self.cfg.md.symbols]
        core = self.core
        collector = telemetry.StrategyCollector(
            self.stats, rejections=core.rejections, core_stats=core.stats, decision=self.decision_us,
            decision_cpu=self.decision_cpu_us, reachable=lambda: self.reachable,
            positions=lambda: {k: core.position(k) for k in keys})
        telemetry.serve_while(self, collector, self._run_lockstep if self.cfg.bus.lockstep else self._run_live)

    def _run_live(self) -> None:
        cfg = self.cfg
        ctx = self.ctx
        md = Subscriber(cfg.bus.md_pub, ["book.", "trade."], cfg.bus.hwm, ctx=ctx, curve=self.curve)
        broker = Subscriber(cfg.bus.broker_pub, ["fill.", "order."], cfg.bus.hwm, ctx=ctx, curve=self.curve)
        risk = Subscriber(cfg.bus.risk_pub, ["risk.state"], cfg.bus.hwm, ctx=ctx, curve=self.curve)
        pub = Publisher(cfg.bus.strategy_pub, cfg.bus.hwm, ctx, self.curve)
        client = AsyncClient(cfg.bus.risk_rep, cfg.strategy.timeout_ms, cfg.strategy.retries, ctx=ctx, curve=self.curve)
        self.pub, self.client = pub, client
        self.writer = SignalWriter(cfg.common.db)
        self.writer.start()
        heartbeat = HeartbeatMaker(identity(SERVICE, cfg.common.instance))
        try:
            liveness = Liveness(cfg.common.run_dir, heartbeat.service)
            ticker = Ticker(cfg.bus.heartbeat_ms)
            log.info("started", extra={"kind": "ofi", "md_pub": cfg.bus.md_pub, "risk_rep": cfg.bus.risk_rep,
                                       "broker_pub": cfg.bus.broker_pub, "strategy_pub": cfg.bus.strategy_pub,
                                       "symbols": ",".join(cfg.md.symbols), "prefix": self.core.id_prefix})
            self.core.set_risk_reachable(False, time.time_ns())
            self._ask_state()
            quiet_gc()  # shared/runtime.py: the cycle collector off the per-book decision
            next_tick = 0
            try:
                while not self._stop.is_set():
                    if ticker.due():
                        liveness.touch()
                        if not self.reachable and not client.in_flight(STATE_KEY):
                            self._ask_state()
                        pub.publish(heartbeat.topic, heartbeat.make(self.status, self._beat_stats()))
                    timeout = POLL_MS
                    deadline = client.next_deadline()
                    if deadline is not None:
                        timeout = max(0, min(timeout, (deadline - time.monotonic_ns()) // 1_000_000 + 1))
                    ready = self._poll(client, md, broker, risk, timeout)
                    if client.sock in ready:
                        self._answers(client)
                    if broker.sock in ready:
                        self._drain(broker)
                    if risk.sock in ready:
                        self._drain(risk)
                    if md.sock in ready:
                        self._drain(md)
                    for key in client.expired():
                        self._given_up(key)
                    now = time.time_ns()
                    if now >= next_tick:
                        next_tick = now + TICK_NS
                        self._act(self.core.tick(now))
                    self._signals()
            finally:
                liveness.remove()
        finally:
            self._close(client, pub, md, broker, risk)

    def _close(self, client: AsyncClient, pub: Publisher, *subs: Subscriber, **extra) -> None:
        """Both loops' end: every socket closed, the signals stored, the `stopped` line."""
        client.close()
        for sub in subs:
            sub.close()
        pub.close()
        self.writer.stop()
        log.info("stopped", extra={**self._beat_stats(), **extra, "missed": sum(sub.missed for sub in subs)})

    def _poll(self, client: AsyncClient, md: Subscriber, broker: Subscriber, risk: Subscriber,
              timeout: int) -> dict:
        poller = self._poller
        if poller is None or self._polled is not client.sock:  # the client replaces its socket on give-up
            poller = self._poller = zmq.Poller()
            self._polled = client.sock
            for sock in (client.sock, md.sock, broker.sock, risk.sock):
                poller.register(sock, zmq.POLLIN)
        return dict(poller.poll(timeout))

    def _risk_state(self, state: TradingState, reason: str) -> None:
        """Say once, at each change of risk's state, what it means for this strategy."""
        if state is self._told_state:
            return
        self._told_state = state
        if state is TradingState.PAUSED_SHABBAT:
            log.warning("paused", extra={"state": state.value, "why": reason,
                                         "note": "no entries and no exits until risk resumes "
                                                 "(risk closed what was held)"})
        elif state is not TradingState.ACTIVE:
            log.warning("entries_stopped", extra={"state": state.value, "why": reason})
        else:
            log.info("trading", extra={"state": state.value, "why": reason})

    def _beat_stats(self) -> dict:
        """The counters of the heartbeat and the `stopped` line: the shell's, the core's (prefixed
        `core_` where a name is the shell's too), rejections by reason, the signal writer's, and
        the per-book decision time."""
        out = dict(self.stats)
        for k, v in self.core.stats.items():
            out[f"core_{k}" if k in out else k] = v
        out.update({f"rejected_{k}": v for k, v in self.core.rejections.items()})
        if self.writer is not None:
            out.update(self.writer.stats)
        out.update(self.decision_us.stats("decision"))
        out.update(self.decision_cpu_us.stats("decision_cpu"))
        out["risk_reachable"] = self.reachable
        return out

    # -- reading ------------------------------------------------------------------------------

    def _drain(self, sub: Subscriber) -> None:
        for _ in range(DRAIN_MAX):
            try:
                _, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                log.warning("bad_frame", extra={"reason": exc.reason, "detail": exc.detail})
                continue
            self._on_message(msg, time.time_ns())

    def _on_message(self, msg: messages.Message, now: int) -> None:
        """One book, trade, fill, order event or risk state to the core at `now`; what it asks for
        goes to `_act`."""
        core = self.core
        kind = type(msg)
        try:
            if kind is Book:
                if not core.trades(msg.symbol):
                    self.stats["other_symbols"] += 1
                    return
                self.stats["books"] += 1
                t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                actions = core.on_book(msg, now)
                self.decision_us.record_ns(time.perf_counter_ns() - t0)
                self.decision_cpu_us.record_ns(time.thread_time_ns() - c0)
                self._act(actions)
                if core.has_signals() and self.reporter is None:
                    # out now, after its order: the signal's features are read here, not by the
                    # next book of a burst (a lock-step replay keeps them for its step's end)
                    self._signals()
            elif kind is Trade:
                if core.trades(msg.symbol):
                    self.stats["trades"] += 1
                    core.on_trade(msg, now)
            elif kind is Fill:
                if core.trades(msg.symbol):
                    self.stats["fills"] += 1
                    self._act(core.on_fill(msg, now))
            elif kind is OrderEvent:
                if core.trades(msg.symbol):
                    self.stats["order_events"] += 1
                    self._act(core.on_order(msg, now))
            elif kind is RiskState:
                self._risk_state(msg.state, msg.reason)
                self._act(core.on_risk_state(msg.state, now))
        except ValueError as exc:  # a fill or order event the core found not credible: nothing applied
            self.stats["errors"] += 1
            log.warning("event_refused", extra={"type": msg.TYPE, "detail": str(exc)[:200]})
        except Exception:  # a bug on one event must not stop the service
            self.stats["errors"] += 1
            log.exception("event_failed", extra={"type": msg.TYPE})

    def _answers(self, client: AsyncClient) -> None:
        while True:
            got = client.recv()
            if got is None:
                return
            self._on_answer(*got, time.time_ns())

    def _on_answer(self, key: str, raw: bytes, now: int) -> None:
        """Risk's answer to the request named `key` to the core at `now`."""
        kind, intent, sent = self.asked.pop(key, (None, None, 0))
        try:
            reply = messages.decode(raw, messages.REQUESTS)
        except DecodeError as exc:
            self.stats["decode_errors"] += 1
            log.warning("bad_answer", extra={"key": key, "reason": exc.reason, "detail": exc.detail})
            reply = None
        try:
            self._reachable(True, now)
            if key == STATE_KEY:
                self._state_answer(reply, now)
            elif kind == "order":
                self._decided(intent, reply, sent, now)
            elif kind == "cancel":
                ack = reply if isinstance(reply, Ack) else None
                code = reply.code if isinstance(reply, Error) else (None if ack else "BAD_ANSWER")
                self._act(self.core.on_cancel_answer(intent.client_order_id, ack, code, now))
        except ValueError as exc:
            self.stats["errors"] += 1
            log.warning("answer_refused", extra={"key": key, "detail": str(exc)[:200]})
        except Exception:
            self.stats["errors"] += 1
            log.exception("answer_failed", extra={"key": key})

    def _decided(self, intent: OrderIntent, reply, sent_ns: int, now: int) -> None:
        if not isinstance(reply, Decision) or reply.client_order_id != intent.client_order_id:
            what = type(reply).__name__ if reply is not None else "unreadable"
            reply = local_reject(intent.client_order_id, "BAD_ANSWER", f"risk answered with {what}")
        approved = reply.verdict is not Verdict.REJECTED
        self.stats["approved" if approved else "rejected"] += 1
        self._act(self.core.on_decision(reply, now))
        ack = reply.order
        log.info("order_result", extra={
            "cid": intent.client_order_id, "symbol": intent.symbol, "side": intent.side.value,
            "kind": intent.kind.value, "qty": intent.qty, "price": intent.price if intent.price is not None else "",
            "why": intent.reason, "verdict": reply.verdict.value,
            "reason": (reply.reason or {}).get("code") or (ack.reason if ack else ""),
            "status": ack.status.value if ack else "", "filled_qty": ack.filled_qty if ack else 0,
            "position": self.core.position(intent.symbol),
            "risk_rtt_us": (time.perf_counter_ns() - sent_ns) // 1000,
            "tick_to_trade_us": (now - intent.signal_ts) // 1000 if intent.signal_ts else ""})

    def _given_up(self, key: str) -> None:
        """No answer after every retry: risk is silent. The core hears a local rejection (an order)
        or a failed cancel; it stops trading until risk answers a STATE request again."""
        kind, intent, _ = self.asked.pop(key, (None, None, 0))
        now = time.time_ns()
        self.stats["no_reply"] += 1
        self._reachable(False, now)
        log.warning("no_reply", extra={"key": key, "endpoint": self.cfg.bus.risk_rep})
        try:
            if kind == "order":
                self._act(self.core.on_decision(local_reject(intent.client_order_id, "NO_REPLY",
                                                             "risk did not answer"), now))
            elif kind == "cancel":
                self._act(self.core.on_cancel_answer(intent.client_order_id, None, "NO_REPLY", now))
        except Exception:
            self.stats["errors"] += 1
            log.exception("give_up_failed", extra={"key": key})

    def _reachable(self, ok: bool, now: int) -> None:
        if ok == self.reachable:
            return
        if not ok:
            self.reachable = False
            self.synced = False  # what risk holds may have moved while it was silent
            self.stats["risk_silent"] += 1
            self.status = "risk_silent"
            self.core.set_risk_reachable(False, now)
            log.warning("risk_silent", extra={"detail": "no orders until risk answers again"})
        elif self.synced:
            self.reachable = True
            self.status = "ok"
            self.core.set_risk_reachable(True, now)

    def _ask_state(self) -> None:
        req = Control(ts=self.clock(), action=ControlAction.STATE, by=SERVICE, reason="positions")
        self.asked[STATE_KEY] = ("state", None, time.perf_counter_ns())
        self.client.send(STATE_KEY, messages.encode(req))

    def _state_answer(self, reply, now: int) -> None:
        if not isinstance(reply, ControlReply):
            log.warning("state_refused", extra={"got": type(reply).__name__})
            return
        positions: dict[str, Decimal] = {}
        for symbol, qty in (reply.positions or {}).items():
            if self.core.trades(symbol):
                positions[symbol] = to_decimal(qty, f"positions.{symbol}")
        self.core.sync(positions, now)
        self.stats["state_syncs"] += 1
        self.synced = True
        first = not self.reachable
        self._reachable(True, now)  # first: the cancels the state asks for (REDUCING, HALTED) go at once
        self._risk_state(reply.state, reply.reason)
        self._act(self.core.on_risk_state(reply.state, now))
        if first:
            log.info("risk_answered", extra={"state": reply.state.value,
                                             **{f"position_{s}": q for s, q in positions.items()}})

    # -- sending ------------------------------------------------------------------------------

    def _act(self, actions) -> None:
        if self.reporter is not None:  # lock-step: each goes out alone, in its turn (`_step`)
            self.work.extendleft(reversed([("act", a) for a in actions or ()]))
            return
        for action in actions or ():
            if isinstance(action, CancelIntent):
                self._cancel(action)
            else:
                self._order(action)

    def _order(self, intent: OrderIntent) -> bool:
        now = self.clock()
        req = OrderRequest(ts=now, client_order_id=intent.client_order_id, strategy=self.cfg.strategy.name,
                           symbol=intent.symbol, side=intent.side, kind=intent.kind, qty=intent.qty,
                           price=intent.price, tif=intent.tif, confidence=intent.confidence,
                           signal_ts=intent.signal_ts)
        key = "order:" + intent.client_order_id
        self.asked[key] = ("order", intent, time.perf_counter_ns())
        self.stats["orders"] += 1
        self.client.send(key, messages.encode(req))
        if self.reporter is not None:
            self.reporter.counters["orders_sent"] += 1
        return True

    def _cancel(self, intent: CancelIntent) -> bool:
        key = "cancel:" + intent.client_order_id
        if self.client.in_flight(key):
            return False  # the core asks once per order; a repeat while one is in flight is not sent twice
        self.asked[key] = ("cancel", intent, time.perf_counter_ns())
        self.stats["cancels"] += 1
        self.client.send(key, messages.encode(Cancel(ts=self.clock(), client_order_id=intent.client_order_id)))
        if self.reporter is not None:
            self.reporter.counters["cancels_sent"] += 1
        log.info("cancel_sent", extra={"cid": intent.client_order_id, "symbol": intent.symbol,
                                       "why": intent.reason})
        return True

    def _signals(self) -> None:
        signals = self.core.take_signals()
        if not signals:
            return
        for sig in signals:
            self.stats["signals"] += 1
            try:
                self.pub.publish(f"signal.{sig.symbol}", signal_event(sig))
            except Exception:
                self.stats["errors"] += 1
                log.exception("signal_publish_failed", extra={"symbol": sig.symbol})
        self.writer.put(signals)

    # -- lock-step replay (QF_LOCKSTEP) --------------------------------------------------------

    def _run_lockstep(self) -> None:
        """`run` in a lock-step replay (see the module docstring): read and hold, count, and work
        only on the conductor's steps. Hello once every link is up: the md SUB (the handshake
        tick), the SUBs to the broker's and risk's PUBs (each passes the tick on: an event lost
        would stall the replay), and the DEALER to risk (STATE answered: the core takes risk's
        positions, none in a replay's new database). No retry, no wall-clock tick: time is the
        conductor's."""
        cfg, ctx = self.cfg, self.ctx
        md = Subscriber(cfg.bus.md_pub, ["book.", "trade.", "clock", STEP_TOPIC], cfg.bus.hwm, ctx=ctx,
                        curve=self.curve)
        broker = Subscriber(cfg.bus.broker_pub, ["fill.", "order.", "clock"], cfg.bus.hwm, ctx=ctx, curve=self.curve)
        risk = Subscriber(cfg.bus.risk_pub, ["risk.state", "clock"], cfg.bus.hwm, ctx=ctx, curve=self.curve)
        pub = Publisher(cfg.bus.strategy_pub, cfg.bus.hwm, ctx, self.curve)
        client = AsyncClient(cfg.bus.risk_rep, cfg.strategy.timeout_ms, cfg.strategy.retries, ctx=ctx, curve=self.curve)
        reporter = self.reporter = Reporter(cfg.bus.lockstep, SERVICE, ctx, stepped=True)
        self.pub, self.client = pub, client
        self.writer = SignalWriter(cfg.common.db)
        self.writer.start()
        heartbeat = HeartbeatMaker(identity(SERVICE, cfg.common.instance))
        links = self._links = {"md": False, "broker": False, "risk": False}  # handshake ticks heard
        try:
            liveness = Liveness(cfg.common.run_dir, heartbeat.service)
            ticker = Ticker(cfg.bus.heartbeat_ms)
            log.info("started", extra={"kind": "ofi", "lockstep": True, "md_pub": cfg.bus.md_pub,
                                       "risk_rep": cfg.bus.risk_rep, "broker_pub": cfg.bus.broker_pub,
                                       "symbols": ",".join(cfg.md.symbols), "prefix": self.core.id_prefix})
            try:
                while not self._stop.is_set():
                    if ticker.due():
                        liveness.touch()
                        pub.publish(heartbeat.topic, heartbeat.make(self.status, self._beat_stats()))
                    if STATE_KEY not in self.asked and not self.synced and client.sock.poll(0, zmq.POLLOUT):
                        self._ask_state()  # once the DEALER is connected (IMMEDIATE: not queued before)
                    ready = self._poll(client, md, broker, risk, POLL_MS)
                    if client.sock in ready:
                        self._hold_answers(client)
                    if broker.sock in ready:
                        self._hold(broker, 1, links, "broker")
                    if risk.sock in ready:
                        self._hold(risk, 2, links, "risk")
                    if md.sock in ready:
                        self._hold(md, 3, links, "md")
                    for key in client.expired():
                        self._given_up(key)
                    if not reporter.hello and self.synced and all(links.values()):
                        reporter.on_clock(0)
                    self._signals()
                    reporter.counters["held"] = len(self.work) + sum(map(len, self.fresh))
                    reporter.counters["next_tick"] = self.next_tick
                    try:
                        reporter.report()
                    except zmq.ZMQError as exc:
                        log.warning("lockstep_report_failed", extra={"error": str(exc)})
            finally:
                liveness.remove()
        finally:
            reporter.close()
            self._close(client, pub, md, broker, risk, **reporter.counters)

    def _hold_answers(self, client: AsyncClient) -> None:
        """Risk's answers: STATE's at once (before hello), the others held and counted."""
        counters, answers = self.reporter.counters, self.fresh[0]
        while True:
            got = client.recv()
            if got is None:
                return
            key = got[0]
            if key == STATE_KEY:
                self._on_answer(*got, self.clock())
                continue
            counters["cancel_answers_in" if key.startswith("cancel:") else "answers_in"] += 1
            answers.append(("answer", *got))

    def _hold(self, sub: Subscriber, into: int, links: dict, link: str) -> None:
        """What waits on `sub` into `fresh[into]`, counted: the broker's events (`events_in`),
        risk's states (`states_in`), books and trades (`md`, with the `clock` ticks, which hold
        nothing: a step's time is its own). A handshake tick marks the link up; a step works."""
        counters, held = self.reporter.counters, self.fresh[into]
        for _ in range(DRAIN_MAX):
            try:
                topic, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:  # counts as nothing: the conductor names the channel behind
                self.stats["decode_errors"] += 1
                log.warning("bad_frame", extra={"reason": exc.reason, "detail": exc.detail})
                continue
            kind = type(msg)
            if kind is Clock:
                if msg.ts == 0:
                    links[link] = True
                elif topic.startswith(STEP_TOPIC):
                    counters["steps"] += 1
                    self._step(msg.ts, topic == RECORD_STEP_TOPIC)
                elif into == 3:
                    counters["md"] += 1
                continue
            if into == 1:
                if kind is not Fill and kind is not OrderEvent:
                    continue
                counters["events_in"] += 1
            elif into == 2:
                if kind is not RiskState:
                    continue
                counters["states_in"] += 1
            else:
                if kind is not Book and kind is not Trade:
                    continue
                counters["md"] += 1
            held.append(("msg", msg))

    def _step(self, ts: int, record: bool) -> None:
        """A step at `ts` (the capture's time): what came since the last step first — answers,
        events, states, market data, each in the order read — then what an earlier step left;
        until a request goes out (the rest waits for the next step, after what came of it). A
        record's step ends with the core's timer when it is due (every TICK_NS, as the backtest's)."""
        self.clock.observe(ts)
        batch = [item for held in self.fresh for item in held]
        for held in self.fresh:
            held.clear()
        work = self.work
        work.extendleft(reversed(batch))
        while True:
            while work:
                item = work.popleft()
                if item[0] == "act":
                    action = item[1]
                    if self._cancel(action) if isinstance(action, CancelIntent) else self._order(action):
                        return
                elif item[0] == "answer":
                    self._on_answer(item[1], item[2], ts)
                else:
                    self._on_message(item[1], ts)
            if not record or ts < self.next_tick:
                return
            self.next_tick = ts + TICK_NS
            self._act(self.core.tick(ts))
