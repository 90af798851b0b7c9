"""The strategy's signals into the `signals` table, from a thread of their own.

The trading loop hands signals over (`put`, never blocks) and goes on; the writer stores them in
batches. A database that is missing, locked, full or read-only costs signals rows, never a
decision: what cannot be stored waits (at most BACKLOG_MAX signals; beyond that the oldest are
dropped, counted) and is tried again every RETRY_S. Signals are an explanation of orders, not
money: the orders and fills themselves are the broker's, stored before anyone is told.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from services.strategy.scoring import signal_params
from shared import db as qfdb
from shared.errors import StorageError

log = logging.getLogger("qf.strategy")

BACKLOG_MAX = 50_000  # signals held while the database refuses them (about an hour of side changes)
FLUSH_S = 0.2  # how long a signal may wait for its batch
RETRY_S = 2.0  # after a failed write


class SignalWriter:
    """`SignalWriter(db_target)`; `start()`, `put(signals)` from the loop, `stop()` (stores what
    it can first). `stats`: signal_rows_stored, signal_rows_dropped, signal_store_failures, signal_rows_waiting."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="signal-writer", daemon=True)
        self.stats = dict.fromkeys(("signal_rows_stored", "signal_rows_dropped", "signal_store_failures",
                                    "signal_rows_waiting"), 0)
        self.failing: str | None = None
        self._dropped = 0  # signals dropped from the head of the queue so far (the writer's batch may hold them)

    def start(self) -> None:
        self._thread.start()

    def put(self, signals) -> None:
        with self._cond:
            self._queue.extend(signals)
            over = len(self._queue) - BACKLOG_MAX
            for _ in range(max(0, over)):
                self._queue.popleft()
            if over > 0:
                self.stats["signal_rows_dropped"] += over
                self._dropped += over
            self.stats["signal_rows_waiting"] = len(self._queue)
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        opened = False
        retry_at = 0.0  # after a failed write: when to try again (monotonic s); 0 while writes work
        while True:
            with self._cond:
                if retry_at:  # the next try at its time, not at the next put() (its notify), unless stopping
                    while not self._stopping and (left := retry_at - time.monotonic()) > 0:
                        self._cond.wait(left)
                elif not self._stopping:
                    self._cond.wait(FLUSH_S)
                batch = list(self._queue)
                dropped_before = self._dropped
                stopping = self._stopping
            if batch:
                try:
                    if not opened:
                        qfdb.init_db(self.target)
                        opened = True
                    sql = qfdb.journal_sql(qfdb.database.obj.param)[qfdb.SIGNAL_INSERT]
                    with qfdb.database.atomic():  # the statement `qf backtest` stores its signals with
                        for sig in batch:
                            qfdb.database.execute_sql(sql, signal_params(sig))
                except (StorageError, OSError, Exception) as exc:  # noqa: BLE001 - any refusal: keep them, retry
                    self.stats["signal_store_failures"] += 1
                    problem = f"{type(exc).__name__}: {str(exc)[:160]}"
                    if self.failing is None:
                        log.warning("signal_store_failed", extra={"db": self.target, "problem": problem,
                                                                  "waiting": len(batch)})
                    self.failing = problem
                    if opened:
                        qfdb.close_db()
                        opened = False
                    if stopping:
                        return
                    retry_at = time.monotonic() + RETRY_S
                    continue
                with self._cond:  # what put() dropped meanwhile was at the head of this batch
                    for _ in range(max(0, len(batch) - (self._dropped - dropped_before))):
                        self._queue.popleft()
                    self.stats["signal_rows_waiting"] = len(self._queue)
                self.stats["signal_rows_stored"] += len(batch)
                if self.failing is not None:
                    log.info("signal_store_recovered", extra={"db": self.target})
                    self.failing = None
                retry_at = 0.0
            if stopping:
                if opened:
                    qfdb.close_db()
                return
