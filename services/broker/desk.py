"""The broker's desk: orders and cancels into the fill model, repeats answered once, commit-then-answer."""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import OrderedDict
from typing import Callable

import peewee as pw
import sqlite3

from services.broker import core, store
from services.broker.core import Account, Order
from services.broker.fill_model import ARRIVED, NOT_OPEN, FillModel, Update, lot_sizes
from services.broker.keeper import STORE_UNAVAILABLE, StoreKeeper
from services.broker.latency import LatencyModel
from services.broker.queue import make_queue_model
from services.broker.store import KnownIds
from services.broker.telemetry import DUPLICATES, FAILURES, FILLS, ORDERS, STORE_REFUSED, labelled
from shared import journal, messages, storage
from shared.aggregates import Aggregates
from shared.config import Config
from shared.enums import TERMINAL_STATUSES, OrderStatus
from shared.errors import StoreUnavailable
from shared.log import Deferred
from shared.journal import Journal
from shared.messages import Ack, Error, OrderRequest
from shared.money import quote_asset

log = logging.getLogger("qf.broker")

ACK_CACHE_MAX = 4096  # recent answers kept for Lazy Pirate retries; older ones come from the database
READ_ERRORS = (pw.PeeweeException, sqlite3.Error, OSError)
Events = list[tuple[str, messages.Message, dict | None]]  # (topic, message, its wire map when made already)
Waiter = tuple[list, float]  # (ROUTER envelope, perf_counter at receipt): opaque here, the shell's to answer
Reply = Callable[[Waiter, messages.Message], None]


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


