"""`qf backtest`'s one loop: the live services' cores driven in one process by a capture's recorded time.

What runs is what the services run, minus their sockets:

- market data: `BookRouter` (book sync, gaps, resyncs from the capture's snapshots), fed the
  capture's records by `ReplayFeed(stamp="recorded")`, so every book and trade carries the
  time it was recorded at (`ts` = `recv_ts`);
- the strategy of QF_STRATEGY_KIND, asking through the wire format (an encoded `order`, an
  encoded `decision` back) exactly as its service does: `ImbalanceStrategy` (books only), or
  `OfiStrategy` (services/strategy/ofi.py), which also gets every trade, the exchange's `fill.*`
  and `order.*` events (after risk), risk's decisions and cancel answers, risk's state changes,
  and `tick(t)` every TICK_NS of capture time; its cancels go through risk's desk, and its signals
  to `sink` (SIGNAL_INSERT statements);
- risk: `RiskEngine` behind the service's own `OrderDesk` (checks, breakers, answer vetting,
  denial rows), whose broker link is `PaperExchange.send` instead of a DEALER socket;
- the broker: `FillModel` (latency, book walking, queues, fees), `Account` and the broker's
  storage statements (`services/broker/store.py`), in `PaperExchange`.

Time is the capture's. An order decided at `t` reaches the simulated exchange at
`t + entry latency` (+ feed lag), as live: the loop wakes the exchange at that instant (the
broker service's timer), before the next capture record at or after it. At each record the
order of hand-offs is fixed — the exchange's due requests, then the record's books and trades to
the broker, to risk, then to the strategy (whose order goes through risk to the broker at once)
— which is the order the lock-step replay enforces across processes.

No I/O here: rows for the database are handed to `sink` (a callable taking journal statements)
and to risk's `Outbox`, which the shell writes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from services.broker import core, store
from services.broker.core import Account, Order
from services.broker.desk import SeededIds
from services.broker.fill_model import ARRIVED, NOT_OPEN, FillModel, Update, lot_sizes
from services.broker.latency import LatencyModel
from services.broker.queue import make_queue_model
from services.risk import limits as risk_limits
from services.risk.core import RiskEngine
from services.risk.desk import OrderDesk
from services.risk.checks import PAUSE_PREFIX
from services.risk.flatten import FLATTEN_RETRY_NS, FlattenJob
from services.risk.store import Forwarded, Outbox
from services.risk.telemetry import LogLimiter
from services.strategy.core import ImbalanceStrategy, OrderIntent
from services.strategy.ofi import CancelIntent, OfiStrategy, signal_params
from services.backtest.summary import BadEvent, Figures, Gap
from shared import messages
from shared.aggregates import Aggregates
from shared.config import Config
from shared.db import EQUITY_INSERT, SIGNAL_INSERT
from shared.errors import DecodeError
from services.marketdata.records import SnapshotRecord, WsMessage
from shared.messages import Ack, Book, Cancel, Decision, Error, OrderRequest, Trade
from shared.money import quote_asset

log = logging.getLogger("qf.backtest")

MESSAGES = (WsMessage, SnapshotRecord)  # the capture's messages (not the feed's route records)
Sink = Callable[[list], None]  # journal statements (shared/db.py JOURNAL_SQL kinds) to store
TICK_NS = 50_000_000  # the OFI strategy's `tick` period (its live shell's): time stops, stale entries
BAD_LISTED = 100  # bad capture messages listed in the summary (all are counted)


@dataclass(slots=True)
class Clock:
    """The backtest's one clock: the capture's recorded time, moved only by the loop."""
    now: int = 0

    def __call__(self) -> int:
        return self.now


class PaperExchange:
    """The broker service's cores in-process: orders from risk's desk (`send`, BrokerLink's
    interface) go into the FillModel; what it does is stored (statements to `sink`), answered
    (the encoded ack to the desk's callback) and published (fills and order events to risk),
    in the broker's order: durable first, then told. No journal and no repeat handling: one
    process, one run, and nothing retried."""

    endpoint = "in-process"

    def __init__(self, cfg: Config, symbols: tuple[str, ...], seed: int, clock: Clock, sink: Sink,
                 figures: Figures) -> None:
        b = cfg.broker
        self.latency = LatencyModel(b.latency_mode, b.latency_ms, b.latency_sigma, seed)
        self.model = FillModel(b.taker_fee, b.maker_fee, make_queue_model(b.queue_model, b.queue_power),
                               self.latency, b.fee_asset, symbols, lot_sizes(cfg))
        self.account = Account(b.start_cash)
        self.aggregates = Aggregates()  # the run's database starts empty (services/backtest/cli.py)
        self.timeout_ns = cfg.risk.broker_timeout_ms * 1_000_000
        self.clock, self.sink, self.figures = clock, sink, figures
        self.ids = SeededIds(seed)
        self.waiters: dict[str, Callable[[bytes | None], None]] = {}
        self.cancel_waiters: dict[int, Callable[[bytes | None], None]] = {}
        self.acks: dict[str, messages.Ack] = {}  # the latest answer of each order (cancels of finished ones)
        self._tokens = 0
        self.now_answers: list[tuple[Callable[[bytes | None], None], bytes]] = []  # answered without latency
        self.on_fill_event: Callable[[messages.Fill, int], None] = lambda fill, now: None
        self.on_order_event: Callable[[messages.OrderEvent], None] = lambda event: None
        self.orders = self.fills = 0
        self.due: int | None = None  # the model's next due request, kept after each call into it (read per record)

    # -- BrokerLink's interface (risk's desk) -------------------------------------------------

    def send(self, payload: bytes, callback: Callable[[bytes | None], None]) -> bool:
        """A request from risk: an order goes in flight (answered when it reaches the book), a
        cancel takes effect after the latency; what is answered at once is answered after this
        call returns (`now_answers`), as a socket would."""
        now = self.clock.now
        req = messages.decode(payload, messages.REQUESTS)
        if isinstance(req, OrderRequest):
            self._place(req, callback, now)
        elif isinstance(req, Cancel):
            self._cancel(req.client_order_id, callback, now)
        else:
            self.now_answers.append((callback, messages.encode(Error(ts=now, code="unexpected_type",
                                                                     text=req.TYPE))))
        return True

    def _place(self, req: OrderRequest, callback, now: int) -> None:
        order_id = self.ids.next()
        self.waiters[req.client_order_id] = callback
        try:
            quote_asset(req.symbol)
            order = Order.from_request(req, order_id, now)
            self.model.submit(order, now)
            self.due = self.model.next_due()
        except ValueError:
            order = Order.rejected(req, order_id, now, core.BAD_ORDER)
            self.process([Update(ARRIVED, req.client_order_id, order)])

    def _cancel(self, coid: str, callback, now: int) -> None:
        self._tokens += 1
        if self.model.cancel(coid, now, self._tokens):
            self.due = self.model.next_due()
            self.cancel_waiters[self._tokens] = callback
            return
        known = self.acks.get(coid)
        reply = (dataclasses.replace(known, reason=core.NOT_OPEN) if known is not None
                 else Error(ts=now, code="UNKNOWN_ORDER", text=coid))
        self.now_answers.append((callback, messages.encode(reply)))

    # -- time and market events -----------------------------------------------------------------

    def advance(self, now: int) -> None:
        self.process(self.model.advance(now))
        self.due = self.model.next_due()

    def on_book(self, book: Book, now: int) -> None:
        self.process(self.model.on_book(book, now))
        self.due = self.model.next_due()

    def on_trade(self, trade: Trade, now: int) -> None:
        self.process(self.model.on_trade(trade, now))
        self.due = self.model.next_due()

    # -- commit, then tell (BrokerService._process) ------------------------------------------

    def process(self, updates: list[Update]) -> None:
        if not updates:
            return
        changes = store.changes_of(updates)
        if changes:
            done = store.batch(changes, self.account, self.model.marks(), self.aggregates)
            self.sink(done.statements)
            self.account, self.aggregates = done.account, done.aggregates
        events = []
        for u in updates:
            if u.event == NOT_OPEN:
                self._answer_cancel(u, None)
                continue
            order = u.order
            prior = self.acks.get(order.client_order_id)
            ack = core.ack_for(order, [*(prior.fills if prior is not None else ()), *u.fills], order.updated_ts)
            self.acks[order.client_order_id] = ack
            if u.event == ARRIVED:
                callback = self.waiters.pop(u.client_order_id, None)
                if callback is not None:
                    callback(messages.encode(ack))
                self.orders += 1
            if u.cancel_token is not None:
                self._answer_cancel(u, ack)
            events.append(u)
        for u in events:  # the bus after the answers: fills first, then the order's new state
            for f in u.fills:
                self.fills += 1
                self.figures.on_fill(f)
                self.on_fill_event(f, self.clock.now)
            self.on_order_event(core.order_event(u.order, u.order.updated_ts))
        if any(u.fills for u in events):
            self.figures.on_equity(self.account.equity(self.model.marks()), self.clock.now)

    def _answer_cancel(self, u: Update, ack: messages.Ack | None) -> None:
        callback = self.cancel_waiters.pop(u.cancel_token, None)
        if callback is None:
            return
        if ack is None:
            known = self.acks.get(u.client_order_id)
            ack = dataclasses.replace(known, reason=core.NOT_OPEN) if known is not None else None
        callback(messages.encode(ack) if ack is not None else
                 messages.encode(Error(ts=self.clock.now, code="UNKNOWN_ORDER", text=u.client_order_id)))

    def snapshot(self, now: int, note: str = "periodic") -> None:
        """An equity row, as the broker's periodic snapshot writes it."""
        equity = self.account.equity(self.model.marks())
        self.sink([(EQUITY_INSERT, (now, store._dec(equity), store._dec(self.account.cash), note))])
        self.figures.on_equity(equity, now)


class Backtest:
    """One run over a capture. `Backtest(cfg, symbols, seed, sink)`; `run(records)` feeds the
    capture's records (ReplayFeed(stamp="recorded").records()) through the cores and returns
    when they are used up and every order in flight has been answered; then `summary()`.

    `progress(records, now_ns)` is called every `progress_every` records."""

    def __init__(self, cfg: Config, symbols: tuple[str, ...], seed: int, sink: Sink, router,
                 id_prefix: str | None = None) -> None:
        self.cfg, self.symbols, self.seed = cfg, symbols, seed
        self.clock = Clock()
        self.figures = Figures(cfg.broker.start_cash)
        self.exchange = PaperExchange(cfg, symbols, seed, self.clock, sink, self.figures)
        # risk, as RiskService builds it, with the exchange for its broker link
        self.limits = risk_limits.from_config(cfg)
        self.engine = RiskEngine.from_config(self.limits, cfg)
        self.risk_stats = {"approved": 0, "adjusted": 0, "rejected": 0, "broker_rejected": 0, "decode_errors": 0,
                           "books": 0, "fills": 0, "events_lost": 0, "store_failures": 0}
        self.outbox = Outbox(10**9, self.risk_stats)
        self.desk = OrderDesk(self.engine, self.exchange, self.outbox, Forwarded(), self.risk_stats, self.clock,
                              LogLimiter(log))
        self.exchange.on_fill_event = self._risk_fill
        self.exchange.on_order_event = self.desk.on_order_event
        self.ofi = cfg.strategy.kind == "ofi"
        prefix = id_prefix or f"{cfg.strategy.name}-r{seed}"
        if self.ofi:
            self.strategy = OfiStrategy(cfg.strategy, symbols, self.limits.rules, prefix)
            self.exchange.on_fill_event = self._ofi_fill  # risk first, then the strategy
            self.exchange.on_order_event = self._ofi_order_event
        else:
            self.strategy = ImbalanceStrategy(cfg.strategy, symbols, prefix)
        self.sink = sink
        self.cancels = 0  # cancels the strategy sent
        self.signals = 0  # signal rows stored
        self.strategy_errors = 0  # answers and events the strategy refused as not credible (ValueError)
        self.router = router
        self.inbox: list = []
        self.router.pub = self  # the router publishes into the inbox
        self.records = 0
        self.orders = 0  # orders the strategy sent (risk may deny them)
        self.denied = 0
        self.gaps: list[Gap] = []
        self._open_gap: dict[str, Gap] = {}
        self._gap_counts = {k: 0 for k in symbols}
        self._gaps_seen = 0
        self.bad: list[BadEvent] = []  # the first BAD_LISTED bad messages of the capture
        self.bad_count = 0  # all of them
        self.skipped = 0  # capture messages that came while a bad message had cost a symbol its book
        self._open_bad: dict[str, BadEvent] = {}  # symbol -> the bad message its book is lost since
        self._bad_seen = 0
        self._later: list = []  # what risk's shell runs at the end of its turn (RiskService.later)
        self._flattening: FlattenJob | None = None  # a pause's flatten in progress
        self._flatten_retry_ns = 0
        self.pause_flattens = self.pause_flatten_failures = 0
        self.heartbeat_ns = cfg.bus.heartbeat_ms * 1_000_000
        self.equity_ns = int(cfg.broker.equity_s * 1e9)
        self._next_beat = self._next_equity = None
        self._next_tick = 0
        self.first_ns: int | None = None

    # the router's publisher
    def publish(self, topic: str, msg) -> None:
        self.inbox.append(msg)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, records: Iterable, progress: Callable[[int, int], None] | None = None,
            progress_every: int = 10_000) -> None:
        exchange, clock, inbox, engine = self.exchange, self.clock, self.inbox, self.engine
        dispatch, stats = self.router.dispatch, self.router.stats
        for rec in records:
            t = rec.recv_ns
            if self.first_ns is None:
                self.first_ns = t
                engine.on_clock(t)  # the calendar's phase as the capture starts (no pause before it)
                self._next_beat, self._next_equity = t + self.heartbeat_ns, t + self.equity_ns
            due = exchange.due
            while due is not None and due <= t:
                self._wake(due)
                due = exchange.due
            turn = engine.pause_next_ns
            while turn is not None and turn <= t:  # a pause starts or ends at its minute, between records
                self._wake(turn)
                turn = engine.pause_next_ns
            if t >= self._next_beat or t >= self._next_equity:
                self._timers(t)
            if t > clock.now:
                clock.now = t
            dispatch(rec, t)
            if type(rec) in MESSAGES:
                self.records += 1
                if self._open_bad:
                    self._skipping()
            if stats["bad_messages"] != self._bad_seen:
                self._note_bad(t)
            if stats["gaps"] != self._gaps_seen:
                self._note_gaps(t)
            if inbox:
                self._deliver(t)
                if self.ofi:
                    self._store_signals()
            if self.ofi and t >= self._next_tick:  # the strategy's timer, as its live shell's
                self._next_tick = t + TICK_NS
                self._act(self.strategy.tick(t), t)
                self._store_signals()
            if progress is not None and not self.records % progress_every:
                progress(self.records, t)
        # the capture ended: what is in flight still reaches the exchange (the broker's timer)
        due = exchange.due
        while due is not None:
            self._wake(due)
            due = exchange.due
        self._settle(clock.now)
        if self.ofi:
            self._store_signals()
        if clock.now:
            exchange.snapshot(clock.now, "end")

    def _wake(self, due: int) -> None:
        """The broker's timer at `due`: requests due then meet the book as it stands."""
        self.clock.now = max(self.clock.now, due)
        self.exchange.advance(due)
        self._answers()
        self._settle(self.clock.now)

    def _timers(self, t: int) -> None:
        if t >= self._next_beat:  # risk's heartbeat: orders of unknown fate expire
            self.engine.expire(t)
            self.desk.tick(t)
            self._next_beat = t - (t - self._next_beat) % self.heartbeat_ns + self.heartbeat_ns
        if t >= self._next_equity:  # the broker's periodic equity row
            self.exchange.snapshot(self._next_equity)
            self._next_equity += self.equity_ns * (1 + (t - self._next_equity) // self.equity_ns)

    def _deliver(self, t: int) -> None:
        msgs, self.inbox[:] = list(self.inbox), []
        exchange, engine = self.exchange, self.engine
        books = []
        for msg in msgs:  # the broker first: orders due before this event meet the book before it
            kind = type(msg)
            if kind is Book:
                exchange.on_book(msg, t)
                books.append(msg)
            elif kind is Trade:
                exchange.on_trade(msg, t)
        self._answers()
        for book in books:  # then risk marks its books
            self.risk_stats["books"] += 1
            engine.on_book(book.symbol, book.mid, t)
            self._book_seen(book)
        self._settle(t)
        if self.ofi:  # then the strategy: every trade and book, in order, and what each asks for at once
            strategy = self.strategy
            for msg in msgs:
                kind = type(msg)
                if kind is Book:
                    self._act(strategy.on_book(msg, t), t)
                elif kind is Trade:
                    strategy.on_trade(msg, t)
            return
        for book in books:  # then the strategy decides
            intent = self.strategy.on_book(book, t)
            if intent is not None:
                self._order(intent, t)

    def _order(self, intent: OrderIntent, t: int) -> None:
        """The strategy's order through risk, as StrategyService._execute sends it."""
        self.orders += 1
        req = OrderRequest(ts=t, client_order_id=intent.client_order_id, strategy=self.cfg.strategy.name,
                           symbol=intent.symbol, side=intent.side, kind=intent.kind, qty=intent.qty,
                           price=intent.price, tif=intent.tif, confidence=intent.confidence,
                           signal_ts=intent.signal_ts)
        payload = messages.encode(req)
        self.desk.submit_order(req, payload, t, self._decided, time.perf_counter_ns())
        self._answers()
        self._settle(t)

    def _decided(self, payload: bytes, _spent_ns: int, _since_ns: int) -> None:
        """Risk's answer reaches the strategy (StrategyService._ask's reading of it)."""
        try:
            reply = messages.decode(payload, messages.REQUESTS)
        except DecodeError as exc:
            raise AssertionError(f"risk's desk answered with an unreadable frame: {exc}") from None
        if isinstance(reply, Error):
            return  # the desk answers orders with decisions only; an error is for cancels
        assert isinstance(reply, Decision)
        if reply.verdict.value == "REJECTED":
            self.denied += 1
        if self.ofi:
            now = self.clock.now
            self._act(self._guard(self.strategy.on_decision, reply, now), now)
            return
        try:
            self.strategy.on_decision(reply)
        except ValueError as exc:
            log.error("bad_ack", extra={"cid": reply.client_order_id, "detail": str(exc)})

    # -- the OFI strategy's hand-offs ---------------------------------------------------------

    def _act(self, actions: list, t: int) -> None:
        """Send what the strategy asked for, at once and in order."""
        for action in actions:
            if type(action) is CancelIntent:
                self._cancel(action, t)
            else:
                self._order(action, t)

    def _guard(self, call, *args) -> list:
        """A strategy call whose input it may refuse as not credible (ValueError: nothing applied)."""
        try:
            return call(*args)
        except ValueError as exc:
            self.strategy_errors += 1
            log.error("strategy_refused", extra={"detail": str(exc)[:200]})
            return []

    def _cancel(self, intent: CancelIntent, t: int) -> None:
        """The strategy's cancel through risk's desk, its answer back to the strategy."""
        self.cancels += 1
        cid = intent.client_order_id

        def answered(raw: bytes) -> None:
            try:
                reply = messages.decode(raw, messages.REQUESTS)
            except DecodeError as exc:
                raise AssertionError(f"risk's desk answered a cancel with an unreadable frame: {exc}") from None
            ack = reply if isinstance(reply, Ack) else None
            code = reply.code if isinstance(reply, Error) else (None if ack is not None else "BAD_ANSWER")
            now = self.clock.now
            self._act(self._guard(self.strategy.on_cancel_answer, cid, ack, code, now), now)

        self.desk.submit_cancel(cid, t, answered)
        self._answers()
        self._settle(t)

    def _ofi_fill(self, fill: messages.Fill, now: int) -> None:
        """A `fill.*` event: risk books it first, then the strategy follows it."""
        self._risk_fill(fill, now)
        self._act(self._guard(self.strategy.on_fill, fill, now), now)

    def _ofi_order_event(self, event: messages.OrderEvent) -> None:
        """An `order.*` event: risk first, then the strategy."""
        self.desk.on_order_event(event)
        now = self.clock.now
        self._act(self._guard(self.strategy.on_order, event, now), now)

    def _store_signals(self) -> None:
        signals = self.strategy.take_signals()
        if signals:
            self.signals += len(signals)
            self.sink([(SIGNAL_INSERT, signal_params(sig)) for sig in signals])

    def _risk_fill(self, fill: messages.Fill, now: int) -> None:
        """A `fill.*` event reaches risk (RiskService.on_event)."""
        if not self.engine.has_fill(fill.fill_id):
            self.desk.on_fill_event(fill.to_wire(), now)

    def _answers(self) -> None:
        """Answers the exchange gave without latency, delivered after the call that asked."""
        while self.exchange.now_answers:
            callback, raw = self.exchange.now_answers.pop(0)
            callback(raw)

    def _settle(self, now: int) -> None:
        """Risk's end of a loop turn: the calendar's phase (a Shabbat or Yom Tov pause), the
        breakers judge the latest marks and fills; state changes are stored (the outbox); a
        pause's flatten runs while one is due (RiskService._pause_turn)."""
        engine = self.engine
        engine.on_clock(now)
        engine.evaluate_due(now)
        for change in engine.take_changes():
            self.outbox.state_change(change)
            if self.ofi:  # risk.state, as the strategy hears it
                self._act(self.strategy.on_risk_state(change.state, now), now)
        while self._later:
            self._later.pop(0)()
        if self._flattening is None and now >= self._flatten_retry_ns and engine.flatten_due:
            self._pause_flatten(now)

    def _pause_flatten(self, now: int) -> None:
        """Cancels, then closing orders through risk's desk, as RiskService does before a pause."""
        self.pause_flattens += 1

        def done(_results: list[dict]) -> None:
            self._flattening = None
            self._flatten_retry_ns = self.clock.now + FLATTEN_RETRY_NS
            if self.engine.held_positions() or self.engine.working:
                self.pause_flatten_failures += 1
        self._flattening = FlattenJob(self.engine, self.desk.submit_order, self.desk.submit_cancel, self._later.append,
                                      now, done, id_prefix=f"{PAUSE_PREFIX}{now:x}")
        self._flattening.start()

    # -- gaps ---------------------------------------------------------------------------------

    def _note_gaps(self, t: int) -> None:
        """The router found a break in a symbol's update ids: named (the ids either side) and
        kept open until a book of the symbol is published again (a later snapshot resynced it)."""
        self._gaps_seen = self.router.stats["gaps"]
        for key in self.symbols:
            count = self.router.m.gaps.get(key, 0)
            if count > self._gap_counts.get(key, 0):
                self._gap_counts[key] = count
                sync = self.router.syncs.get(key)
                g = sync.last_gap if sync is not None else None
                if g is not None:
                    gap = Gap(key, t, g.prev_u, g.first_u)
                    self.gaps.append(gap)
                    self._open_gap[key] = gap

    def _book_seen(self, book: Book) -> None:
        gap = self._open_gap.pop(book.symbol, None) if self._open_gap else None
        if gap is not None:
            gap.repaired_at = book.update_id
        bad = self._open_bad.pop(book.symbol, None) if self._open_bad else None
        if bad is not None:
            bad.repaired_at, bad.repaired_ts = book.update_id, book.ts

    # -- bad messages ---------------------------------------------------------------------------

    def _note_bad(self, t: int) -> None:
        """The router refused a capture message (router.last_bad: where it was read, why): counted,
        listed, and when it cost its symbol the book, kept open (the messages that follow counted
        as skipped) until a book of the symbol is published again."""
        router = self.router
        count = router.stats["bad_messages"]
        self.bad_count += count - self._bad_seen
        self._bad_seen = count
        last = router.last_bad
        if last is None:
            return
        key = last.key
        sync = router.syncs.get(key) if key else None
        lost = (sync is not None and not sync.synced and router.m.books.get(key, 0) > 0
                and key not in self._open_bad and key not in self._open_gap)
        bad = BadEvent(last.where, key, last.reason, last.detail, t, book_lost=lost)
        if len(self.bad) < BAD_LISTED:
            self.bad.append(bad)
        if lost:
            self._open_bad[key] = bad

    def _skipping(self) -> None:
        self.skipped += 1
        for bad in self._open_bad.values():
            bad.skipped += 1

    # -- results ------------------------------------------------------------------------------

    def unrepaired(self) -> list[Gap]:
        return [g for g in self.gaps if g.repaired_at is None]

    def summary(self, seconds: float) -> dict:
        return self.figures.summary(
            self.records, self.orders, seconds, self.gaps, denied=self.denied,
            broker_orders=self.exchange.orders,
            open_orders=sum(1 for w in self.exchange.model.working.values() if w.order.is_open),
            risk_state=self.engine.state.value,
            positions={s: format(q, "f") for s, q in sorted(self.exchange.account.positions.items()) if q},
            first_ts=self.first_ns, last_ts=self.clock.now, bad_events=self.bad_count,
            bad_event_list=[b.as_dict(self.clock.now) for b in self.bad], skipped_messages=self.skipped,
            **self._pause_summary(), **self._strategy_summary())

    def _pause_summary(self) -> dict:
        """The Shabbat and Yom Tov pauses the capture's time crossed (nothing without a calendar)."""
        if self.engine.calendar is None:
            return {}
        return {"pause_flattens": self.pause_flattens, "pause_flatten_failures": self.pause_flatten_failures,
                "pause": self.engine.pause_view()}

    def _strategy_summary(self) -> dict:
        """The OFI strategy's own figures (nothing for the imbalance strategy: its summary is as it was)."""
        if not self.ofi:
            return {}
        return {"strategy": "ofi", "cancels": self.cancels, "signals": self.signals,
                "strategy_errors": self.strategy_errors, "strategy_stats": dict(self.strategy.stats),
                "rejections": dict(sorted(self.strategy.rejections.items()))}
