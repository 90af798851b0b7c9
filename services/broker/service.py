"""Broker service shell: ROUTER for orders and cancels, SUB books, PUB orders and fills, SQLite writes."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from decimal import Decimal
from typing import Callable

import peewee as pw
import zmq
from prometheus_client import Counter, Histogram

from services.broker import core
from services.broker.core import Account, Order
from shared import messages
from shared.bus import Publisher, Server, Subscriber
from shared.config import Config
from shared.db import EquitySnapshot, FillRow, OrderRow, database, init_db, insert_rows
from shared.enums import OPEN_STATUSES, OrderKind, OrderStatus, Side, TimeInForce
from shared.errors import DecodeError
from shared.messages import Ack, Book, Cancel, Error, Fill, OrderRequest
from shared.runtime import HeartbeatMaker, Liveness, Ticker

log = logging.getLogger("qf.broker")

ORDERS = Counter("qf_broker_orders_total", "Orders answered, by resulting status", ["status"])
FILLS = Counter("qf_broker_fills_total", "Fills committed")
DUPLICATES = Counter("qf_broker_duplicates_total", "Repeated client_order_id answered from storage")
BAD_FRAMES = Counter("qf_broker_decode_errors_total", "Frames that were not valid messages", ["source"])
FAILURES = Counter("qf_broker_request_failures_total", "Requests that failed inside the broker")
HANDLE_SECONDS = Histogram("qf_broker_request_seconds", "Time to answer one request, commit included",
                           buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25))

POLL_MS = 100  # loop turn; bounds how long stop() takes
DRAIN_MAX = 1000  # messages per socket per turn, so one busy socket cannot starve the other
ACK_CACHE_MAX = 4096  # recent answers kept for Lazy Pirate retries; older ones come from the database

Events = list[tuple[str, messages.Message]]


def _order_fields(order: Order) -> dict:
    return dict(order_id=order.order_id, client_order_id=order.client_order_id, strategy=order.strategy,
                symbol=order.symbol, side=order.side.value, kind=order.kind.value, tif=order.tif.value,
                qty=order.qty, price=order.price, status=order.status.value, filled_qty=order.filled_qty,
                avg_price=order.avg_price, reason=order.reason, created_ts=order.created_ts,
                updated_ts=order.updated_ts)


def _fill_fields(fill: Fill, mid: Decimal | None) -> dict:
    return dict(fill_id=fill.fill_id, order_id=fill.order_id, client_order_id=fill.client_order_id,
                symbol=fill.symbol, side=fill.side.value, price=fill.price, qty=fill.qty, fee=fill.fee,
                fee_asset=fill.fee_asset, liquidity=fill.liquidity.value, exch_ts=fill.exch_ts, ts=fill.ts,
                mid_at_fill=mid)


def _fill_from_row(row: FillRow) -> Fill:
    return Fill(ts=row.ts, fill_id=row.fill_id, order_id=row.order_id, client_order_id=row.client_order_id,
                symbol=row.symbol, side=Side(row.side), price=row.price, qty=row.qty, fee=row.fee,
                fee_asset=row.fee_asset, liquidity=row.liquidity, exch_ts=row.exch_ts)


def _order_from_row(row: OrderRow, fills: list[FillRow]) -> Order:
    order = Order(order_id=row.order_id, client_order_id=row.client_order_id, strategy=row.strategy,
                  symbol=row.symbol, side=Side(row.side), kind=OrderKind(row.kind), tif=TimeInForce(row.tif),
                  qty=row.qty, price=row.price, created_ts=row.created_ts, status=OrderStatus(row.status),
                  filled_qty=row.filled_qty, reason=row.reason, updated_ts=row.updated_ts)
    order.notional = sum((f.price * f.qty for f in fills), core.ZERO)
    order.fill_count = len(fills)
    return order


class BrokerService:
    """The paper broker. `BrokerService(cfg)` opens the database, rebuilds cash,
    positions and open orders from it and binds its sockets; `run()` blocks
    until `stop()`; then sockets and the database are closed."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        self.clock = clock
        self.fee_rate = cfg.broker.taker_fee
        self.account = Account(cfg.broker.start_cash)
        self.open: dict[str, Order] = {}  # client_order_id -> open (resting) order
        self.acks: OrderedDict[str, Ack] = OrderedDict()
        self.books: dict[str, Book] = {}
        self.taken: dict[tuple[str, Side], dict[Decimal, Decimal]] = {}  # see core.unconsumed
        self.stats = {"orders": 0, "fills": 0, "rejects": 0, "decode_errors": 0}
        self._stop = threading.Event()
        self._closed = False
        init_db(cfg.common.db)
        self._rebuild()
        database.close()  # run() may be on another thread; it opens its own connection
        self.server = Server(cfg.bus.broker_rep, ctx)
        self.md = Subscriber(cfg.bus.md_pub, ["book."], cfg.bus.hwm, ctx)
        self.pub = Publisher(cfg.bus.broker_pub, cfg.bus.hwm, ctx)
        self.liveness = Liveness(cfg.common.run_dir, "broker")
        self.heartbeat = HeartbeatMaker("broker")
        self.ticker = Ticker(cfg.bus.heartbeat_ms)

    # -- state from the database ----------------------------------------------------

    def _rebuild(self) -> None:
        for row in FillRow.select().order_by(FillRow.ts, FillRow.fill_id):
            self.account.apply(row.symbol, Side(row.side), row.price, row.qty, row.fee)
            self.stats["fills"] += 1
        open_values = [s.value for s in OPEN_STATUSES]
        for row in OrderRow.select().where(OrderRow.status.in_(open_values)).order_by(OrderRow.created_ts):
            fills = list(FillRow.select().where(FillRow.order_id == row.order_id).order_by(FillRow.ts))
            self.open[row.client_order_id] = _order_from_row(row, fills)
        log.info("rebuilt", extra={"fills": self.stats["fills"], "open_orders": len(self.open),
                                   "cash": self.account.cash})

    def _stored_ack(self, client_order_id: str) -> Ack | None:
        """The answer for an order already in the database (the first answer after a restart)."""
        row = OrderRow.get_or_none(OrderRow.client_order_id == client_order_id)
        if row is None:
            return None
        fills = list(FillRow.select().where(FillRow.order_id == row.order_id).order_by(FillRow.ts, FillRow.fill_id))
        order = _order_from_row(row, fills)
        ack = core.ack_for(order, [core.fill_dict(_fill_from_row(f)) for f in fills], order.updated_ts)
        self._remember(ack)
        return ack

    def _remember(self, ack: Ack) -> None:
        self.acks[ack.client_order_id] = ack
        self.acks.move_to_end(ack.client_order_id)
        if len(self.acks) > ACK_CACHE_MAX:
            self.acks.popitem(last=False)

    def _commit(self, order: Order, new: bool, fills: list[Fill], account: Account) -> None:
        """One transaction: the order row, its new fills and an equity snapshot if anything filled.
        Raises peewee.IntegrityError when a new order's client_order_id is already stored."""
        mid = self._mark(order.symbol)
        with database.atomic():
            if new:
                insert_rows(OrderRow, [_order_fields(order)])
            else:
                OrderRow.update(**_order_fields(order)).where(OrderRow.order_id == order.order_id).execute()
            if fills:
                insert_rows(FillRow, [_fill_fields(f, mid) for f in fills])
                marks = {s: core.to_decimal(b.mid) for s, b in self.books.items()}
                insert_rows(EquitySnapshot, [dict(ts=order.updated_ts, equity=account.equity(marks),
                                                  cash=account.cash, note=order.order_id)])

    def _mark(self, symbol: str) -> Decimal | None:
        book = self.books.get(symbol)
        return core.to_decimal(book.mid) if book is not None else None

    def _available(self, book: Book, side: Side) -> list:
        """The side of `book` an order on `side` takes from, less what paper fills already took there."""
        key = (book.symbol, side)
        levels, self.taken[key] = core.unconsumed(book.asks if side is Side.BUY else book.bids,
                                                  self.taken.get(key, {}))
        return levels

    def _with_fills(self, fills: list[Fill]) -> Account:
        """A copy of the account with `fills` applied; swapped in only after the commit."""
        acct = Account(self.account.cash, dict(self.account.positions), dict(self.account.last_price))
        for f in fills:
            acct.apply(f.symbol, f.side, f.price, f.qty, f.fee)
        return acct

    # -- requests ---------------------------------------------------------------------

    def handle(self, payload: bytes) -> tuple[bytes, Events]:
        """One request payload -> (reply payload, events to publish after replying).
        Never raises for a bad request: it becomes an `Error` reply."""
        now = self.clock()
        try:
            req = messages.decode(payload, messages.REQUESTS)
        except DecodeError as exc:
            self.stats["decode_errors"] += 1
            BAD_FRAMES.labels("request").inc()
            log.warning("bad_request", extra={"code": exc.reason, "detail": exc.detail})
            return messages.encode(Error(ts=now, code=exc.reason, text=exc.detail)), []
        if isinstance(req, OrderRequest):
            ack, events = self.place(req, now)
        elif isinstance(req, Cancel):
            ack, events = self.cancel(req.client_order_id, now)
        else:
            self.stats["decode_errors"] += 1
            BAD_FRAMES.labels("request").inc()
            return messages.encode(Error(ts=now, code="unexpected_type", text=req.TYPE)), []
        return messages.encode(ack), events

    def place(self, req: OrderRequest, now: int) -> tuple[Ack | Error, Events]:
        """Execute a new order against the latest book, commit, and return its Ack
        plus the events to publish; a known client_order_id returns the stored Ack."""
        cached = self.acks.get(req.client_order_id)
        if cached is not None:
            DUPLICATES.inc()
            return cached, []
        order_id = uuid.uuid4().hex
        fills: list[Fill] = []
        try:
            core.quote_asset(req.symbol)
            order = Order.from_request(req, order_id, now)
        except ValueError as exc:
            order = Order.rejected(req, order_id, now, core.BAD_ORDER)
            log.info("order_invalid", extra={"client_order_id": req.client_order_id, "why": str(exc)})
        else:
            book = self.books.get(req.symbol)
            if book is None:
                order.reject(core.NO_BOOK, now)
            else:
                levels = self._available(book, order.side)
                fills = core.execute_new(order, levels, self.fee_rate, now, book.exch_ts)
        account = self._with_fills(fills)
        try:
            self._commit(order, True, fills, account)
        except pw.IntegrityError:
            stored = self._stored_ack(req.client_order_id)
            if stored is None:
                raise
            DUPLICATES.inc()
            return stored, []
        self.stats["orders"] += 1
        return self._committed(order, fills, account)

    def _committed(self, order: Order, fills: list[Fill], account: Account) -> tuple[Ack, Events]:
        self.account = account
        for f in fills:
            taken = self.taken.setdefault((f.symbol, f.side), {})
            taken[f.price] = taken.get(f.price, core.ZERO) + f.qty
        if order.is_open:
            self.open[order.client_order_id] = order
        else:
            self.open.pop(order.client_order_id, None)
        prior = self.acks.get(order.client_order_id)
        if prior is None and order.fill_count > len(fills):
            ack = self._stored_ack(order.client_order_id)  # earlier fills fell out of the cache
        else:
            fill_maps = [*(prior.fills if prior is not None else ()), *map(core.fill_dict, fills)]
            ack = core.ack_for(order, fill_maps, order.updated_ts)
            self._remember(ack)
        self.stats["fills"] += len(fills)
        FILLS.inc(len(fills))
        ORDERS.labels(order.status.value).inc()
        if order.status is OrderStatus.REJECTED:
            self.stats["rejects"] += 1
        # Fills before the order's new status: risk drops a working order on its
        # terminal event, so this order over-counts exposure for a moment instead of under-counting.
        events: Events = [(f"fill.{order.symbol}", f) for f in fills]
        events.append((f"order.{order.symbol}", core.order_event(order, order.updated_ts)))
        log.info("order", extra={"order_id": order.order_id, "client_order_id": order.client_order_id,
                                 "status": order.status.value, "filled_qty": order.filled_qty,
                                 "avg_price": order.avg_price, "fills": len(fills), "reason": order.reason})
        return ack, events

    def cancel(self, client_order_id: str, now: int) -> tuple[Ack | Error, Events]:
        """Cancel an open order (-> CANCELLED, committed); a terminal one is
        answered with its stored state and reason "not open"; unknown -> Error."""
        order = self.open.get(client_order_id)
        if order is None:
            stored = self.acks.get(client_order_id) or self._stored_ack(client_order_id)
            if stored is None:
                return Error(ts=now, code="UNKNOWN_ORDER", text=client_order_id), []
            return dataclasses.replace(stored, reason=core.NOT_OPEN), []
        order = dataclasses.replace(order)
        order.cancel(core.CANCELLED_BY_CLIENT, now)
        self._commit(order, False, [], self.account)
        return self._committed(order, [], self.account)

    # -- market data --------------------------------------------------------------------

    def on_book(self, book: Book) -> Events:
        """Keep the latest book; fill resting LIMIT orders that it crosses. Returns events to publish."""
        self.books[book.symbol] = book
        events: Events = []
        for coid, resting in list(self.open.items()):
            if resting.symbol != book.symbol:
                continue
            order = dataclasses.replace(resting)
            levels = self._available(book, order.side)
            fills = core.match(order, levels, self.fee_rate, self.clock(), book.exch_ts)
            if fills:
                account = self._with_fills(fills)
                self._commit(order, False, fills, account)
                events.extend(self._committed(order, fills, account)[1])
        return events

    # -- loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop(); closes sockets and the database on the way out."""
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        poller.register(self.md.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(POLL_MS))
                if self.md.sock in ready:
                    self._drain_books()
                if self.server.sock in ready:
                    self._drain_requests()
                if self.ticker.due():
                    self._beat()
        finally:
            self.close()
            log.info("stopped", extra={"orders": self.stats["orders"], "fills": self.stats["fills"]})

    def _drain_books(self) -> None:
        for _ in range(DRAIN_MAX):
            try:
                _topic, msg = self.md.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                BAD_FRAMES.labels("md").inc()
                log.warning("bad_md_frame", extra={"code": exc.reason, "detail": exc.detail})
                continue
            if isinstance(msg, Book):
                self._publish(self._guarded(self.on_book, msg))

    def _drain_requests(self) -> None:
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
            result = self._guarded(self.handle, payload)
            if not result:
                result = (messages.encode(Error(ts=self.clock(), code="internal", text="broker failure")), [])
            reply, events = result
            self.server.reply(envelope, reply)
            HANDLE_SECONDS.observe(time.perf_counter() - started)
            self._publish(events)

    def _guarded(self, fn, arg):
        # A bug or a storage failure on one message must not stop the broker;
        # nothing was committed, so nothing was announced.
        try:
            return fn(arg)
        except Exception:
            FAILURES.inc()
            log.exception("request_failed")
            return []

    def _publish(self, events: Events) -> None:
        for topic, msg in events:
            self.pub.publish(topic, msg)

    def _beat(self) -> None:
        marks = {s: core.to_decimal(b.mid) for s, b in self.books.items()}
        stats = {**self.stats, "open": len(self.open),
                 "equity": str(self.account.equity(marks))}
        self.pub.publish("heartbeat.broker", self.heartbeat.make("ok", stats))
        self.liveness.touch()

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Close sockets and this thread's database connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        for sock in (self.server, self.md, self.pub):
            sock.close()
        database.close()