class SeededIds:
    """Order ids as the broker makes them (uuid4-shaped hex), from a generator seeded by `seed`:
    the same run gives the same ids, so the fills table is the same byte for byte. `qf backtest`'s
    exchange and the broker in lock-step replay (QF_LOCKSTEP, seeded by QF_BROKER_SEED) use it."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def next(self) -> str:
        raw = bytearray(self._rng.getrandbits(128).to_bytes(16, "big"))
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        return raw.hex()


def rebuild(cfg: Config, journal_: Journal) -> tuple[FillModel, Account, Aggregates, KnownIds, int]:
    """Store what `journal_` holds, then rebuild the fill model (with the open orders), cash and
    positions, the per-symbol aggregates (read from their tables, or recomputed from the fills when
    those disagree: store.load_aggregates) and the known client_order_ids from the bound database:
    `(model, account, aggregates, known, fills counted)`. Raises peewee, sqlite3 or OS errors
    (nothing is built)."""
    # what an earlier run made durable but did not store goes in first: the state is read from SQLite
    recovered = journal_.catch_up()
    if recovered:
        log.warning("journal_recovered", extra={"records": recovered, "journal": journal_.path})
    b = cfg.broker
    latency = LatencyModel(b.latency_mode, b.latency_ms, b.latency_sigma, b.seed)
    model = FillModel(b.taker_fee, b.maker_fee, make_queue_model(b.queue_model, b.queue_power),
                      latency, b.fee_asset, cfg.md.symbols, lot_sizes(cfg))
    account, fills = store.load_account(b.start_cash)
    aggregates = store.load_aggregates()
    known = store.known_ids()
    for order, row in store.load_open():
        model.restore(order, row.arrival_ts, row.decision_mid, row.arrival_mid)
    log.info("rebuilt", extra={"fills": fills, "open_orders": len(model.working),
                               "cash": account.cash, "queue_model": model.queue.name, **latency.describe()})
    return model, account, aggregates, known, fills


class BrokerDesk:
    """Orders and cancels between the broker's clients and its fill model `model`, no sockets.

    The shell calls `place`/`cancel` per request, hands the model's updates to `process` (after
    `advance(now)`, books and trades), and `restore`s a rebuilt state after a freeze. Replies are
    deferred: an order is answered (through `reply(waiter, msg)`) once it reached the simulated
    exchange and was matched, after what it did is durable in the journal (`keeper`); then its
    fill.* and order.* events go to `publish(events)`. A repeated client_order_id never makes a
    second order: it waits for the one in flight, or gets the answer from the cache (`acks`),
    else from the database and the journal's unstored records. While the storage cannot take
    what a request needs, it is answered error STORE_UNAVAILABLE (`refuse`). Order ids come from
    `ids` (`OrderIds`, random, unless given: the lock-step broker passes `SeededIds`). `aggregates`:
    the per-symbol tallies as the database holds them (`rebuild`; empty for an empty database),
    kept beside the account: each record also stores the rows its fills changed."""

    def __init__(self, model: FillModel, account: Account, known: KnownIds, keeper: StoreKeeper, stats: dict,
                 clock: Callable[[], int], reply: Reply, publish: Callable[[Events], None],
                 ids: OrderIds | SeededIds | None = None, aggregates: Aggregates | None = None) -> None:
        self.model, self.account, self.known = model, account, known
        self.aggregates = aggregates if aggregates is not None else Aggregates()
        self.keeper, self.journal, self.health = keeper, keeper.journal, keeper.health
        self.stats, self.clock, self.reply, self.publish = stats, clock, reply, publish
        for key in ("orders", "fills", "rejects", "commit_failures", "store_refused"):
            stats.setdefault(key, 0)
        self.acks: OrderedDict[str, Ack] = OrderedDict()
        self.order_waiters: dict[str, list[Waiter]] = {}
        self.cancel_waiters: dict[int, Waiter] = {}
        self._tokens = 0
        self._order_ids = ids if ids is not None else OrderIds()
        self.later = Deferred(log)  # the per-order lines, written when the loop is idle (shared/log.py)

    def restore(self, model: FillModel, account: Account, aggregates: Aggregates, known: KnownIds) -> None:
        """The state rebuilt from the database (`rebuild`) after a freeze, keeping the books (the
        frozen model was shown every book meanwhile, its own doings thrown away)."""
        model.markets = self.model.markets
        self.model, self.account, self.aggregates, self.known = model, account, aggregates, known

    # -- repeats: the answer cache, the database, the journal ------------------------------

    def _stored_ack(self, client_order_id: str, reason: str | None = None) -> Ack | None:
        """The order's answer from the database and what the journal holds that the database
        does not yet, or None for an order the broker never had. Raises StoreUnavailable when
        the database cannot be read."""
        try:
            found = store.stored(client_order_id, journal.statements_of(self.journal.pending))
        except READ_ERRORS as exc:
            raise StoreUnavailable(f"{client_order_id} cannot be looked up: "
                                   f"{storage.problem(exc, self.keeper.db)}") from None
        if found is None:
            return None
        order, fills = found
        ack = core.ack_for(order, fills, order.updated_ts)
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
                                   f"{storage.problem(exc, self.keeper.db)}") from None

    def _remember(self, ack: Ack) -> None:
        self.acks[ack.client_order_id] = ack
        self.acks.move_to_end(ack.client_order_id)
        if len(self.acks) > ACK_CACHE_MAX:
            self.acks.popitem(last=False)

    # -- requests ---------------------------------------------------------------------------

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
                return self.refuse(waiter, now, str(exc))
        if known is not None:
            DUPLICATES.inc()
            return self.reply(waiter, known)
        if self.health.down:
            refusal = self.keeper.refusal()
            if refusal is not None:
                return self.refuse(waiter, now, refusal)
        self.known.add(coid)  # from here on it is in flight, then stored
        order_id = self._order_ids.next()
        try:
            quote_asset(req.symbol)
            order = Order.from_request(req, order_id, now)
            self.model.submit(order, now)
        except ValueError as exc:
            log.info("order_invalid", extra={"client_order_id": coid, "why": str(exc)})
            order = Order.rejected(req, order_id, now, core.BAD_ORDER)
            self.order_waiters[coid] = [waiter]
            self.process([Update(ARRIVED, coid, order)])
            return
        self.order_waiters[coid] = [waiter]

    def cancel(self, waiter: Waiter, client_order_id: str, now: int) -> None:
        """A cancel for an order held by the exchange takes effect after the latency; a finished
        one is answered now with reason "not open"; an unknown one with an Error UNKNOWN_ORDER;
        one the storage cannot decide now (unreadable, or an open order while nothing can be
        made durable) with an Error STORE_UNAVAILABLE."""
        try:
            self._cancel(waiter, client_order_id, now)
        except StoreUnavailable as exc:
            self.refuse(waiter, now, str(exc))

    def _cancel(self, waiter: Waiter, client_order_id: str, now: int) -> None:
        if self.health.frozen:
            known = self.acks.get(client_order_id) or self._stored_ack(client_order_id)
            if known is not None and known.status not in TERMINAL_STATUSES:
                raise StoreUnavailable(f"cannot cancel {client_order_id} now: {self.health.why}")
            return self.reply(waiter, dataclasses.replace(known, reason=core.NOT_OPEN) if known else
                              Error(ts=now, code="UNKNOWN_ORDER", text=client_order_id))
        self._tokens += 1
        if self.model.cancel(client_order_id, now, self._tokens):
            self.cancel_waiters[self._tokens] = waiter
            return
        known = self.acks.get(client_order_id)
        known = dataclasses.replace(known, reason=core.NOT_OPEN) if known else \
            self._stored_ack(client_order_id, core.NOT_OPEN)
        self.reply(waiter, known or Error(ts=now, code="UNKNOWN_ORDER", text=client_order_id))

    def refuse(self, waiter: Waiter, now: int, why: str) -> None:
        """Answer error STORE_UNAVAILABLE (retry later), counted."""
        self.stats["store_refused"] += 1
        STORE_REFUSED.inc()
        self.reply(waiter, Error(ts=now, code=STORE_UNAVAILABLE, text=why[:500]))

    # -- committing what the model did ---------------------------------------------------------

    def advance(self, now: int) -> None:
        """What became due in the model by `now` (orders arriving, cancels taking effect), processed."""
        self.process(self.model.advance(now))

    def process(self, updates: list[Update]) -> None:
        """Make `updates` durable (one journal record), then reply to whoever waits and publish;
        the rows go into SQLite later (StoreKeeper.store). When the journal refuses the record,
        nobody is told of it: see `_freeze`."""
        if not updates or self.health.frozen:  # frozen: what the model does is thrown away (see _freeze)
            return
        changes = store.changes_of(updates)
        if changes:
            try:
                done = store.batch(changes, self.account, self.model.marks(), self.aggregates)
                self.journal.append(done.statements)
                self.account, self.aggregates = done.account, done.aggregates
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
                    self.reply(waiter, ack)
            if u.cancel_token is not None:
                self._answer_cancel(u, ack)
            told.append((u, wires))
        events: Events = []
        for u, wires in told:
            self._account(u, wires, events)
        self.publish(events)

    def _freeze(self, why: str, exc: BaseException) -> None:
        """The journal refused a record: nothing can be made durable. The model, ahead of what
        is durable, stops (books are only kept) until the probe rebuilds it from the database;
        whoever waits for an order or a cancel is answered STORE_UNAVAILABLE now (an order in
        flight was never stored nor announced: its retry is a new order)."""
        self.keeper.outage(why, exc, frozen=True)
        now = self.clock()
        waiting = [w for ws in self.order_waiters.values() for w in ws] + list(self.cancel_waiters.values())
        self.order_waiters.clear()
        self.cancel_waiters.clear()
        for waiter in waiting:
            self.refuse(waiter, now, f"the broker cannot make orders durable: {why}; retry later")

    def _after_commit(self, u: Update) -> tuple[Ack, list[dict]]:
        """The answer for `u` (remembered for retries) and its fills' wire maps."""
        order, fills = u.order, u.fills
        wires = [f.to_wire() for f in fills]  # the fill.* events' maps; the ack reuses each Fill's (wire_body)
        prior = self.acks.get(order.client_order_id)
        if prior is None and order.fill_count > len(fills):
            try:
                ack = self._stored_ack(order.client_order_id)  # earlier fills fell out of the cache
            except StoreUnavailable:  # durable already: answered with this update's fills only, not cached
                ack = None
            if ack is None:
                ack = core.ack_for(order, fills, order.updated_ts)
        else:
            ack = core.ack_for(order, [*(prior.fills if prior is not None else ()), *fills], order.updated_ts)
            self._remember(ack)
        return ack, wires

    def _account(self, u: Update, wires: list[dict], events: Events) -> None:
        """Count what `u` did, queue its fill.* and order.* events, log it."""
        order, fills = u.order, u.fills
        if u.event == ARRIVED:
            self.stats["orders"] += 1
        self.stats["fills"] += len(fills)
        for f in fills:
            labelled(FILLS, f.liquidity.value).inc()
        labelled(ORDERS, order.status.value).inc()
        if order.status is OrderStatus.REJECTED:
            self.stats["rejects"] += 1
        # Fills before the order's new status: risk drops a working order on its
        # terminal event, so it over-counts exposure for a moment instead of under-counting.
        events.extend((f"fill.{order.symbol}", f, w) for f, w in zip(fills, wires))
        events.append((f"order.{order.symbol}", core.order_event(order, order.updated_ts), None))
        if log.isEnabledFor(logging.INFO):  # the fields (avg_price divides) cost more than the line at WARNING
            self.later.info("order", {"step": u.event, "order_id": order.order_id,
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
                return self.refuse(waiter, self.clock(), str(exc))
        self.reply(waiter, ack or Error(ts=self.clock(), code="UNKNOWN_ORDER", text=u.client_order_id))
