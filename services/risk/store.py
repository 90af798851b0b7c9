"""Risk's storage: rebuild the engine from the database; write denials, state changes and checkpoints."""
from __future__ import annotations

import logging
from collections import OrderedDict
from decimal import Decimal

import peewee as pw

from services.risk.core import OpenOrder, RiskEngine, StateChange
from shared import storage
from shared.alerts import Alerter
from shared.db import EquitySnapshot, FillRow, OrderRow, RiskCheckpoint, RiskEvent, database, insert_rows
from shared.enums import OPEN_STATUSES, OrderKind, Side, TimeInForce, TradingState

log = logging.getLogger("qf.risk")

RECENT_ORDERS = 100_000  # client_order_ids known to the broker, for retries across a restart
CHECKPOINTS_KEPT = 1000  # older checkpoint rows are pruned at start; only the newest is read
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # the alert's code while the database refuses risk's rows
RETRY_FIRST_NS, RETRY_MAX_NS = 100_000_000, 5_000_000_000  # after a failed write: 0.1 s, doubling to 5 s


class Forwarded:
    """Client order ids the broker has for sure (it answered, or they are in its table; bounded,
    oldest forgotten first): a retry of one of them gets the broker's answer even when risk
    would now deny it, and the broker, idempotent on the id, executes nothing new."""

    def __init__(self, limit: int = RECENT_ORDERS) -> None:
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def add(self, client_order_id: str) -> None:
        self.ids[client_order_id] = None
        if len(self.ids) > self.limit:
            self.ids.popitem(last=False)

    def __contains__(self, client_order_id: str) -> bool:
        return client_order_id in self.ids


def rebuild(engine: RiskEngine, forwarded: Forwarded, now_ns: int) -> dict:
    """Replay every stored fill into `engine`, track the open orders, take back the newest
    checkpoint (trading state, peak, day start, breakers) and remember recent client order
    ids in `forwarded`; then evaluate at `now_ns`. Needs the database bound. Returns counts."""
    query = (FillRow.select(FillRow.fill_id, FillRow.client_order_id, FillRow.symbol, FillRow.side,
                            FillRow.price, FillRow.qty, FillRow.fee, FillRow.fee_asset, FillRow.ts)
             .order_by(FillRow.ts, FillRow.fill_id).tuples())
    fills = ({"fill_id": fill_id, "client_order_id": coid, "symbol": symbol, "side": side, "price": price,
              "qty": qty, "fee": fee, "fee_asset": fee_asset, "ts": ts}
             for fill_id, coid, symbol, side, price, qty, fee, fee_asset, ts in query.iterator())
    open_values = [s.value for s in OPEN_STATUSES]
    # priced as risk reserved for them (a LIMIT order at its price; a MARKET order never rests in
    # the broker's table: it is matched on arrival)
    open_orders = [OpenOrder(row.client_order_id, row.symbol, Side(row.side), row.qty, row.qty - row.filled_qty,
                             row.kind == OrderKind.LIMIT.value and TimeInForce(row.tif).rests,
                             row.price if row.kind == OrderKind.LIMIT.value else None)
                   for row in OrderRow.select().where(OrderRow.status.in_(open_values))]
    last = RiskCheckpoint.select().order_by(RiskCheckpoint.id.desc()).first()
    snapshot = None if last is None else {
        "state": last.state, "code": last.code, "reason": last.reason, "by": last.by, "state_ts": last.state_ts,
        "peak_equity": last.peak_equity, "day": last.day, "day_start_equity": last.day_start_equity,
        "tripped": last.tripped}
    applied = engine.replay(fills, open_orders, snapshot)
    if last is None:
        _restore_legacy(engine)
    recent = (OrderRow.select(OrderRow.client_order_id).order_by(OrderRow.created_ts.desc())
              .limit(forwarded.limit).tuples())
    for (coid,) in reversed(list(recent)):
        forwarded.add(coid)
    engine.on_clock(now_ns)  # a restart during a pause is paused at once: the calendar's, not memory
    engine.evaluate(now_ns)
    return {"fills": applied, "working": engine.working_count, "state": engine.state.value,
            "checkpoint": last is not None}


def _restore_legacy(engine: RiskEngine) -> None:
    # A database written before checkpoints existed: the last STATE event, and the
    # peak of the broker's equity snapshots. A halt survives: coming back ACTIVE would fail open.
    last = (RiskEvent.select().where(RiskEvent.kind == "STATE")
            .order_by(RiskEvent.ts.desc(), RiskEvent.id.desc()).first())
    equities = (Decimal(equity) for (equity,) in EquitySnapshot.select(EquitySnapshot.equity).tuples().iterator())
    if last is None:
        engine.restore_legacy(None, "", "", equities)
    else:
        engine.restore_legacy(TradingState(last.state), last.code, last.text, equities)


def prune_checkpoints() -> int:
    """Delete all but the newest CHECKPOINTS_KEPT checkpoint rows; returns how many went."""
    newest = RiskCheckpoint.select(RiskCheckpoint.id).order_by(RiskCheckpoint.id.desc()).first()
    if newest is None:
        return 0
    return RiskCheckpoint.delete().where(RiskCheckpoint.id <= newest.id - CHECKPOINTS_KEPT).execute()


