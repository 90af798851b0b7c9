"""Broker service shell: ROUTER for orders and cancels, SUB books and trades, PUB orders and fills, SQLite writes."""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable

import msgpack
import peewee as pw
import sqlite3
import zmq
from prometheus_client import Counter, Gauge, Histogram

from services.broker import core, store
from services.broker.core import Order
from services.broker.fill_model import ARRIVED, NOT_OPEN, FillModel, Update
from services.broker.latency import LatencyModel
from services.broker.outage import StoreHealth
from services.broker.queue import make_queue_model
from shared import messages, storage
from shared.alerts import Alerter
from shared.bus import NOBLOCK, Publisher, Server, Subscriber, readable
from shared import journal
from shared.config import Config
from shared.db import database, init_db
from shared.enums import TERMINAL_STATUSES, OrderStatus
from shared.errors import ConfigError, DecodeError, FatalError
from shared.messages import Ack, Book, Cancel, Error, OrderRequest, Trade
from shared.journal import Journal, JournalBusy
from shared.runtime import HeartbeatMaker, Liveness, MicrosHistogram, Ticker

log = logging.getLogger("qf.broker")

ORDERS = Counter("qf_broker_orders_total", "Order changes committed, by resulting status", ["status"])
FILLS = Counter("qf_broker_fills_total", "Fills committed, by liquidity", ["liquidity"])
DUPLICATES = Counter("qf_broker_duplicates_total", "Repeated client_order_id answered without a new order")
BAD_FRAMES = Counter("qf_broker_decode_errors_total", "Frames that were not valid messages", ["source"])
BAD_MD = Counter("qf_broker_bad_market_data_total", "Books and trades refused as untrustworthy (market.py), by reason",
                 ["reason"])
MD_LOG_S = 1.0  # at most one log line a second about refused market data (a bad feed repeats itself)
FAILURES = Counter("qf_broker_request_failures_total", "Messages or commits that failed inside the broker")
STORE_AVAILABLE = Gauge("qf_broker_store_available", "1 while the broker's journal and database take writes, "
                        "0 during a storage outage (see docs/fill-model.md)")
STORE_REFUSED = Counter("qf_broker_store_refusals_total", "Requests answered with error STORE_UNAVAILABLE")
ACK_SECONDS = Histogram("qf_broker_request_seconds", "Request received to reply sent, simulated latency included",
                        buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5))

POLL_MS = 100  # longest loop turn; bounds how long stop() takes
DRAIN_MAX = 1000  # messages per socket per turn, so one busy socket cannot starve the other
ACK_CACHE_MAX = 4096  # recent answers kept for Lazy Pirate retries; older ones come from the database
GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)
# Journal records are stored into SQLite once the broker has been idle this long (between orders,
# off every answer's path), or when this many wait, or the oldest has waited this long. Storing
# right after each answer instead competes with the rest of the round trip for the 2 cores
# (+140 µs at the median in the risk benchmark); bigger batches make the order that waits for one slower.
STORE_IDLE_MS, STORE_RECORDS, STORE_AGE_S = 1, 8, 0.01
# After a failed write the storage is probed (services/broker/outage.py) with a backoff; the
# records stay in the journal meanwhile. STORE_UNAVAILABLE is the alert's code and the answer's.
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
# Risk's start-up recovery holds the journal for milliseconds; a broker started beside it (as `qf up`
# and compose do) waits that long before it concludes another broker runs (exit 2, not restarted).
JOURNAL_BUSY_WAIT_S = 3.0
READ_ERRORS = (pw.PeeweeException, sqlite3.Error, OSError)


def _fill_map(wire: dict) -> dict:
    """A fill's wire map as carried in `Ack.fills` (core.fill_dict: without `v` and `type`)."""
    out = dict(wire)
    del out["v"], out["type"]
    return out


class OrderIds:
    """Random order ids, as uuid.uuid4().hex makes them, from the kernel's random bytes fetched
    4 KiB at a time (uuid4 asks for 16 bytes, a getrandom system call, per order)."""

    def __init__(self) -> None:
        self._buf, self._pos = b"", 0

    def next(self) -> str:
        if self._pos >= len(self._buf):
            self._buf, self._pos = os.urandom(4096), 0
        raw = bytearray(self._buf[self._pos:self._pos + 16])
        self._pos += 16
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4, as uuid.UUID(bytes=raw, version=4) sets it
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        return raw.hex()


