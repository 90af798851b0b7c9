"""StoreKeeper: the broker's journal stored into SQLite, and its storage outages met (docs/fill-model.md, "Disk full").

When to store is `shared.journal_policy.StorePolicy`'s (generic); what an outage means is the
broker's: after a failed write it raises alert STORE_UNAVAILABLE once, keeps the records in the
journal, and probes the storage with a backoff (`services.broker.outage.StoreHealth`) until
the journal and the database take writes again. The desk refuses new orders meanwhile.
"""
from __future__ import annotations

import logging
import os
import time
from decimal import Decimal
from typing import Callable

from services.broker import store
from services.broker.core import Account
from services.broker.outage import StoreHealth
from services.broker.telemetry import FAILURES, STORE_AVAILABLE
from shared import journal, storage
from shared.alerts import Alerter
from shared.journal import Journal
from shared.journal_policy import StorePolicy

log = logging.getLogger("qf.broker")

# The alert's code, and the error code of a request refused meanwhile (services/broker/desk.py).
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


class StoreKeeper:
    """The broker's storage: `journal` (records durable, not yet in SQLite), the database `db`
    they go into, and `health` (the current outage, if any).

    The service loop calls `store(idle=...)` each turn and `store(force=True)` at close,
    `probe(reload)` when `health.probe_due`, `snapshot(...)` on each equity tick; the desk
    calls `outage(why, exc, frozen=True)` when the journal refused a record, and
    `refusal()` before it takes a new order during an outage."""

    def __init__(self, journal_: Journal, db: str, alerts: Alerter, stats: dict,
                 policy: StorePolicy | None = None, health: StoreHealth | None = None) -> None:
        self.journal, self.db, self.alerts, self.stats = journal_, db, alerts, stats
        self.policy = policy if policy is not None else StorePolicy()
        self.health = health if health is not None else StoreHealth()
        for key in ("store_failures", "snapshot_failures"):
            stats.setdefault(key, 0)
        STORE_AVAILABLE.set(1)

    def store(self, force: bool = False, idle: bool = False) -> bool:
        """Store the journal's records into SQLite in one transaction when `force`d, or when the
        policy says so (during an outage only when forced: the probe's turn). Returns whether
        nothing is left unstored. A failure leaves the records in the journal and starts (or
        extends) an outage."""
        pending = self.journal.pending
        if not pending:
            return True
        if not force and (self.health.down or not self.policy.due(len(pending), self.journal.oldest,
                                                                    time.monotonic(), idle)):
            return False
        try:
            self.journal.applied(journal.store(pending))
            return True
        except Exception as exc:
            FAILURES.inc()
            self.stats["store_failures"] += 1
            self.outage(f"cannot store the journal into {self.db}: {storage.problem(exc, self.db)}", exc)
            return False

    def wait_ms(self, longest_ms: int) -> int:
        """How long the loop may sleep for storage's sake: until the next probe during an outage
        (no idle store then), else as the policy says."""
        if self.health.down:
            return min(longest_ms, int(self.health.wait_s(time.monotonic()) * 1000) + 1)
        return self.policy.wait_ms(len(self.journal.pending), longest_ms)

    def refusal(self) -> str | None:
        """Why a new order is refused now (None: take it); see StoreHealth.refusal."""
        return self.health.refusal(len(self.journal.pending))

    def outage(self, why: str, exc: BaseException | None, frozen: bool = False) -> None:
        """A write failed: start an outage (logged with its traceback, alerted once) or note one
        more failure of the current one (counted by the alert; logged when it reminds).
        `frozen`: the journal itself refused a record (the desk stops its model)."""
        started = self.health.fail(why, time.monotonic(), frozen)
        if started:
            STORE_AVAILABLE.set(0)
            log.error("store_unavailable", exc_info=exc, extra={"why": why, "frozen": frozen,
                                                                 "journal_pending": len(self.journal.pending)})
        text = f"broker: {why}" + ("; new orders are refused until it can write" if self.health.frozen else "")
        if self.alerts.raise_(STORE_UNAVAILABLE, text) and not started:
            log.warning("store_still_unavailable", extra={"why": why, "down_s": round(self.health.down_s(
                time.monotonic()), 1), "journal_pending": len(self.journal.pending)})

    def probe(self, reload: Callable[[], None]) -> None:
        """Try the storage again: room for a burst of writes beside the journal, a record through
        the journal into the database (stores what waits), and `reload()` (the desk's model
        rebuilt from the database) when frozen. Ends the outage when all of that worked (the
        alert resolved), else backs off."""
        why = None
        room = storage.has_room(os.path.dirname(os.path.abspath(self.journal.path)))
        if room is not None:
            why = f"no room for writes beside {self.journal.path}: {storage.problem(room)}"
        else:
            try:
                self.journal.append([])  # a record of nothing: the journal and the database take a write
            except OSError as exc:
                why = f"cannot write {self.journal.path}: {storage.problem(exc)}"
        if why is None:
            try:
                self.journal.applied(journal.store(self.journal.pending))
                if self.health.frozen:
                    reload()
            except Exception as exc:
                why = f"cannot store the journal into {self.db}: {storage.problem(exc, self.db)}"
        now = time.monotonic()
        if why is not None:
            self.health.probe_failed(why, now)
            self.outage(why, None)
            return
        lasted = self.health.recover(now)
        STORE_AVAILABLE.set(1)
        log.warning("store_recovered", extra={"down_s": round(lasted, 3), "probes": self.health.probes})
        self.alerts.resolve(STORE_UNAVAILABLE, "broker: the journal and the database take writes again; "
                                               "new orders are taken")

    def snapshot(self, ts: int, account: Account, marks: dict[str, Decimal]) -> None:
        """Write an equity snapshot; a failure is an outage like any write's."""
        try:
            store.snapshot(ts, account, marks)
        except Exception as exc:
            self.stats["snapshot_failures"] += 1
            self.outage(f"cannot write an equity snapshot into {self.db}: {storage.problem(exc, self.db)}", exc)

    def describe(self) -> dict:
        """The storage's part of the broker's heartbeat."""
        health = self.health
        return {"journal_pending": len(self.journal.pending),
                "store": ("frozen" if health.frozen else "unavailable") if health.down else "ok",
                "store_down_s": round(health.down_s(time.monotonic()), 3), "store_outages": health.outages}