class Outbox:
    """Rows waiting to be written: denials and state changes (RiskEvent) and, when the
    engine's figures moved, a checkpoint. Written in one transaction by `flush`.

    A database that refuses writes (a full or read-only disk) must not stop risk deciding:
    the rows wait (at most `limit`; older ones are dropped and counted in `stats["events_lost"]`),
    `flush` tries again after a backoff (RETRY_FIRST_NS doubling to RETRY_MAX_NS) and is a no-op
    in between, the outage is alerted once (`alerts`, code STORE_UNAVAILABLE) and resolved
    by the first write that works."""

    def __init__(self, limit: int = 100_000, stats: dict | None = None) -> None:
        self.events: list[dict] = []
        self.oldest_ns = 0
        self.checkpoints = 0  # written since the last prune
        self.limit = limit
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("events_lost", 0)
        self.stats.setdefault("store_failures", 0)
        self.alerts: Alerter | None = None
        self.failing: str | None = None  # why the last write failed, while writes fail
        self.failing_since_ns = 0
        self.retry_ns = 0
        self.delay_ns = RETRY_FIRST_NS

    def attach(self, alerts: Alerter) -> None:
        """Alert through `alerts` (the service's, made once its PUB exists): at once if writes already fail."""
        self.alerts = alerts
        if self.failing is not None:
            alerts.raise_(STORE_UNAVAILABLE, self._alert_text())

    def __len__(self) -> int:
        return len(self.events)

    def denial(self, ts: int, code: str, text: str, client_order_id: str, symbol: str, state: str) -> None:
        if not self.events:
            self.oldest_ns = ts
        self.events.append(dict(ts=ts, kind="DENIED", code=code, text=text[:500],
                                client_order_id=client_order_id[:200], symbol=symbol[:40], state=state))

    def state_change(self, change: StateChange) -> None:
        if not self.events:
            self.oldest_ns = change.ts
        self.events.append(dict(ts=change.ts, kind="STATE", code=change.code,
                                text=f"{change.reason[:500]} [by {change.by[:80]}]", client_order_id="",
                                symbol="", state=change.state.value))

    def flush(self, engine: RiskEngine, now_ns: int) -> int:
        """Write the waiting rows and, if `engine.figures_changed`, a checkpoint, in one
        transaction; once written, `engine.figures_stored()`. Returns the rows written (0 while
        backing off after a failure). Raises the peewee or OS error of the first failure of a
        streak, for the caller to log (the rows stay queued, the figures still to be stored);
        later failures of the streak are counted, not raised."""
        checkpoint = engine.figures_changed
        if not self.events and not checkpoint:
            return 0
        if self.failing is not None and now_ns < self.retry_ns:
            return 0
        try:
            with database.atomic():
                insert_rows(RiskEvent, self.events)
                if checkpoint:
                    insert_rows(RiskCheckpoint, [dict(ts=now_ns, **engine.snapshot())])
        except Exception as exc:
            if self._failed(exc, now_ns):
                raise
            return 0
        written = len(self.events) + checkpoint
        self.events = []
        engine.figures_stored()
        self.checkpoints += checkpoint
        if self.failing is not None:
            self._recovered(now_ns)
        if self.checkpoints >= CHECKPOINTS_KEPT:  # a rising market moves the peak every second
            self.checkpoints = 0
            try:
                prune_checkpoints()
            except Exception:  # only housekeeping: the next prune catches up
                log.warning("checkpoint_prune_failed", exc_info=True)
        return written

    def _failed(self, exc: BaseException, now_ns: int) -> bool:
        """Note a failed write; True for the first of a streak."""
        self.stats["store_failures"] += 1
        lost = len(self.events) - self.limit
        if lost > 0:
            del self.events[:lost]
            self.stats["events_lost"] += lost
        first = self.failing is None
        self.failing = storage.problem(exc, database.obj.database if isinstance(database.obj, pw.SqliteDatabase)
                                       else None)
        if first:
            self.failing_since_ns, self.delay_ns = now_ns, RETRY_FIRST_NS
        else:
            self.delay_ns = min(RETRY_MAX_NS, self.delay_ns * 2)
        self.retry_ns = now_ns + self.delay_ns
        if self.alerts is not None:
            self.alerts.raise_(STORE_UNAVAILABLE, self._alert_text())
        return first

    def _recovered(self, now_ns: int) -> None:
        log.warning("risk_rows_written_again", extra={"down_s": round((now_ns - self.failing_since_ns) / 1e9, 3),
                                                       "lost": self.stats["events_lost"]})
        self.failing = None
        if self.alerts is not None:
            self.alerts.resolve(STORE_UNAVAILABLE, "risk: denials, state changes and checkpoints are stored again")

    def _alert_text(self) -> str:
        return (f"risk: the database refuses denials, state changes and checkpoints ({self.failing}); "
                f"risk keeps deciding, {len(self.events)} rows wait")