_CHILDREN: dict = {}


def _counter(metric, label: str):
    """`metric.labels(label)`, kept: labels() costs a lock and a lookup per call."""
    child = _CHILDREN.get((metric, label))
    if child is None:
        child = _CHILDREN[(metric, label)] = metric.labels(label)
    return child


class StoreUnavailable(Exception):
    """An answer the broker cannot give now: its storage cannot be read, or cannot take the
    writes the request needs. Answered with error STORE_UNAVAILABLE (retry later)."""


Events = list[tuple[str, messages.Message, dict | None]]  # (topic, message, its wire map when made already)
Waiter = tuple[list, float]  # (ROUTER envelope, perf_counter at receipt)


class BrokerService:
    """The paper broker. `BrokerService(cfg)` opens the database, rebuilds cash,
    positions and open orders from it and binds its sockets; `run()` blocks
    until `stop()`; then sockets and the database are closed.

    Replies are deferred: an order is answered once it has reached the simulated
    exchange and been matched (after the entry latency), with the fills it got
    there, after they are committed; a cancel once it took effect."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        self.clock = clock
        self.acks: OrderedDict[str, Ack] = OrderedDict()
        self.order_waiters: dict[str, list[Waiter]] = {}
        self.cancel_waiters: dict[int, Waiter] = {}
        self._tokens = 0
        self._md_log = [0.0, 0]  # monotonic time of the last line about bad market data, lines held back since
        self.stats = {"orders": 0, "fills": 0, "rejects": 0, "decode_errors": 0, "commit_failures": 0,
                      "store_failures": 0, "snapshot_failures": 0, "store_refused": 0}
        self.ack_us = MicrosHistogram()  # request read to reply sent (simulated latency included), for heartbeats
        self._order_ids = OrderIds()
        self._stop = threading.Event()
        self._closed = False
        path = journal.journal_path(cfg.common.db, cfg.common.run_dir)
        try:
            self.journal = Journal(path, wait_s=JOURNAL_BUSY_WAIT_S)
        except JournalBusy as exc:
            raise ConfigError(f"{exc}: one broker per database (QF_DB)") from None
        self._oldest = 0.0  # monotonic time the oldest unstored journal record was appended
        self.health = StoreHealth()
        try:
            try:
                init_db(cfg.common.db)
                self._load()
            except READ_ERRORS as exc:  # e.g. a full disk refusing what the journal holds: `qf up` retries
                raise FatalError(f"cannot bring {cfg.common.db} up to date: "
                                 f"{storage.problem(exc, cfg.common.db)}") from None
            database.close()  # run() may be on another thread; it opens its own connection
            self.liveness = Liveness(cfg.common.run_dir, "broker")
        except BaseException:
            self.journal.close()
            raise
        self.server = Server(cfg.bus.broker_rep, ctx)
        self.md = Subscriber(cfg.bus.md_pub, ["book.", "trade."], cfg.bus.hwm, ctx)
        self.pub = Publisher(cfg.bus.broker_pub, cfg.bus.hwm, ctx)
        self.alerts = Alerter("broker", self.pub.publish)
        STORE_AVAILABLE.set(1)
        self.heartbeat = HeartbeatMaker("broker")
        self.ticker = Ticker(cfg.bus.heartbeat_ms)
        self.equity_ticker = Ticker(int(cfg.broker.equity_s * 1000))
        self.checkpointer = store.Checkpointer(cfg.common.db)

    @property
    def books(self) -> dict[str, Book]:
        """The latest book per symbol."""
        return {s: m.book for s, m in self.model.markets.items()}

    @property
    def open(self) -> dict[str, Order]:
        """Open orders that have reached the book, by client_order_id."""
        return {c: w.order for c, w in self.model.working.items() if w.arrival_ts is not None}

    # -- state from the database ----------------------------------------------------

    def _load(self) -> None:
        """Store what the journal holds, then rebuild the model, cash and positions from the
        database (all or nothing: on an error nothing is replaced). Raises peewee, sqlite3 or OS errors."""
        # what an earlier run made durable but did not store goes in first: the state is read from SQLite
        recovered = self.journal.catch_up()
        if recovered:
            log.warning("journal_recovered", extra={"records": recovered, "journal": self.journal.path})
        b = self.cfg.broker
        latency = LatencyModel(b.latency_mode, b.latency_ms, b.latency_sigma, b.seed)
        model = FillModel(b.taker_fee, b.maker_fee, make_queue_model(b.queue_model, b.queue_power),
                          latency, b.fee_asset, self.cfg.md.symbols)
        account, fills = store.load_account(b.start_cash)
        known = store.known_ids()
        for order, row in store.load_open():
            model.restore(order, row.arrival_ts, row.decision_mid, row.arrival_mid)
        self.model, self.account, self.known = model, account, known
        self.stats["fills"] = fills
        log.info("rebuilt", extra={"fills": fills, "open_orders": len(model.working),
                                   "cash": account.cash, "queue_model": model.queue.name, **latency.describe()})

    def _reload(self) -> None:
        """After a failed journal write the model is ahead of what is durable: rebuild it from
        the database, keeping the books (the frozen model was shown every book meanwhile, its
        own doings thrown away). Raises like `_load` (the frozen model stays; the next probe
        tries again)."""
        markets = self.model.markets
        self._load()
        self.model.markets = markets

    def _stored_ack(self, client_order_id: str, reason: str | None = None) -> Ack | None:
        """The order's answer from the database and what the journal holds that the database
        does not yet, or None for an order the broker never had. Raises StoreUnavailable when
        the database cannot be read."""
        try:
            found = store.stored(client_order_id, journal.statements_of(self.journal.pending))
        except READ_ERRORS as exc:
            raise StoreUnavailable(f"{client_order_id} cannot be looked up: "
                                   f"{storage.problem(exc, self.cfg.common.db)}") from None
        if found is None:
            return None
        order, fills = found
        ack = core.ack_for(order, map(core.fill_dict, fills), order.updated_ts)
        self._remember(ack)
        return ack if reason is None else dataclasses.replace(ack, reason=reason)

    def _is_stored(self, client_order_id: str) -> bool:
        """Whether the broker has the order: in the database (one indexed lookup) or in the
        journal's unstored records. Raises StoreUnavailable when the database cannot be read."""
        try:
            return store.exists(client_order_id) or (
                bool(self.journal.pending) and store.inserts(client_order_id,
                                                             journal.statements_of(self.journal.pending)))
        except READ_ERRORS as exc:
            raise StoreUnavailable(f"{client_order_id} cannot be looked up: "
                                   f"{storage.problem(exc, self.cfg.common.db)}") from None

    def _remember(self, ack: Ack) -> None:
        self.acks[ack.client_order_id] = ack
        self.acks.move_to_end(ack.client_order_id)
        if len(self.acks) > ACK_CACHE_MAX:
            self.acks.popitem(last=False)

    # -- requests ---------------------------------------------------------------------

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
            return self._reply(waiter, Error(ts=now, code=exc.reason, text=exc.detail))
        if isinstance(req, OrderRequest):
            self.place(waiter, req, now)
        elif isinstance(req, Cancel):
            try:
                self.cancel(waiter, req.client_order_id, now)
            except StoreUnavailable as exc:
                self._refuse(waiter, now, str(exc))
        else:
            self.stats["decode_errors"] += 1
            BAD_FRAMES.labels("request").inc()
            self._reply(waiter, Error(ts=now, code="unexpected_type", text=req.TYPE))

    def place(self, waiter: Waiter, req: OrderRequest, now: int) -> None:
        """A new order goes in flight; a known client_order_id gets its order's answer (never a
        second order); while the broker could not make a new order durable, a new one is
        refused with error STORE_UNAVAILABLE (nothing of it is kept: its retry is a new order)."""
        coid = req.client_order_id
        known = self.acks.get(coid)
        if known is None and not self.health.frozen and self.model.in_flight(coid):
            DUPLICATES.inc()
            self.order_waiters[coid].append(waiter)
            return
        if known is None and self.known.maybe(coid):
            # maybe stored: looked up in the database and the journal's unstored records; if the
            # database cannot be read, the order might be a repeat: refused (its retry comes later),
            # never run twice
            try:
                if self._is_stored(coid):
                    known = self._stored_ack(coid)
            except StoreUnavailable as exc:
                return self._refuse(waiter, now, str(exc))
        if known is not None:
            DUPLICATES.inc()
            return self._reply(waiter, known)
        if self.health.down:
            refusal = self.health.refusal(len(self.journal.pending))
            if refusal is not None:
                return self._refuse(waiter, now, refusal)
        self.known.add(coid)  # from here on it is in flight, then stored
        order_id = self._order_ids.next()
        try:
            core.quote_asset(req.symbol)
            order = Order.from_request(req, order_id, now)
            self.model.submit(order, now)
        except ValueError as exc:
            log.info("order_invalid", extra={"client_order_id": coid, "why": str(exc)})
            order = Order.rejected(req, order_id, now, core.BAD_ORDER)
            self.order_waiters[coid] = [waiter]
            self._process([Update(ARRIVED, coid, order)])
            return
        self.order_waiters[coid] = [waiter]

    def cancel(self, waiter: Waiter, client_order_id: str, now: int) -> None:
        """A cancel for an order held by the exchange takes effect after the latency;
        a finished one is answered now with reason "not open"; an unknown one with an Error.
        Raises StoreUnavailable for an open order while nothing can be made durable."""
        if self.health.frozen:
            known = self.acks.get(client_order_id) or self._stored_ack(client_order_id)
            if known is not None and known.status not in TERMINAL_STATUSES:
                raise StoreUnavailable(f"cannot cancel {client_order_id} now: {self.health.why}")
            return self._reply(waiter, dataclasses.replace(known, reason=core.NOT_OPEN) if known else
                               Error(ts=now, code="UNKNOWN_ORDER", text=client_order_id))
        self._tokens += 1
        if self.model.cancel(client_order_id, now, self._tokens):
            self.cancel_waiters[self._tokens] = waiter
            return
        known = self.acks.get(client_order_id)
        known = dataclasses.replace(known, reason=core.NOT_OPEN) if known else \
            self._stored_ack(client_order_id, core.NOT_OPEN)
        self._reply(waiter, known or Error(ts=now, code="UNKNOWN_ORDER", text=client_order_id))

    # -- committing what the model did -------------------------------------------------------

    def _process(self, updates: list[Update]) -> None:
        """Make `updates` durable (one journal record), then reply to whoever waits and publish;
        the rows go into SQLite later (`_store_journal`). When the journal refuses the record,
        nobody is told of it: see `_freeze`."""
        if not updates or self.health.frozen:  # frozen: what the model does is thrown away (see _freeze)
            return
        changes = []
        for u in updates:
            if u.event != NOT_OPEN:
                w = u.working
                changes.append(store.Change(u.order, u.event == ARRIVED, u.fills,
                                            w.arrival_ts if w else None, w.decision_mid if w else None,
                                            w.arrival_mid if w else None))
        if changes:
            try:
                statements, account = store.statements(changes, self.account, self.model.marks())
                if not self.journal.pending:
                    self._oldest = time.monotonic()
                self.journal.append(statements)
                self.account = account
            except Exception as exc:
                # nothing was made durable, so nothing is told; the model is rebuilt from the database
                FAILURES.inc()
                self.stats["commit_failures"] += 1
                self._freeze(f"cannot write {self.journal.path}: {storage.problem(exc)}", exc)
                return
        told = []
        for u in updates:  # the answers first: counters, events and log lines wait until they are sent
            if u.event == NOT_OPEN:
                self._answer_cancel(u, None)
                continue
            ack, wires = self._after_commit(u)
            if u.event == ARRIVED:
                for waiter in self.order_waiters.pop(u.client_order_id, ()):
                    self._reply(waiter, ack)
            if u.cancel_token is not None:
                self._answer_cancel(u, ack)
            told.append((u, wires))
        events: Events = []
        for u, wires in told:
            self._account(u, wires, events)
        self._publish(events)

    def _after_commit(self, u: Update) -> tuple[Ack, list[dict]]:
        """The answer for `u` (remembered for retries) and its fills' wire maps."""
        order, fills = u.order, u.fills
        wires = [f.to_wire() for f in fills]  # once: the ack's fill maps, then the fill.* events
        prior = self.acks.get(order.client_order_id)
        if prior is None and order.fill_count > len(fills):
            try:
                ack = self._stored_ack(order.client_order_id)  # earlier fills fell out of the cache
            except StoreUnavailable:  # durable already: answered with this update's fills only, not cached
                ack = None
            if ack is None:
                ack = core.ack_for(order, map(_fill_map, wires), order.updated_ts)
        else:
            maps = [*(prior.fills if prior is not None else ()), *map(_fill_map, wires)]
            ack = core.ack_for(order, maps, order.updated_ts)
            self._remember(ack)
        return ack, wires

    def _account(self, u: Update, wires: list[dict], events: Events) -> None:
        """Count what `u` did, queue its fill.* and order.* events, log it."""
        order, fills = u.order, u.fills
        if u.event == ARRIVED:
            self.stats["orders"] += 1
        self.stats["fills"] += len(fills)
        for f in fills:
            _counter(FILLS, f.liquidity.value).inc()
        _counter(ORDERS, order.status.value).inc()
        if order.status is OrderStatus.REJECTED:
            self.stats["rejects"] += 1
        # Fills before the order's new status: risk drops a working order on its
        # terminal event, so it over-counts exposure for a moment instead of under-counting.
        events.extend((f"fill.{order.symbol}", f, w) for f, w in zip(fills, wires))
        events.append((f"order.{order.symbol}", core.order_event(order, order.updated_ts), None))
        if log.isEnabledFor(logging.INFO):  # the fields (avg_price divides) cost more than the line at WARNING
            log.info("order", extra={"step": u.event, "order_id": order.order_id,
                                     "client_order_id": order.client_order_id, "status": order.status.value,
                                     "filled_qty": order.filled_qty, "avg_price": order.avg_price,
                                     "fills": len(fills), "reason": order.reason})

    def _answer_cancel(self, u: Update, ack: Ack | None) -> None:
        waiter = self.cancel_waiters.pop(u.cancel_token, None)
        if waiter is None:
            return
        if ack is None:  # the order finished before the cancel arrived
            known = self.acks.get(u.client_order_id)
            try:
                ack = dataclasses.replace(known, reason=core.NOT_OPEN) if known else \
                    self._stored_ack(u.client_order_id, core.NOT_OPEN)
            except StoreUnavailable as exc:
                return self._refuse(waiter, self.clock(), str(exc))
        self._reply(waiter, ack or Error(ts=self.clock(), code="UNKNOWN_ORDER", text=u.client_order_id))

    # -- loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); closes sockets and the database on the way out."""
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        poller.register(self.md.sock, zmq.POLLIN)
        if threading.current_thread() is threading.main_thread():  # the broker process itself, not a test
            # As in risk: what start-up built is frozen, and the cycle collector runs rarely
            # (at Python's default, a young-generation pass every ~700 allocations).
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_THRESHOLD, 20, 100)
        poll, health = poller.poll, self.health
        try:
            database.connect(reuse_if_open=True)
            self.checkpointer.start()
            while not self._stop.is_set():
                ready = dict(poll(self._timeout_ms()))
                if not ready:
                    self._guarded(lambda: self._store_journal(idle=True))
                if self.md.sock in ready:
                    self._drain_md()
                if self.server.sock in ready:
                    self._drain_requests()
                self._guarded(lambda: self._process(self.model.advance(self.clock())))
                if self.journal.pending:
                    self._guarded(self._store_journal)
                if health.down and health.probe_due(time.monotonic()):
                    self._guarded(self._probe)
                if self.equity_ticker.due() and not health.down:
                    self._guarded(self._snapshot)
                if self.ticker.due():
                    self._beat()
        finally:
            self.close()
            log.info("stopped", extra={"orders": self.stats["orders"], "fills": self.stats["fills"]})

    def _timeout_ms(self) -> int:
        if self.health.down:  # no idle store: the probe is the next try
            wait = min(POLL_MS, int(self.health.wait_s(time.monotonic()) * 1000) + 1)
        else:
            wait = STORE_IDLE_MS if self.journal.pending else POLL_MS
        due = self.model.next_due()
        if due is None:
            return wait
        return max(0, min(wait, -(-(due - self.clock()) // 1_000_000)))

    def _store_journal(self, force: bool = False, idle: bool = False) -> bool:
        """Store the journal's records into SQLite in one transaction when `force`d, when the
        loop was `idle`, or when enough wait or the oldest waited long enough (during a storage
        outage only when forced: the probe's turn). Returns whether nothing is left unstored. A
        failure leaves the records in the journal and starts (or extends) an outage."""
        pending = self.journal.pending
        if not pending:
            return True
        if not force and (self.health.down or not (
                idle or len(pending) >= STORE_RECORDS or time.monotonic() - self._oldest >= STORE_AGE_S)):
            return False
        try:
            self.journal.applied(journal.store(pending))
            return True
        except Exception as exc:
            FAILURES.inc()
            self.stats["store_failures"] += 1
            self._outage(f"cannot store the journal into {self.cfg.common.db}: "
                         f"{storage.problem(exc, self.cfg.common.db)}", exc)
            return False

    # -- storage outages (docs/fill-model.md, "Disk full") ---------------------------------------

    def _refuse(self, waiter: Waiter, now: int, why: str) -> None:
        self.stats["store_refused"] += 1
        STORE_REFUSED.inc()
        self._reply(waiter, Error(ts=now, code=STORE_UNAVAILABLE, text=why[:500]))

    def _outage(self, why: str, exc: BaseException | None, frozen: bool = False) -> None:
        """A write failed: start an outage (logged with its traceback, alerted once) or note one
        more failure of the current one (counted by the alert; logged when it reminds)."""
        started = self.health.fail(why, time.monotonic(), frozen)
        if started:
            STORE_AVAILABLE.set(0)
            log.error("store_unavailable", exc_info=exc, extra={"why": why, "frozen": frozen,
                                                                 "journal_pending": len(self.journal.pending)})
        text = f"broker: {why}" + ("; new orders are refused until it can write" if self.health.frozen else "")
        if self.alerts.raise_(STORE_UNAVAILABLE, text) and not started:
            log.warning("store_still_unavailable", extra={"why": why, "down_s": round(self.health.down_s(
                time.monotonic()), 1), "journal_pending": len(self.journal.pending)})

    def _freeze(self, why: str, exc: BaseException) -> None:
        """The journal refused a record: nothing can be made durable. The model, ahead of what
        is durable, stops (books are only kept) until the probe rebuilds it from the database;
        whoever waits for an order or a cancel is answered STORE_UNAVAILABLE now (an order in
        flight was never stored nor announced: its retry is a new order)."""
        self._outage(why, exc, frozen=True)
        now = self.clock()
        waiting = [w for ws in self.order_waiters.values() for w in ws] + list(self.cancel_waiters.values())
        self.order_waiters.clear()
        self.cancel_waiters.clear()
        for waiter in waiting:
            self._refuse(waiter, now, f"the broker cannot make orders durable: {why}; retry later")

    def _probe(self) -> None:
        """Try the storage again: room for a burst of writes beside the journal, a record through
        the journal into the database (stores what waits), the model rebuilt when frozen. Ends
        the outage when all of that worked (the alert resolved), else backs off."""
        why = None
        room = storage.has_room(os.path.dirname(os.path.abspath(self.journal.path)))
        if room is not None:
            why = f"no room for writes beside {self.journal.path}: {storage.problem(room)}"
        else:
            try:
                if not self.journal.pending:
                    self._oldest = time.monotonic()
                self.journal.append([])  # a record of nothing: the journal and the database take a write
            except OSError as exc:
                why = f"cannot write {self.journal.path}: {storage.problem(exc)}"
        if why is None:
            try:
                self.journal.applied(journal.store(self.journal.pending))
                if self.health.frozen:
                    self._reload()
            except Exception as exc:
                why = f"cannot store the journal into {self.cfg.common.db}: {storage.problem(exc, self.cfg.common.db)}"
        now = time.monotonic()
        if why is not None:
            self.health.probe_failed(why, now)
            self._outage(why, None)
            return
        lasted = self.health.recover(now)
        STORE_AVAILABLE.set(1)
        log.warning("store_recovered", extra={"down_s": round(lasted, 3), "probes": self.health.probes})
        self.alerts.resolve(STORE_UNAVAILABLE, "broker: the journal and the database take writes again; "
                                               "new orders are taken")

    def _snapshot(self) -> None:
        try:
            store.snapshot(self.clock(), self.account, self.model.marks())
        except Exception as exc:
            self.stats["snapshot_failures"] += 1
            self._outage(f"cannot write an equity snapshot into {self.cfg.common.db}: "
                         f"{storage.problem(exc, self.cfg.common.db)}", exc)

    def _drain_md(self) -> None:
        # Everything waiting is applied first and committed once (group commit): a
        # burst costs one transaction, and nothing is published before it is durable.
        updates: list[Update] = []
        for i in range(DRAIN_MAX):
            if i == 1 and not readable(self.md.sock):
                break
            try:
                _topic, msg = self.md.recv(NOBLOCK)
            except zmq.Again:
                break
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("md").inc()
                self._log_bad_md("bad_md_frame", exc.reason, exc.detail)
                continue
            if isinstance(msg, Book):
                self._guarded(lambda: updates.extend(self.model.on_book(msg, self.clock())))
            elif isinstance(msg, Trade):
                self._guarded(lambda: updates.extend(self.model.on_trade(msg, self.clock())))
        self._guarded(lambda: self._process(updates))
        refused, last = self.model.refusals()
        if refused:
            for reason, n in refused.items():
                _counter(BAD_MD, reason).inc(n)
            self.stats["bad_market_data"] = self.stats.get("bad_market_data", 0) + sum(refused.values())
            self._log_bad_md("market_data_refused", last.reason, last.detail)

    def _log_bad_md(self, event: str, code: str, detail: str) -> None:
        """One warning line a second at most (MD_LOG_S), saying how many were held back before it."""
        now, state = time.monotonic(), self._md_log
        if now - state[0] < MD_LOG_S:
            state[1] += 1
            return
        log.warning(event, extra={"code": code, "detail": detail[:120], "held_back": state[1]})
        state[0], state[1] = now, 0

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
        self._guarded(lambda: self._process(self.model.advance(self.clock())))

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
        self.server.reply(waiter[0], messages.encode(msg))
        took = time.perf_counter() - waiter[1]
        ACK_SECONDS.observe(took)
        self.ack_us.record_ns(int(took * 1e9))

    def _publish(self, events: Events) -> None:
        pub = self.pub
        for topic, msg, wire in events:
            if wire is None:
                pub.publish(topic, msg)
            else:  # what publish() sends, from the wire map made for the ack
                pub.send_raw(topic.encode(), msgpack.packb({**wire, "seq": pub.next_seq(topic)}, use_bin_type=True))

    def _beat(self) -> None:
        health = self.health
        stats = {**self.stats, "open": len(self.open), "in_flight": self.model.pending,
                 "journal_pending": len(self.journal.pending),
                 "store": ("frozen" if health.frozen else "unavailable") if health.down else "ok",
                 "store_down_s": round(health.down_s(time.monotonic()), 3), "store_outages": health.outages,
                 "checkpoint_failures": self.checkpointer.failures,
                 "feed_lag_ms": self.model.latency.describe()["feed_lag_ms"],
                 "equity": str(self.account.equity(self.model.marks())), **self.ack_us.stats("ack")}
        self.pub.publish("heartbeat.broker", self.heartbeat.make("store_unavailable" if health.down else "ok", stats))
        self.liveness.touch()  # never raises: a full disk must not stop the loop

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Close sockets and this thread's database connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._guarded(lambda: self._store_journal(force=True))  # what is left stays in the journal
        self.checkpointer.stop()
        for sock in (self.server, self.md, self.pub):
            sock.close()
        database.close()
        self.journal.close()
